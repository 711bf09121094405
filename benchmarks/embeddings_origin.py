"""An embeddings origin shaped like a GPU server (the batching benchmark, issue 14).

``POST /v1/embeddings``: each request costs COST_MS + PER_INPUT_MS per input of
simulated compute, and at most SLOTS requests compute at once; the rest queue
in arrival order, as on a GPU. Every input gets the same precomputed
DIMS-dimensional vector, in the encoding asked for, so the origin's own CPU
(it shares a core with the load generator) stays small. ``GET /__stats``
answers ``{"connections", "requests", "inputs", "busy"}`` at once, so the benchmark
checks keep-alive and counts upstream requests instead of assuming them.
One asyncio Protocol and no HTTP library, as in delay_origin.py.

    python benchmarks/embeddings_origin.py PORT [COST_MS PER_INPUT_MS SLOTS]
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import sys
from collections import deque
from typing import Deque, Tuple

DIMS = 256
VALUES = [((i * 37) % 101 - 50) / 101.0 for i in range(DIMS)]
FLOAT32 = list(struct.unpack(f"<{DIMS}f", struct.pack(f"<{DIMS}f", *VALUES)))
BASE64 = json.dumps(base64.b64encode(struct.pack(f"<{DIMS}f", *FLOAT32)).decode())
FLOATS = json.dumps(FLOAT32)
stats = {"connections": 0, "requests": 0, "inputs": 0}


def answer(body: bytes) -> bytes:
    request = json.loads(body)
    raw = request["input"]
    count = 1 if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else len(raw)
    vector = BASE64 if request.get("encoding_format") == "base64" else FLOATS
    items = ",".join(f'{{"object":"embedding","index":{i},"embedding":{vector}}}' for i in range(count))
    tokens = 4 * count
    model = json.dumps(request.get("model", ""))
    usage = f'{{"prompt_tokens":{tokens},"total_tokens":{tokens}}}'
    out = f'{{"object":"list","data":[{items}],"model":{model},"usage":{usage}}}'
    data = out.encode()
    stats["requests"] += 1
    stats["inputs"] += count
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(data), data)


class Gpu:
    """SLOTS requests compute at once; the others wait their turn."""

    def __init__(self, cost: float, per_input: float, slots: int) -> None:
        self.cost, self.per_input, self.free, self.slots = cost, per_input, slots, slots
        self.queue: Deque[Tuple["Origin", bytes, int]] = deque()
        self.loop = asyncio.get_event_loop()

    def submit(self, conn: "Origin", response: bytes, inputs: int) -> None:
        self.queue.append((conn, response, inputs))
        self._start()

    def _start(self) -> None:
        while self.free and self.queue:
            conn, response, inputs = self.queue.popleft()
            self.free -= 1
            self.loop.call_later(self.cost + self.per_input * inputs, self._done, conn, response)

    def _done(self, conn: "Origin", response: bytes) -> None:
        self.free += 1
        conn.reply(response)
        self._start()


class Origin(asyncio.Protocol):
    def __init__(self, gpu: Gpu) -> None:
        self.gpu = gpu
        self.buf = b""
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        stats["connections"] += 1

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end].lower()
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                length = int(head[at + 15 :].split(b"\r\n", 1)[0])
            if len(buf) < end + 4 + length:
                break
            body = buf[end + 4 : end + 4 + length]
            buf = buf[end + 4 + length :]
            if head.startswith(b"get /__stats"):
                busy = len(self.gpu.queue) + self.gpu.slots - self.gpu.free
                text = json.dumps(dict(stats, busy=busy)).encode()
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(text), text))
                continue
            before = stats["inputs"]
            response = answer(body)
            self.gpu.submit(self, response, stats["inputs"] - before)
        self.buf = buf

    def reply(self, response: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(response)


async def main(port: int, cost_ms: float, per_input_ms: float, slots: int) -> None:
    loop = asyncio.get_running_loop()
    gpu = Gpu(cost_ms / 1000, per_input_ms / 1000, slots)
    server = await loop.create_server(lambda: Origin(gpu), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    args = sys.argv[1:]
    asyncio.run(
        main(
            int(args[0]),
            float(args[1]) if len(args) > 1 else 5.0,
            float(args[2]) if len(args) > 2 else 0.05,
            int(args[3]) if len(args) > 3 else 4,
        )
    )
