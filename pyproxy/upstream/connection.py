"""One upstream HTTP/1.1 connection, as an asyncio Protocol.

States are explicit (RFC 9112 §9.3 persistence):

    CONNECTING -> ACTIVE <-> IDLE
         \\          \\         \\
          `---------> CLOSED <--'

Requests are written by pyproxy itself (the fields were validated when they
were parsed). A response head is read by the fast path when it has a common
shape -- HTTP/1.1 framed by Content-Length (body relayed by counting bytes)
or by chunked coding (decoded by ``ChunkedDecoder``, equivalent to h11's);
any other response is handed, from its first byte, to a fresh h11 CLIENT
connection that parses it (close-delimited, HEAD, 1xx, anything unusual). A connection goes back to IDLE only when the request was
fully sent, the response fully read, and nothing says close; anything else
(an error, extra bytes, an early response while the body was still being
sent) closes it. Response events reach the current *exchange* by plain
method calls: no task or future per chunk.
"""

from __future__ import annotations

import asyncio
import logging
import select
from typing import TYPE_CHECKING, Any, List, Optional

import h11

from pyproxy.errors import ClientStalled, ProxyError, UpstreamDisconnected, UpstreamProtocolError, UpstreamTimeout
from pyproxy.http.fastpath import (
    FALLBACK,
    LAST_CHUNK,
    NEED_MORE,
    ChunkedDecoder,
    ChunkError,
    chunk_pieces,
    parse_response_head,
)
from pyproxy.http.messages import ResponseHead
from pyproxy.server.flow import WriteGate

if TYPE_CHECKING:  # pragma: no cover
    from pyproxy.upstream.pool import ConnectionPool

log = logging.getLogger("pyproxy.upstream")
# One poll object for every probe (register, poll, unregister: one system call);
# poll(2), not select(2), which refuses descriptors past FD_SETSIZE.
_PROBE = select.poll()

CONNECTING = "connecting"
ACTIVE = "active"
IDLE = "idle"
CLOSED = "closed"

# where the current response is
_NO_RESPONSE = 0  # idle: nothing expected
_AWAIT_HEAD = 1  # fast path: collecting a response head
_FAST_BODY = 2  # fast path: Content-Length body, counting bytes
_H11 = 3  # h11 parses this response
_FAST_CHUNKED = 4  # fast path: chunked body (SSE streams), decoded as h11 would

# A response head larger than this is h11's problem (it rejects > 16 KiB).
_MAX_FAST_HEAD = 64 * 1024

_Response = h11.Response
_Data = h11.Data
_EndOfMessage = h11.EndOfMessage
_InformationalResponse = h11.InformationalResponse
_NEED_DATA = h11.NEED_DATA
_PAUSED = h11.PAUSED
_DONE = h11.DONE


