"""One upstream HTTP/1.1 connection: an asyncio Protocol driving an h11 CLIENT.

States are explicit (RFC 9112 §9.3 persistence):

    CONNECTING -> ACTIVE <-> IDLE
         \\          \\         \\
          `---------> CLOSED <--'

A connection goes back to IDLE only when both h11 sides are DONE; anything
else (an error, an early response while the request body was still being
sent, a response that must close) closes it. Response events are handed to
the current *exchange* by plain method calls -- no task or future per chunk.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Any, List, Optional

import h11

from pyproxy.errors import (
    ProxyError,
    UpstreamDisconnected,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from pyproxy.server.flow import WriteGate

if TYPE_CHECKING:  # pragma: no cover
    from pyproxy.upstream.pool import ConnectionPool

log = logging.getLogger("pyproxy.upstream")

CONNECTING = "connecting"
ACTIVE = "active"
IDLE = "idle"
CLOSED = "closed"

_Request = h11.Request
_Response = h11.Response
_Data = h11.Data
_EndOfMessage = h11.EndOfMessage
_InformationalResponse = h11.InformationalResponse
_NEED_DATA = h11.NEED_DATA
_PAUSED = h11.PAUSED
_DONE = h11.DONE
_END = _EndOfMessage()


class ExchangeListener:
    """What a connection reports to the request it currently carries."""

    def on_response(self, response: h11.Response) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def on_body(self, data: bytes) -> None:  # pragma: no cover
        raise NotImplementedError

    def on_end(self) -> None:  # pragma: no cover
        raise NotImplementedError

    def on_error(self, exc: ProxyError) -> None:  # pragma: no cover
        raise NotImplementedError


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """Small writes (an SSE event) must leave at once, not wait for Nagle."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # pragma: no cover
            pass


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "pool",
        "loop",
        "h11",
        "transport",
        "state",
        "listener",
        "idle_since",
        "requests_started",
        "request_sent",
        "response_started",
        "last_read",
        "read_timeout",
        "_write_gate",
        "_timer",
        "_reading_paused",
        "_eof",
    )

    def __init__(self, pool: "ConnectionPool", loop: asyncio.AbstractEventLoop, read_timeout: float) -> None:
        self.pool = pool
        self.loop = loop
        self.h11 = h11.Connection(h11.CLIENT)
        self.transport: Optional[asyncio.Transport] = None
        self.state = CONNECTING
        self.listener: Optional[ExchangeListener] = None
        self.idle_since = 0.0
        self.requests_started = 0
        self.request_sent = False
        self.response_started = False
        self.last_read = 0.0
        self.read_timeout = read_timeout
        self._write_gate = WriteGate(loop)
        self._timer: Optional[asyncio.TimerHandle] = None
        self._reading_paused = False
        self._eof = False

    # --- asyncio callbacks ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        set_nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self.last_read = self.loop.time()
        if self.listener is None:
            # Nothing may arrive on an idle connection (RFC 9112 §9.3 allows no
            # unsolicited responses); the byte stream can no longer be trusted.
            self.close()
            return
        try:
            self.h11.receive_data(data)
        except h11.RemoteProtocolError as exc:  # pragma: no cover - h11 defers errors to next_event
            self._fail(UpstreamProtocolError(f"invalid response from upstream: {exc}"))
            return
        self._process_events()

    def eof_received(self) -> Optional[bool]:
        if self.listener is None:
            # The upstream closed an idle keep-alive connection: stale, drop it
            # now so the pool never hands it out.
            self.close()
            return False
        # A close-delimited body ends here (RFC 9112 §6.3 ¶8); h11 decides.
        self._eof = True
        try:
            self.h11.receive_data(b"")
        except h11.RemoteProtocolError:  # pragma: no cover
            pass
        self._process_events()
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

    # --- events from h11 -------------------------------------------------------

    def _process_events(self) -> None:
        conn = self.h11
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
                self.listener.on_response(event)
            elif kind is _EndOfMessage:
                self._response_complete()
                return
            elif event is _NEED_DATA or event is _PAUSED:
                return
            elif kind is _InformationalResponse:
                continue  # 1xx (RFC 9110 §15.2): not relayed; 100-continue is answered by us
            else:  # ConnectionClosed before the end: truncation
                self._fail(self._disconnected())
                return

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
        self._cancel_timer()
        reusable = self.h11.our_state is _DONE and self.h11.their_state is _DONE
        if reusable:
            try:
                self.h11.start_next_cycle()
            except h11.LocalProtocolError:  # pragma: no cover - defensive
                reusable = False
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

    # --- used by the pool and the exchange -------------------------------------

    def start_exchange(self, listener: ExchangeListener, request: h11.Request) -> None:
        """Bind to a request and write its head. Raises if the socket is already gone."""
        transport = self.transport
        if self.state != ACTIVE or transport is None or transport.is_closing():
            raise UpstreamDisconnected("pooled upstream connection closed before use", request_sent=False, reused=True)
        self.listener = listener
        self.requests_started += 1
        self.request_sent = False
        self.response_started = False
        data = self.h11.send(request)
        transport.write(data)  # type: ignore[arg-type]
        self.request_sent = True
        self.last_read = self.loop.time()
        self._timer = self.loop.call_later(self.read_timeout, self._check_read_timeout)

    def send_body_chunks(self, chunks: List[bytes]) -> None:
        """Write body chunks, framed by h11, without copying them."""
        if self.state != ACTIVE or self.listener is None or self.h11.our_state is not h11.SEND_BODY:
            return
        send = self.h11.send_with_data_passthrough
        pieces: List[bytes] = []
        for chunk in chunks:
            pieces.extend(send(_Data(data=chunk)))  # type: ignore[arg-type]
        self.transport.writelines(pieces)  # type: ignore[union-attr]

    def send_end(self) -> None:
        if self.state == ACTIVE and self.h11.our_state is h11.SEND_BODY:
            self.transport.write(self.h11.send(_END))  # type: ignore[union-attr,arg-type]
            if self.listener is None and self.h11.their_state is _DONE:  # pragma: no cover
                self.close()

    async def drain(self) -> None:
        await self._write_gate.drain()

    @property
    def write_paused(self) -> bool:
        return self._write_gate.paused

    def pause_reading(self) -> None:
        """The client is slow: stop reading the response (backpressure)."""
        if not self._reading_paused and self.transport is not None and not self.transport.is_closing():
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self.last_read = self.loop.time()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def detach(self) -> None:
        """The request no longer wants this connection (client gone): close it."""
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

    # --- read timeout: one lazy timer, re-armed only when it fires ---------------

    def _check_read_timeout(self) -> None:
        self._timer = None
        if self.listener is None or self.state != ACTIVE:
            return
        now = self.loop.time()
        if self._reading_paused:
            # Waiting on the client, not the upstream: not the upstream's silence.
            self._timer = self.loop.call_later(self.read_timeout, self._check_read_timeout)
            return
        silent_for = now - self.last_read
        if silent_for >= self.read_timeout:
            self._fail(UpstreamTimeout(f"upstream sent nothing for {self.read_timeout:g} s (read timeout)"))
        else:
            self._timer = self.loop.call_later(self.read_timeout - silent_for, self._check_read_timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def request_event(method: bytes, target: bytes, headers: List[Any]) -> h11.Request:
    return _Request(method=method, target=target, headers=headers)
