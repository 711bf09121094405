"""Warm PyPy's JIT before the first client arrives.

PyPy compiles a code path only after it has run it many times; until then it
interprets, several times slower than CPython. A freshly started instance facing
a burst of new streams -- which is what an autoscaled or restarted gateway meets
first -- spent ~1.5 ms of CPU per stream on its first burst of 500 (the event
delay p99 was 25-80 ms) against ~0.2 ms once warm. So before it listens, a PyPy
process relays traffic of its own: a throwaway :class:`~pyproxy.proxy.Proxy` with
default settings, on 127.0.0.1 port 0, in front of a throwaway origin on
127.0.0.1 port 0, driven by a loopback client through the same code a client's
request takes -- accept, parse, pool, relay of JSON and chunked event streams,
keep-alive and close. Nothing of the operator's configuration is used (no Redis,
no upstream, no access log, no keys), and nothing of it survives the warm-up but
the compiled code.

Bounded by time (``--warmup``, default 2 s on PyPy, none on CPython, whose
interpreter has nothing to warm) and by rounds.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import List, Optional, Tuple

from pyproxy.server.heap import trim_heap

log = logging.getLogger("pyproxy")

CLIENTS = 250  # connections opened at once per round: a burst of new clients, as a restart meets
MAX_ROUNDS = 200
EVENTS = 8  # per event stream

_JSON = b'{"object":"list","data":[{"id":"warm","object":"model"}],"pad":"' + b"x" * 400 + b'"}'
# Each client's bodies are its own: the warm-up relays streams, as a burst of
# distinct clients needs, rather than coalescing them into one.
_CHAT = b'{"model":"warm","messages":[{"role":"user","content":"hello %d"}]}'
_STREAM = b'{"model":"warm","stream":true,"messages":[{"role":"user","content":"hello %d"}]}'


def _event(i: int) -> bytes:
    data = b'data: {"choices":[{"index":0,"delta":{"content":"tok%d"}}]}\n\n' % i
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Origin(asyncio.Protocol):
    """Answers every request on a keep-alive connection: an event stream when the
    body asks for one, else a JSON body. Requests come from pyproxy only."""

    def __init__(self) -> None:
        self.transport: Optional[asyncio.Transport] = None
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                length = int(head[at + 15 :].split(b"\r\n", 1)[0])
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4 : end + 4 + length]
            self.buf = self.buf[end + 4 + length :]
            self._answer(body)

    def _answer(self, body: bytes) -> None:
        assert self.transport is not None
        if b'"stream":true' in body:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            )
            for i in range(EVENTS):
                self.transport.write(_event(i))
            self.transport.write(b"0\r\n\r\n")
            return
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(_JSON), _JSON)
        )


async def _read_response(reader: asyncio.StreamReader) -> int:
    """One response's status; its body read to the end (content-length or chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"content-length:")
    if at >= 0:
        await reader.readexactly(int(lower[at + 15 :].split(b"\r\n", 1)[0]))
    elif b"chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def _client(port: int, n: int) -> int:
    """One connection: a GET, a JSON POST and a streamed POST on keep-alive, then a close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    ok = 0
    try:
        requests: List[Tuple[bytes, bytes, bytes]] = [
            (b"GET", b"/v1/models?warm=%d" % n, b""),
            (b"POST", b"/v1/chat/completions", _CHAT % n),
            (b"POST", b"/v1/chat/completions", _STREAM % n),
        ]
        for method, target, body in requests:
            writer.write(
                b"%s %s HTTP/1.1\r\nhost: warmup\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (method, target, len(body), body)
            )
            if await _read_response(reader) == 200:
                ok += 1
    finally:
        writer.close()
    return ok


async def warm_up(seconds: float) -> Tuple[int, int]:
    """Relay loopback traffic for about ``seconds``; (rounds, responses with 200)."""
    from pyproxy.config import Settings, parse_upstream
    from pyproxy.proxy import Proxy

    loop = asyncio.get_running_loop()
    origin = await loop.create_server(_Origin, "127.0.0.1", 0)
    origin_port = origin.sockets[0].getsockname()[1]
    settings = Settings(
        listen=("127.0.0.1", 0),
        upstream=parse_upstream(f"http://127.0.0.1:{origin_port}"),
        admin_listen=None,
        heap_release=False,
    )
    proxy = Proxy(settings, loop)
    rounds = ok = 0
    try:
        await proxy.start(admin=False)
        deadline = time.monotonic() + seconds
        while rounds < MAX_ROUNDS and time.monotonic() < deadline:
            start = rounds * CLIENTS
            results = await asyncio.wait_for(
                asyncio.gather(*(_client(proxy.port, start + i) for i in range(CLIENTS))), max(seconds, 1.0) * 5
            )
            ok += sum(results)
            rounds += 1
    finally:
        await proxy.stop(drain_timeout=1.0)
        origin.close()
        await origin.wait_closed()
    return rounds, ok


async def warm_up_logged(seconds: float) -> None:
    """The CLI's warm-up: a failure is logged and start-up goes on (cold, not down)."""
    started = time.monotonic()
    try:
        rounds, ok = await warm_up(seconds)
    except Exception as exc:  # pragma: no cover - loopback traffic of our own failing
        log.warning("warm-up failed (%s: %s); starting cold", type(exc).__name__, exc)
        return
    # What the warm-up freed goes back now, when nobody waits for a pause: a full
    # collection, then the heap's free pages to the OS (pyproxy/server/heap.py).
    gc.collect()
    trim_heap()
    log.info(
        "warm-up: %d requests relayed in %.1f s (%d rounds of %d connections)",
        ok,
        time.monotonic() - started,
        rounds,
        CLIENTS,
    )
