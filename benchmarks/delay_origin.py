"""A keep-alive origin that answers every request after a fixed delay (the gateway benchmark).

Any method and path: a small chat-completion JSON body after DELAY_MS
milliseconds (0: at once), the request body read by its Content-Length.
``GET /__stats`` answers ``{"connections": N, "requests": M}`` at once (not
counted), so the benchmark checks keep-alive instead of assuming it. One
asyncio Protocol, no parsing library: the origin must not be the bottleneck.
Usage: python benchmarks/delay_origin.py PORT DELAY_MS
"""

from __future__ import annotations

import asyncio
import json
import sys

BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "model": "bench",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok " * 50}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 50, "total_tokens": 60},
    }
).encode()
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY)
stats = {"connections": 0, "requests": 0}


class Origin(asyncio.Protocol):
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.buf = b""
        self.transport: asyncio.Transport
        self.loop = asyncio.get_event_loop()

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
            buf = buf[end + 4 + length :]
            if head.startswith(b"get /__stats"):
                body = json.dumps(stats).encode()
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                continue
            stats["requests"] += 1
            if self.delay:
                self.loop.call_later(self.delay, self._answer)
            else:
                self.transport.write(RESPONSE)
        self.buf = buf

    def _answer(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(RESPONSE)


async def main(port: int, delay_ms: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Origin(delay_ms / 1000), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), float(sys.argv[2])))
