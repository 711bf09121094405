"""A small test HTTP client (asyncio streams + h11) and a running-proxy context."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from typing import Any, AsyncIterator, Dict, Iterable, List, Optional, Tuple

import h11

from pyproxy.config import Settings, parse_upstream
from pyproxy.proxy import Proxy

Headers = List[Tuple[bytes, bytes]]


@dataclasses.dataclass
class Response:
    status: int
    headers: Headers
    body: bytes
    complete: bool = True

    def header(self, name: bytes) -> Optional[bytes]:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """One keep-alive client connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int) -> "Client":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send_request(
        self,
        method: bytes,
        target: bytes,
        headers: Iterable[Tuple[bytes, bytes]] = (),
        body: bytes = b"",
        end: bool = True,
    ) -> None:
        hdrs = [(b"host", b"proxy.test")] + list(headers)
        if body and not any(k.lower() in (b"content-length", b"transfer-encoding") for k, _ in hdrs):
            hdrs.append((b"content-length", str(len(body)).encode()))
        self.writer.write(self.conn.send(h11.Request(method=method, target=target, headers=hdrs)))
        if body:
            self.writer.write(self.conn.send(h11.Data(data=body)))
        if end:
            self.writer.write(self.conn.send(h11.EndOfMessage()))
        await self.writer.drain()

    async def next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.reader.read(65536)
                self.conn.receive_data(data)
                continue
            return event

    async def read_head(self) -> h11.Response:
        while True:
            event = await self.next_event()
            if isinstance(event, h11.InformationalResponse):
                continue
            if not isinstance(event, h11.Response):
                raise AssertionError(f"expected a response head, got {event!r}")
            return event

    async def read_response(self) -> Response:
        head = await self.read_head()
        chunks: List[bytes] = []
        complete = False
        try:
            while True:
                event = await self.next_event()
                if isinstance(event, h11.Data):
                    chunks.append(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    complete = True
                    break
                else:
                    break
        except h11.RemoteProtocolError:
            complete = False  # peer closed mid-body: truncated
        if complete and self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return Response(head.status_code, list(head.headers), b"".join(chunks), complete)

    async def request(
        self, method: bytes, target: bytes, headers: Iterable[Tuple[bytes, bytes]] = (), body: bytes = b""
    ) -> Response:
        await self.send_request(method, target, headers, body)
        return await self.read_response()


async def request(
    port: int, method: bytes, target: bytes, headers: Iterable[Tuple[bytes, bytes]] = (), body: bytes = b""
) -> Response:
    async with await Client.connect(port) as client:
        return await client.request(method, target, headers, body)


async def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


def parse_raw_response(raw: bytes) -> Response:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    conn.receive_data(b"")
    head = conn.next_event()
    while isinstance(head, h11.InformationalResponse):
        head = conn.next_event()
    assert isinstance(head, h11.Response), head
    chunks = []
    complete = False
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Data):
            chunks.append(event.data)
        elif isinstance(event, h11.EndOfMessage):
            complete = True
            break
        else:
            break
    return Response(head.status_code, list(head.headers), b"".join(chunks), complete)


def make_settings(upstream: str, **overrides: Any) -> Settings:
    # No admin listener unless a test asks for one (then on port 0): tests run in parallel.
    values: Dict[str, Any] = dict(listen=("127.0.0.1", 0), upstream=parse_upstream(upstream), admin_listen=None)
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def running_proxy(upstream: str, clock: Any = None, **overrides: Any) -> AsyncIterator[Proxy]:
    loop = asyncio.get_running_loop()
    proxy = (
        Proxy(make_settings(upstream, **overrides), loop, clock)
        if clock
        else Proxy(make_settings(upstream, **overrides), loop)
    )
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop(drain_timeout=2.0)


async def wait_until(predicate: Any, timeout: float = 5.0, interval: float = 0.005) -> None:
    """Poll ``predicate`` until true, failing after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)
