"""A fast scripted origin for load-shaped tests: a raw asyncio Protocol, no h11.

It serves three shapes, every URL distinct by its query:
  GET /get?id=N        a small JSON body naming N
  POST /post?id=N      the body's length and SHA-256 (Content-Length bodies only)
  GET /sse?id=N&n=K    K server-sent events, chunked, then [DONE]
It counts what it received (POST ids, to find duplicates) and, when asked, closes
idle keep-alive connections after a random delay, as real upstreams do.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections import Counter
from typing import List, Optional


class FastOriginState:
    def __init__(self, rng: random.Random, max_idle: Optional[float]) -> None:
        self.rng = rng
        self.max_idle = max_idle
        self.connections = 0
        self.open = 0
        self.requests = 0
        self.post_ids: Counter = Counter()
        self.transports: List[asyncio.Transport] = []


class FastOriginProtocol(asyncio.Protocol):
    def __init__(self, state: FastOriginState) -> None:
        self.state = state
        self.buf = bytearray()
        self.transport: Optional[asyncio.Transport] = None
        self.idle_timer: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.state.connections += 1
        self.state.open += 1

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.state.open -= 1
        if self.idle_timer is not None:
            self.idle_timer.cancel()

    def data_received(self, data: bytes) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1")
            lines = head.split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4 : end + 4 + length])
            del self.buf[: end + 4 + length]
            self.state.requests += 1
            self._answer(method, target, body)
        # never reached

    def _answer(self, method: str, target: str, body: bytes) -> None:
        path, _, query = target.partition("?")
        params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        out: List[bytes] = []
        if path == "/post" and method == "POST":
            self.state.post_ids[params.get("id")] += 1
            payload = b'{"len":%d,"sha256":"%s"}' % (len(body), hashlib.sha256(body).hexdigest().encode())
            out.append(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(payload)
            )
            out.append(payload)
        elif path == "/sse":
            out.append(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            for i in range(int(params.get("n", "3"))):
                event = b'data: {"id":"%s","i":%d}\n\n' % (params.get("id", "").encode(), i)
                out.append(b"%x\r\n%s\r\n" % (len(event), event))
            done = b"data: [DONE]\n\n"
            out.append(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
        else:
            payload = b'{"id":"%s"}' % params.get("id", "").encode()
            out.append(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(payload)
            )
            out.append(payload)
        assert self.transport is not None
        self.transport.writelines(out)
        if self.state.max_idle is not None:
            delay = self.state.rng.uniform(0, self.state.max_idle)
            self.idle_timer = asyncio.get_running_loop().call_later(delay, self.transport.close)


async def start_fast_origin(
    rng: random.Random, max_idle: Optional[float] = None
) -> "tuple[asyncio.AbstractServer, FastOriginState]":
    state = FastOriginState(rng, max_idle)
    server = await asyncio.get_running_loop().create_server(lambda: FastOriginProtocol(state), "127.0.0.1", 0)
    return server, state
