"""An in-test origin server that records exactly what it received.

Built on asyncio streams + h11 so each route is a short coroutine. Every byte
the proxy sends is kept in ``raw`` (per connection too), so tests can assert
that a rejected request reached nobody.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple

import h11

Headers = List[Tuple[bytes, bytes]]


@dataclass
class Received:
    method: bytes
    target: bytes
    headers: Headers
    body: bytes
    conn_id: int

    def header(self, name: bytes) -> Optional[bytes]:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_list(self, name: bytes) -> List[bytes]:
        return [v for k, v in self.headers if k == name]


@dataclass
class OriginConnection:
    conn_id: int
    raw: bytearray = field(default_factory=bytearray)
    closed_at: Optional[float] = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class Reply:
    """What a route writes: helpers over the h11 connection and the stream."""

    def __init__(self, conn: h11.Connection, writer: asyncio.StreamWriter) -> None:
        self.conn = conn
        self.writer = writer

    async def head(self, status: int, headers: Headers) -> None:
        self.writer.write(self.conn.send(h11.Response(status_code=status, headers=headers)))
        await self.writer.drain()

    async def data(self, data: bytes) -> None:
        self.writer.write(self.conn.send(h11.Data(data=data)))
        await self.writer.drain()

    async def end(self) -> None:
        self.writer.write(self.conn.send(h11.EndOfMessage()))
        await self.writer.drain()

    async def full(self, status: int, body: bytes, headers: Optional[Headers] = None) -> None:
        hdrs = list(headers or [(b"content-type", b"application/json")])
        hdrs.append((b"content-length", str(len(body)).encode()))
        await self.head(status, hdrs)
        if body:
            await self.data(body)
        await self.end()

    async def raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


Route = Callable[[Received, Reply], Awaitable[None]]

MODELS_BODY = json.dumps(
    {"object": "list", "data": [{"id": "gpt-test", "object": "model", "created": 0, "owned_by": "pyproxy-tests"}]}
).encode()


def pattern_bytes(size: int) -> bytes:
    """Deterministic, non-repeating-looking payload of ``size`` bytes."""
    block = hashlib.sha256(b"pyproxy").digest() * 2048  # 64 KiB
    whole, rest = divmod(size, len(block))
    return block * whole + block[:rest]


class Origin:
    def __init__(self, *, idle_close_after: Optional[float] = None, ssl: Optional[Any] = None) -> None:
        self.idle_close_after = idle_close_after
        self.ssl = ssl
        self.requests: List[Received] = []
        self.connections: List[OriginConnection] = []
        self.routes: Dict[bytes, Route] = {}
        self.request_seen = asyncio.Event()
        self._server: Optional[asyncio.AbstractServer] = None
        self._tasks: List[asyncio.Task[None]] = []
        self.add_default_routes()

    # --- lifecycle ---

    async def __aenter__(self) -> "Origin":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl else 'http'}://127.0.0.1:{self.port}"

    @property
    def raw_received(self) -> bytes:
        return b"".join(bytes(c.raw) for c in self.connections)

    def route(self, path: bytes) -> Callable[[Route], Route]:
        def register(func: Route) -> Route:
            self.routes[path] = func
            return func

        return register

    # --- serving ---

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.append(task)
        record = OriginConnection(len(self.connections))
        self.connections.append(record)
        conn = h11.Connection(h11.SERVER)
        reply = Reply(conn, writer)
        try:
            while True:
                request: Optional[h11.Request] = None
                body: List[bytes] = []
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        timeout = self.idle_close_after if (request is None and conn.our_state is h11.IDLE) else None
                        try:
                            data = await asyncio.wait_for(reader.read(65536), timeout)
                        except asyncio.TimeoutError:
                            return  # idle keep-alive timeout: close, like uvicorn's 5 s
                        record.raw.extend(data)
                        conn.receive_data(data)
                        continue
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body.append(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                assert request is not None
                received = Received(
                    request.method, request.target, list(request.headers), b"".join(body), record.conn_id
                )
                self.requests.append(received)
                self.request_seen.set()
                path = request.target.split(b"?")[0]
                route = self.routes.get(path)
                # Watch for the peer closing while the route runs, so a test
                # sees the moment the proxy dropped us, not our next write.
                watcher = asyncio.ensure_future(reader.read(65536))
                watcher.add_done_callback(lambda fut: self._watch(fut, record))
                try:
                    if route is None:
                        await reply.full(404, b'{"error":"no route"}')
                    else:
                        await route(received, reply)
                finally:
                    if not watcher.done():
                        watcher.cancel()
                        await asyncio.gather(watcher, return_exceptions=True)
                if watcher.cancelled() or watcher.exception() is not None:
                    if not watcher.cancelled():
                        return
                elif watcher.result() == b"":
                    return
                else:
                    early = watcher.result()
                    record.raw.extend(early)
                    conn.receive_data(early)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                if conn.our_state is not h11.DONE:
                    return  # the route broke the response on purpose
                conn.start_next_cycle()
        except (ConnectionError, h11.RemoteProtocolError, h11.LocalProtocolError):
            return
        except RuntimeError:
            return  # uvloop: a read on a transport the peer's abort already closed
        except asyncio.CancelledError:
            return  # origin shutting down; asyncio's server callback must not see it
        finally:
            if record.closed_at is None:
                record.closed_at = time.monotonic()
            record.closed.set()
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, asyncio.CancelledError):
                pass

    @staticmethod
    def _watch(fut: "asyncio.Future[bytes]", record: OriginConnection) -> None:
        if fut.cancelled():
            return
        if fut.exception() is not None or fut.result() == b"":
            if record.closed_at is None:
                record.closed_at = time.monotonic()
            record.closed.set()

    def add_default_routes(self) -> None:
        @self.route(b"/v1/models")
        async def models(req: Received, reply: Reply) -> None:
            await reply.full(200, MODELS_BODY)

        @self.route(b"/echo")
        async def echo(req: Received, reply: Reply) -> None:
            info = {
                "method": req.method.decode(),
                "target": req.target.decode(),
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in req.headers],
                "body_sha256": hashlib.sha256(req.body).hexdigest(),
                "body_len": len(req.body),
            }
            await reply.full(200, json.dumps(info).encode())

        @self.route(b"/big")
        async def big(req: Received, reply: Reply) -> None:
            size = int(req.target.split(b"size=")[1]) if b"size=" in req.target else 1 << 20
            payload = pattern_bytes(size)
            await reply.head(
                200, [(b"content-length", str(size).encode()), (b"content-type", b"application/octet-stream")]
            )
            view = memoryview(payload)
            for start in range(0, size, 65536):
                await reply.data(bytes(view[start : start + 65536]))
            await reply.end()

        @self.route(b"/sse")
        async def sse(req: Received, reply: Reply) -> None:
            """``/sse?n=N&interval=S``: N events, each carrying its send time."""
            query = dict(part.split(b"=", 1) for part in req.target.partition(b"?")[2].split(b"&") if b"=" in part)
            count = int(query.get(b"n", b"5"))
            interval = float(query.get(b"interval", b"0.01"))
            await reply.head(200, [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")])
            for i in range(count):
                event = {"i": i, "sent": time.monotonic()}
                await reply.data(b"data: " + json.dumps(event).encode() + b"\n\n")
                if i + 1 < count:
                    await asyncio.sleep(interval)
            await reply.data(b"data: [DONE]\n\n")
            await reply.end()

        @self.route(b"/chunked")
        async def chunked(req: Received, reply: Reply) -> None:
            await reply.head(200, [(b"content-type", b"text/plain")])
            for piece in (b"hello ", b"chunked ", b"world"):
                await reply.data(piece)
            await reply.end()