class ExchangeListener:
    """What a connection reports to the request it currently carries."""

    def on_response(self, head: ResponseHead) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def on_interim(self, head: ResponseHead) -> None:
        """A 1xx before the final response (RFC 9110 §15.2); ignored unless relayed."""

    def on_body(self, data: bytes) -> None:  # pragma: no cover
        raise NotImplementedError

    def on_flush(self) -> None:  # pragma: no cover
        """End of one read from the upstream: push what was relayed to the client."""
        raise NotImplementedError

    def on_end(self) -> None:  # pragma: no cover
        raise NotImplementedError

    def on_error(self, exc: ProxyError) -> None:  # pragma: no cover
        raise NotImplementedError


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "pool",
        "loop",
        "transport",
        "state",
        "listener",
        "idle_since",
        "requests_started",
        "request_sent",
        "request_complete",
        "response_started",
        "last_read",
        "read_timeout",
        "_write_gate",
        "_timer",
        "_reading_paused",
        "_eof",
        "_mode",
        "_buf",
        "_body_left",
        "_method",
        "_chunked",
        "_keep_alive",
        "_h11",
        "_chunks",
        "_paused_since",
        "_probe_fd",
    )

    def __init__(self, pool: "ConnectionPool", loop: asyncio.AbstractEventLoop, read_timeout: float) -> None:
        self.pool = pool
        self.loop = loop
        self.transport: Optional[asyncio.Transport] = None
        self.state = CONNECTING
        self.listener: Optional[ExchangeListener] = None
        self.idle_since = 0.0
        self.requests_started = 0
        self.request_sent = False
        self.request_complete = False
        self.response_started = False
        self.last_read = 0.0
        self.read_timeout = read_timeout
        self._write_gate = WriteGate(loop)
        self._timer: Optional[asyncio.TimerHandle] = None
        self._reading_paused = False
        self._eof = False
        self._mode = _NO_RESPONSE
        self._buf = b""
        self._body_left = 0
        self._method = b""
        self._chunked = False
        self._keep_alive = True
        self._h11: Optional[h11.Connection] = None
        self._chunks: Optional[ChunkedDecoder] = None
        self._paused_since = 0.0
        self._probe_fd = -1  # the socket's fd, for peer_closed (cleartext only)

    # --- asyncio callbacks ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # TCP_NODELAY (an SSE event must not wait for Nagle) is the loop's: both set it
        # on every TCP transport, TLS ones included.
        sock = transport.get_extra_info("socket")
        if sock is not None and transport.get_extra_info("sslcontext") is None:
            # Over TLS a readable socket may only hold a session ticket: not a sign
            # of a closed peer, so only cleartext connections are probed.
            self._probe_fd = sock.fileno()

    def peer_closed(self) -> bool:
        """Whether an idle connection's socket is readable -- the peer's FIN (or RST,
        or stray bytes) is waiting that the loop has not yet delivered. Nothing may
        arrive on an idle connection (RFC 9112 §9.3), so readable means unusable.
        One poll(2) with no wait, as urllib3's is_connection_dropped: it narrows the
        race of RFC 9112 §9.3.1 for requests that cannot be retried once written."""
        fd = self._probe_fd
        if fd < 0:
            return False
        _PROBE.register(fd, select.POLLIN)
        try:
            return bool(_PROBE.poll(0))
        finally:
            _PROBE.unregister(fd)

    def data_received(self, data: bytes) -> None:
        self.last_read = self.loop.time()
        listener = self.listener
        if listener is None:
            # Nothing may arrive on an idle connection (RFC 9112 §9.3 has no
            # unsolicited responses): the byte stream can no longer be trusted.
            self.close()
            return
        mode = self._mode
        if mode == _FAST_BODY:
            self._relay_body(data)
        elif mode == _FAST_CHUNKED:
            self._relay_chunks(data)
        elif mode == _AWAIT_HEAD:
            self._read_head(data)
        else:
            self._h11.receive_data(data)  # type: ignore[union-attr]
            self._process_h11()
        listener = self.listener
        if listener is not None:
            listener.on_flush()

    def eof_received(self) -> Optional[bool]:
        self._eof = True
        if self.listener is None:
            # The upstream closed an idle keep-alive connection: stale, drop it
            # now so the pool never hands it out.
            self.close()
            return False
        if self._mode == _H11:
            # A close-delimited body ends here (RFC 9112 §6.3 ¶8); h11 decides.
            self._h11.receive_data(b"")  # type: ignore[union-attr]
            self._process_h11()
        else:
            self._fail(self._disconnected())
        return False

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        previous = self.state
        self.state = CLOSED
        self._cancel_timer()
        self._write_gate.release_with(ConnectionResetError("upstream connection lost"))
        if self.listener is not None:
            self._fail(self._disconnected())
        if previous != CLOSED:
            self.pool.on_connection_closed(self)

    def pause_writing(self) -> None:
        self._write_gate.pause()

    def resume_writing(self) -> None:
        self._write_gate.resume()

    # --- the fast path: Content-Length responses ----------------------------------

    def _read_head(self, data: bytes) -> None:
        if self._buf:
            data = self._buf + data
            self._buf = b""
        head = parse_response_head(data, self._method)
        if head is NEED_MORE:
            if len(data) > _MAX_FAST_HEAD:
                self._use_h11(data)
            else:
                self._buf = data
            return
        if head is FALLBACK:
            self._use_h11(data)
            return
        self.response_started = True
        self._keep_alive = head.keep_alive  # type: ignore[union-attr]
        self._body_left = head.content_length  # type: ignore[union-attr]
        self.listener.on_response(ResponseHead(head.status, head.reason, head.headers))  # type: ignore
        if self.listener is None:
            return  # the listener let go of the response (a gateway retry elsewhere): closed
        rest = data[head.head_length :]  # type: ignore[union-attr]
        if self._body_left < 0:
            self._mode = _FAST_CHUNKED
            self._chunks = ChunkedDecoder()
            if rest:
                self._relay_chunks(rest)
            return
        self._mode = _FAST_BODY
        if self._body_left == 0:
            if rest:
                self._keep_alive = False  # bytes after the message: not trustworthy
            self._response_complete()
        elif rest:
            self._relay_body(rest)

    def _relay_body(self, data: bytes) -> None:
        left = self._body_left
        size = len(data)
        if size < left:
            self._body_left = left - size
            self.listener.on_body(data)  # type: ignore[union-attr]
            return
        if size > left:
            # More than Content-Length announced (RFC 9112 §6.3): relay what
            # was declared, never reuse the connection.
            self._keep_alive = False
            data = data[:left]
        self._body_left = 0
        self.listener.on_body(data)  # type: ignore[union-attr]
        self._response_complete()

    def _relay_chunks(self, data: bytes) -> None:
        decoder = self._chunks
        assert decoder is not None
        try:
            pieces = decoder.feed(data)
        except ChunkError as exc:
            self._fail(UpstreamProtocolError(f"invalid response from upstream: {exc}"))
            return
        listener = self.listener
        for piece in pieces:
            listener.on_body(piece)  # type: ignore[union-attr]
        if decoder.done:
            if decoder.extra:
                self._keep_alive = False  # bytes after the message: not trustworthy
            self._chunks = None
            self._response_complete()

    # --- the h11 path: every other response ---------------------------------------

    def _use_h11(self, data: bytes) -> None:
        conn = h11.Connection(h11.CLIENT)
        # h11 must know the request method (HEAD has no body) but not its
        # body, which this connection frames itself: tell it a bodiless one.
        conn.send(h11.Request(method=self._method, target="/", headers=[("host", "upstream")]))
        conn.send(_EndOfMessage())
        self._h11 = conn
        self._mode = _H11
        conn.receive_data(data)
        self._process_h11()

    def _process_h11(self) -> None:
        conn = self._h11
        assert conn is not None
        while self.listener is not None:
            try:
                event: Any = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if conn.their_state is h11.ERROR and self._eof:
                    # EOF where a response (or the rest of one) was due: the
                    # upstream went away, it did not speak bad HTTP.
                    self._fail(self._disconnected())
                else:
                    self._fail(UpstreamProtocolError(f"invalid response from upstream: {exc}"))
                return
            kind = type(event)
            if kind is _Data:
                self.listener.on_body(event.data)
            elif kind is _Response:
                self.response_started = True
                self.listener.on_response(ResponseHead(event.status_code, event.reason, list(event.headers)))
            elif kind is _EndOfMessage:
                self._keep_alive = conn.their_state is _DONE and not conn.trailing_data[0]
                self._response_complete()
                return
            elif event is _NEED_DATA or event is _PAUSED:
                return
            elif kind is _InformationalResponse:
                # RFC 9110 §15.2: a proxy forwards 1xx responses it did not ask for.
                self.listener.on_interim(ResponseHead(event.status_code, event.reason, list(event.headers)))
            else:  # ConnectionClosed before the end: truncation
                self._fail(self._disconnected())
                return

    # --- endings ---------------------------------------------------------------------

    def _disconnected(self) -> UpstreamDisconnected:
        return UpstreamDisconnected(
            "upstream closed the connection before completing the response"
            if self.response_started
            else "upstream closed the connection without a response",
            request_sent=self.request_sent,
            reused=self.requests_started > 1,
        )

    def _response_complete(self) -> None:
        listener = self.listener
        self.listener = None
        # The read-timeout timer is left to fire (it re-arms only while an exchange is
        # on): cancelling it per response and making a new one per request cost a
        # call_later and a cancelled handle -- kept in the loop's heap for the whole
        # --read-timeout -- per request.
        self._mode = _NO_RESPONSE
        self._h11 = None
        self._chunks = None
        reusable = self._keep_alive and self.request_complete and not self._eof
        if listener is not None:
            listener.on_end()
        if reusable and self.state == ACTIVE and not self.transport.is_closing():  # type: ignore[union-attr]
            if self._reading_paused:
                self.resume_reading()
            self.state = IDLE
            self.pool.release(self)
        else:
            self.close()

    def _fail(self, exc: ProxyError) -> None:
        listener = self.listener
        self.listener = None
        self.close()
        if listener is not None:
            listener.on_error(exc)

    # --- used by the exchange ------------------------------------------------------------

    def start_exchange(
        self,
        listener: ExchangeListener,
        method: bytes,
        head: bytes,
        chunked: bool,
        body: Optional[List[bytes]] = None,
        end: bool = False,
    ) -> None:
        """Bind to a request and write its head (and body, when already complete).

        Raises UpstreamDisconnected(request_sent=False) if the socket is already gone.
        """
        transport = self.transport
        if self.state != ACTIVE or transport is None or transport.is_closing():
            raise UpstreamDisconnected("pooled upstream connection closed before use", request_sent=False, reused=True)
        self.listener = listener
        self.requests_started += 1
        self.response_started = False
        self.request_complete = False
        self._method = method
        self._chunked = chunked
        self._keep_alive = True
        self._mode = _AWAIT_HEAD
        self._buf = b""
        pieces = [head]
        if body:
            self._frame(body, pieces)
        if end:
            if chunked:
                pieces.append(LAST_CHUNK)
            self.request_complete = True
        if len(pieces) == 1:
            transport.write(head)
        else:
            transport.writelines(pieces)
        self.request_sent = True
        self.last_read = self.loop.time()
        if self._timer is None:
            self._timer = self.loop.call_later(self.read_timeout, self._check_read_timeout)

    def _frame(self, chunks: List[bytes], out: List[bytes]) -> None:
        if self._chunked:
            for chunk in chunks:
                if chunk:
                    out += chunk_pieces(chunk)
        else:
            out += chunks

    def send_body_chunks(self, chunks: List[bytes]) -> None:
        """Write body chunks, framed, without copying them."""
        if self.state != ACTIVE or self.listener is None or self.request_complete:
            return
        pieces: List[bytes] = []
        self._frame(chunks, pieces)
        self.transport.writelines(pieces)  # type: ignore[union-attr]

    def send_end(self) -> None:
        if self.state != ACTIVE or self.request_complete:
            return
        self.request_complete = True
        if self._chunked:
            self.transport.write(LAST_CHUNK)  # type: ignore[union-attr]

    async def drain(self) -> None:
        await self._write_gate.drain()

    @property
    def write_paused(self) -> bool:
        return self._write_gate.paused

    def pause_reading(self) -> None:
        """The client is slow: stop reading the response (backpressure)."""
        if not self._reading_paused and self.transport is not None and not self.transport.is_closing():
            self._reading_paused = True
            self._paused_since = self.loop.time()
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self.last_read = self.loop.time()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def detach(self) -> None:
        """The request no longer wants this connection (client gone): close it now."""
        self.listener = None
        self.abort()

    def close(self) -> None:
        if self.state != CLOSED:
            previous = self.state
            self.state = CLOSED
            self._cancel_timer()
            if self.transport is not None:
                self.transport.close()
            if previous != CONNECTING:
                self.pool.on_connection_closed(self)

    def abort(self) -> None:
        """Close at once, dropping unsent data: the upstream must stop work now."""
        transport = self.transport
        self.close()
        if transport is not None:
            transport.abort()

    def is_expired(self, now: float, expiry: float) -> bool:
        return now - self.idle_since >= expiry

    # --- read timeout: one lazy timer per connection, re-armed only when it fires ---

    def _check_read_timeout(self) -> None:
        self._timer = None
        if self.listener is None or self.state != ACTIVE:
            return  # idle: the next exchange arms it again
        if self._reading_paused:
            # Waiting on the client, not the upstream: not the upstream's
            # silence. But a client that reads nothing for as long holds this
            # connection (and an LLM's generation) hostage: give up on it, as
            # nginx's send_timeout does.
            stalled_for = self.loop.time() - self._paused_since
            if stalled_for >= self.read_timeout:
                self._fail(ClientStalled(f"client read nothing for {self.read_timeout:g} s"))
                return
            self._timer = self.loop.call_later(self.read_timeout - stalled_for, self._check_read_timeout)
            return
        silent_for = self.loop.time() - self.last_read
        if silent_for >= self.read_timeout:
            self._fail(UpstreamTimeout(f"upstream sent nothing for {self.read_timeout:g} s (read timeout)"))
        else:
            self._timer = self.loop.call_later(self.read_timeout - silent_for, self._check_read_timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class ReusedBufferReads:
    """Mixin for asyncio.BufferedProtocol: read into one reused buffer.

    asyncio's selector transports otherwise recv() into a fresh 256 KiB buffer
    per read, and on PyPy each call pays for that whole buffer. Measured on
    PyPy 7.3.11, small GET relay at 64 connections on one core: 19k req/s
    with a fresh 256 KiB buffer per read, 38k capping reads at 16 KiB, and
    ~35k with this reused 256 KiB buffer -- which also lifts 1 MiB downloads
    from ~0.7 to ~1.2 GB/s, as large reads stay large. Each read is copied out
    once, at its actual size. One buffer per process is safe: a read is
    copied out before the loop runs anything else, and pyproxy runs one
    event loop per process. uvloop reads into its own buffers: it gets the
    plain protocols.
    """

    __slots__ = ()
    _read_view = memoryview(bytearray(256 * 1024))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self._read_view[:nbytes]))  # type: ignore[attr-defined]


class BufferedUpstreamConnection(ReusedBufferReads, UpstreamConnection, asyncio.BufferedProtocol):
    __slots__ = ()
