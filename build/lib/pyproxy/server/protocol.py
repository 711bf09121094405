"""The client-side protocol: bytes from a client socket -> h11 SERVER events -> the handler.

One ``ClientConnection`` per accepted socket. It owns the h11 state, the
keep-alive cycle and pipelining (h11 hands out the next request only after
the current response is complete, so responses go out in order), and answers
malformed input itself: a precise 4xx, then close (RFC 9112 §2.2). The
response side is a small API the handler's exchange calls: ``send_head``,
``send_data``, ``finish_response``, ``abort_truncated``, ``send_error``.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

import h11

from pyproxy.errors import (
    BadRequest,
    BodyTooLarge,
    HeadersTooLarge,
    MethodNotAllowed,
    ProxyError,
    VersionNotSupported,
    error_response_parts,
)
from pyproxy.http.headers import request_framing
from pyproxy.server.body import RequestBody
from pyproxy.server.flow import BODY_BUFFER_FULL, PIPELINE_WAIT, ReadGate
from pyproxy.upstream.connection import set_nodelay

if TYPE_CHECKING:  # pragma: no cover
    from pyproxy.handler import Exchange
    from pyproxy.proxy import Proxy

log = logging.getLogger("pyproxy.server")

_Request = h11.Request
_Data = h11.Data
_EndOfMessage = h11.EndOfMessage
_Response = h11.Response
_NEED_DATA = h11.NEED_DATA
_PAUSED = h11.PAUSED
_DONE = h11.DONE
_END = _EndOfMessage()
_CLOSE_HEADER = (b"connection", b"close")
_SUPPORTED_VERSIONS = frozenset({b"1.1", b"1.0"})


class ClientGone(Exception):
    """The client disconnected; nobody is left to answer."""


def _client_error(exc: h11.RemoteProtocolError, max_header_size: int) -> ProxyError:
    hint = exc.error_status_hint
    if hint == 431:
        return HeadersTooLarge(f"request head is larger than {max_header_size} bytes")
    if hint == 501:
        # h11 says 501 for any Transfer-Encoding other than exactly "chunked".
        # A front end that reads a coding differently from the back end is
        # the classic smuggling vector, so this is a malformed request to us.
        return BadRequest("malformed or unsupported Transfer-Encoding (only 'chunked' is accepted)")
    return BadRequest(f"malformed request: {exc}")


def raw_error_response(exc: ProxyError) -> bytes:
    """Error answer written without h11, for when h11's state is already broken."""
    status, headers, body = error_response_parts(exc)
    try:
        reason = HTTPStatus(status).phrase.encode("ascii")
    except ValueError:  # pragma: no cover
        reason = b""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    lines.extend(b"%s: %s\r\n" % (name, value) for name, value in headers)
    lines.append(b"connection: close\r\n\r\n")
    lines.append(body)
    return b"".join(lines)


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "proxy",
        "loop",
        "h11",
        "transport",
        "read_gate",
        "client_ip",
        "body",
        "task",
        "exchange",
        "response_started",
        "closed",
        "must_close",
        "last_activity",
        "_timer",
        "_max_body",
        "_write_paused",
    )

    def __init__(self, proxy: "Proxy") -> None:
        self.proxy = proxy
        self.loop = proxy.loop
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=proxy.settings.max_header_size)
        self.transport: Optional[asyncio.Transport] = None
        self.read_gate: Optional[ReadGate] = None
        self.client_ip = b""
        self.body: Optional[RequestBody] = None
        self.task: Optional[asyncio.Task[None]] = None
        self.exchange: Optional["Exchange"] = None
        self.response_started = False
        self.closed = False
        self.must_close = False
        self.last_activity = 0.0
        self._timer: Optional[asyncio.TimerHandle] = None
        self._max_body = proxy.settings.max_body_size
        self._write_paused = False

    # --- asyncio callbacks -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.read_gate = ReadGate(self.transport)  # type: ignore[arg-type]
        set_nodelay(transport)
        peer = transport.get_extra_info("peername")
        self.client_ip = str(peer[0]).encode("ascii") if peer else b"unknown"
        self.proxy.connection_opened(self)
        self.last_activity = self.loop.time()
        self._timer = self.loop.call_later(self.proxy.settings.client_timeout, self._check_idle)

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        self.h11.receive_data(data)
        self._process()

    def eof_received(self) -> Optional[bool]:
        # A client that half-closes is treated as gone (as nginx does with
        # proxy_ignore_client_abort off): an LLM must stop generating for it.
        return False

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.body is not None and not self.body.complete:
            self.body.fail(ClientGone())
        exchange = self.exchange
        self.exchange = None
        if exchange is not None:
            exchange.client_gone()
        task = self.task
        self.task = None
        if task is not None and not task.done():
            task.cancel()
        self.proxy.connection_closed(self)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.exchange is not None:
            self.exchange.conn.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.exchange is not None:
            self.exchange.conn.resume_reading()

    # --- request side --------------------------------------------------------------------

    def _process(self) -> None:
        conn = self.h11
        while not self.closed:
            try:
                event: Any = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._on_bad_input(_client_error(exc, self.proxy.settings.max_header_size))
                return
            kind = type(event)
            if kind is _Data:
                body = self.body
                if body is not None:
                    if body.received + len(event.data) > self._max_body:
                        self._on_bad_input(BodyTooLarge(f"request body is larger than {self._max_body} bytes"))
                        return
                    body.feed(event.data)
            elif kind is _EndOfMessage:
                if self.body is not None:
                    self.body.feed_eof()
            elif event is _NEED_DATA:
                return
            elif event is _PAUSED:
                # A pipelined request waits for the current response. Keep
                # reading (to notice a client that leaves) unless it piles up.
                if len(conn.trailing_data[0]) > self.proxy.settings.max_header_size:
                    self.read_gate.pause(PIPELINE_WAIT)  # type: ignore[union-attr]
                return
            elif kind is _Request:
                self._on_request(event)
            else:  # ConnectionClosed: the client sent EOF between requests
                self.close()
                return

    def _on_request(self, request: h11.Request) -> None:
        try:
            if request.http_version not in _SUPPORTED_VERSIONS:
                raise VersionNotSupported(f"HTTP/{request.http_version.decode()} is not supported")
            # h11 bounds only a head that arrives in pieces; one that arrives
            # whole is measured here, so the limit holds either way.
            head_size = len(request.target) + len(request.method) + 14
            for name, value in request.headers:
                head_size += len(name) + len(value) + 4
            if head_size > self.proxy.settings.max_header_size:
                raise HeadersTooLarge(f"request head is larger than {self.proxy.settings.max_header_size} bytes")
            if request.method == b"CONNECT":
                raise MethodNotAllowed("CONNECT is not supported by a reverse proxy")
            framing = request_framing(request.headers)
            if framing.content_length is not None and framing.content_length > self._max_body:
                raise BodyTooLarge(
                    f"request body of {framing.content_length} bytes is larger than {self._max_body} bytes"
                )
        except ProxyError as exc:
            self._on_bad_input(exc)
            return
        gate = self.read_gate
        self.body = RequestBody(
            self.loop,
            lambda: gate.pause(BODY_BUFFER_FULL),  # type: ignore[union-attr]
            lambda: gate.resume(BODY_BUFFER_FULL),  # type: ignore[union-attr]
        )
        if not framing.has_body:
            # h11 emits EndOfMessage right away; nothing to wait for.
            pass
        self.task = self.loop.create_task(self.proxy.handler.handle(self, request, self.body, framing))

    def _on_bad_input(self, exc: ProxyError) -> None:
        """Malformed input: never forwarded; answered (if we still can) and closed."""
        self.must_close = True
        if self.task is not None and self.body is not None:
            # A handler owns this request: it answers (or truncates) and
            # aborts any upstream exchange the body was flowing into.
            self.body.fail(exc)
            return
        if self.response_started:  # pragma: no cover - no handler means no response
            self.close()
            return
        self.proxy.stats_client_errors += 1
        if self.transport is not None and not self.closed:
            self.transport.write(raw_error_response(exc))
        self.close()

    # --- response side (called by the handler and its exchange) ---------------------------

    def send_continue(self) -> None:
        if self.h11.client_is_waiting_for_100_continue and not self.closed:
            self.transport.write(self.h11.send(h11.InformationalResponse(status_code=100, headers=[])))  # type: ignore

    def send_head(self, status: int, headers: List[Tuple[bytes, bytes]], reason: bytes = b"") -> None:
        self.response_started = True
        if self.closed:
            return
        if self.must_close or self.proxy.draining:
            headers.append(_CLOSE_HEADER)
        self.transport.write(self.h11.send(_Response(status_code=status, headers=headers, reason=reason)))  # type: ignore

    def send_data(self, data: bytes) -> None:
        if not self.closed:
            self.transport.writelines(self.h11.send_with_data_passthrough(_Data(data=data)))  # type: ignore

    def finish_response(self) -> None:
        """The response is complete: write its end, then start the next keep-alive cycle."""
        self.exchange = None
        self.task = None
        if self.closed:
            return
        self.transport.write(self.h11.send(_END))  # type: ignore
        self.body = None
        self.response_started = False
        conn = self.h11
        if (
            self.must_close
            or self.proxy.draining
            or conn.our_state is not _DONE
            or conn.their_state is not _DONE  # request body unread: cannot find the next request
        ):
            self.close()
            return
        conn.start_next_cycle()
        self.last_activity = self.loop.time()
        self.read_gate.resume(PIPELINE_WAIT)  # type: ignore[union-attr]
        self._process()

    def abort_truncated(self) -> None:
        """The upstream broke mid-body: end the connection without completing the message,
        so the client sees a truncated response, never a fake complete one."""
        self.exchange = None
        self.task = None
        self.close()

    def send_error(self, exc: ProxyError) -> None:
        if self.closed:
            return
        if self.response_started:
            self.abort_truncated()
            return
        if isinstance(exc, BadRequest) or self.h11.our_state is not h11.SEND_RESPONSE:
            self.exchange = None
            self.task = None
            self.proxy.stats_client_errors += isinstance(exc, BadRequest)
            self.transport.write(raw_error_response(exc))  # type: ignore[union-attr]
            self.close()
            return
        status, headers, body = error_response_parts(exc)
        self.send_head(status, headers)
        self.send_data(body)
        self.finish_response()

    # --- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def begin_drain(self) -> None:
        """Shutdown: an idle connection closes now, a busy one after its response."""
        self.must_close = True
        if self.task is None and not self.response_started:
            self.close()

    def _check_idle(self) -> None:
        self._timer = None
        if self.closed:
            return
        timeout = self.proxy.settings.client_timeout
        if self.task is None:
            idle_for = self.loop.time() - self.last_activity
            if idle_for >= timeout:
                # Idle keep-alive, or a head that never completed (slowloris).
                self.close()
                return
            timeout -= idle_for
        self._timer = self.loop.call_later(timeout, self._check_idle)
