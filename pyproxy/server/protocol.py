"""The client-side protocol: bytes from a client socket -> request heads and body -> the handler.

One ``ClientConnection`` per accepted socket. Each request/response *cycle*
is read by one of two parsers:

* the fast path (``pyproxy.http.fastpath``) for the common shape -- an
  HTTP/1.1 head framed by Content-Length or bodiless -- whose body is then
  counted off the byte stream;
* h11, for everything else, from the cycle's first byte (chunked bodies,
  HTTP/1.0, Expect, anything unusual or malformed). h11 stays the judge of
  what is malformed.

Either way the connection owns the keep-alive cycle and pipelining (the next
request is read only after the current response is complete, so responses
go out in order), and answers malformed input itself: a precise 4xx, then
close (RFC 9112 §2.2). Response writes are gathered and flushed once per
upstream read, so a small response leaves in one write.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from time import perf_counter
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

import h11

from pyproxy.errors import (
    BadRequest,
    BodyTooLarge,
    HeadersTooLarge,
    MethodNotAllowed,
    ProxyError,
    RequestTimeout,
    VersionNotSupported,
    error_response_parts,
)
from pyproxy.http.compression import GzipStream, accepts_gzip, gzip_headers, should_compress
from pyproxy.http.fastpath import (
    FALLBACK,
    LAST_CHUNK,
    NEED_MORE,
    chunk_pieces,
    parse_request_head,
    serialize_response_head,
)
from pyproxy.http.headers import RequestFraming, request_framing
from pyproxy.http.messages import SAFE_METHODS, RequestHead
from pyproxy.http.sse import PING, STREAM_START, is_event_stream, keepalive_due, stream_tail
from pyproxy.server.body import RequestBody
from pyproxy.server.flow import BODY_BUFFER_FULL, PIPELINE_WAIT, ReadGate
from pyproxy.sink import ClientGone, abandon
from pyproxy.upstream.connection import ReusedBufferReads

if TYPE_CHECKING:  # pragma: no cover
    from typing import Protocol

    from pyproxy.proxy import Proxy

    class ResponseSource(Protocol):
        """Where a client's response comes from: an upstream exchange, or a place on a
        coalesced fetch. It is told when the client goes away or stops reading."""

        def client_gone(self) -> None: ...

        def client_paused(self) -> None: ...

        def client_resumed(self) -> None: ...


log = logging.getLogger("pyproxy.server")

# which parser reads the current cycle, and how far it got
_FAST_HEAD = 0  # waiting for a request head
_FAST_BODY = 1  # counting off a Content-Length body
_FAST_DONE = 2  # request read; later bytes are the next (pipelined) request
_H11 = 3  # h11 reads this cycle

# how the current response body is framed to the client (fast cycles)
_FRAME_NONE = 0  # HEAD, 204, 304: no body
_FRAME_LENGTH = 1
_FRAME_CHUNKED = 2

_Request = h11.Request
_Data = h11.Data
_EndOfMessage = h11.EndOfMessage
_NEED_DATA = h11.NEED_DATA
_PAUSED = h11.PAUSED
_DONE = h11.DONE
_END = _EndOfMessage()
_CLOSE_HEADER = (b"connection", b"close")
_CHUNKED_HEADER = (b"transfer-encoding", b"chunked")
_SUPPORTED_VERSIONS = frozenset({b"1.1", b"1.0"})
_NO_BODY_FRAMING = RequestFraming(None, False)
# After an error answer, how long the client's further bytes are read and dropped
# before the connection is closed for good (see close_lingering).
LINGER_SECONDS = 2.0


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
    """An error answer that ends the connection, written without any parser state."""
    status, headers, body = error_response_parts(exc)
    try:
        reason = HTTPStatus(status).phrase.encode("ascii")
    except ValueError:  # pragma: no cover
        reason = b""
    headers.append(_CLOSE_HEADER)
    return serialize_response_head(status, reason, headers) + body


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
        "busy",
        "exchange",
        "response_started",
        "closed",
        "must_close",
        "last_activity",
        "_timer",
        "sweep_slot",
        "_head_started",
        "_body_mark_at",
        "_body_mark_bytes",
        "_max_body",
        "_max_head",
        "_write_paused",
        "_mode",
        "_buf",
        "_body_left",
        "_keep_alive",
        "_method",
        "_framing",
        "_out",
        # the request being answered, for metrics, the access log and Server-Timing
        "started_at",
        "req_target",
        "request_id",
        "resp_status",
        "bytes_out",
        "upstream_ttfb",
        "cache_status",
        "dedup_status",
        "upstream_name",
        "attempts",
        "unsafe_request",
        "_observing",
        "accepts_gzip",
        "_gzip",
        # --sse-keepalive on the event stream being answered (see pyproxy.http.sse)
        "_sse_every",
        "_sse_last",
        "_sse_tail",
        # [auth] mode = "keys": the request's key, its admission, the usage meter fed
        "client_key",
        "admitted",
        "meter",
    )

    def __init__(self, proxy: "Proxy") -> None:
        self.proxy = proxy
        self.loop = proxy.loop
        self.h11: Optional[h11.Connection] = None
        self.transport: Optional[asyncio.Transport] = None
        self.read_gate: Optional[ReadGate] = None
        self.client_ip = b""
        self.body: Optional[RequestBody] = None
        self.task: Optional[asyncio.Task[None]] = None
        self.busy = False  # a request is in flight (with or without a task)
        self.exchange: Optional["ResponseSource"] = None
        self.response_started = False
        self.closed = False
        self.must_close = False
        self.last_activity = 0.0
        self._timer: Optional[asyncio.TimerHandle] = None  # a deadline that needs precision
        self.sweep_slot: Optional[int] = None  # or its place in proxy.idle (one that does not)
        # when the first byte of a request head still incomplete arrived (0: none)
        self._head_started = 0.0
        # the body rate window: since when, and how much of the body had arrived then
        self._body_mark_at = 0.0
        self._body_mark_bytes = 0
        self._max_body = proxy.settings.max_body_size
        self._max_head = proxy.settings.max_header_size
        self._write_paused = False
        self._mode = _FAST_HEAD
        self._buf = b""
        self._body_left = 0
        self._keep_alive = True
        self._method = b""
        self._framing = _FRAME_NONE
        self._out: List[bytes] = []
        self.started_at = 0.0
        self.req_target = b""
        self.request_id = b""
        self.resp_status = 0
        self.bytes_out = 0
        self.upstream_ttfb = -1.0  # seconds from sending upstream to its response head; -1: none
        self.cache_status = b"-"
        self.dedup_status = b"-"
        self.upstream_name = ""  # the gateway's upstream that answered ("" : none, or the one --upstream)
        self.attempts = 0
        self.unsafe_request: Optional[RequestHead] = None
        self._observing = False
        self.accepts_gzip = False  # the current request's client takes gzip (and it is on)
        self._gzip: Optional[GzipStream] = None
        self._sse_every = 0.0  # seconds of silence a ping answers; 0: not an event stream, or off
        self._sse_last = 0.0  # loop time the stream last carried anything
        self._sse_tail = STREAM_START  # its last bytes: is it between two events?
        self.client_key: Any = None  # pyproxy.gateway.keys.ClientKey of the request
        self.admitted: Any = None  # pyproxy.gateway.admission.Admitted, until the request ends
        self.meter: Any = None  # the UsageMeter its response body feeds

    # --- asyncio callbacks -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.read_gate = ReadGate(self.transport)  # type: ignore[arg-type]
        # No TCP_NODELAY call: both loops set it on every TCP transport (asyncio since
        # 3.6, uvloop too), and asking uvloop for the socket keeps ~70 bytes per connection.
        peer = transport.get_extra_info("peername")
        self.client_ip = str(peer[0]).encode("ascii") if peer else b"unknown"
        self.proxy.connection_opened(self)
        now = self.last_activity = self.loop.time()
        self.proxy.idle.at(now + self.proxy.settings.client_timeout, self)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return  # lingering after an error answer: what the client still sends is dropped
        self.last_activity = self.loop.time()
        if self._mode == _H11:
            self.h11.receive_data(data)  # type: ignore[union-attr]
            self._process_h11()
            return
        if self._buf:
            data = self._buf + data
            self._buf = b""
        self._consume(data)

    def eof_received(self) -> Optional[bool]:
        # A client that half-closes is treated as gone (as nginx does with
        # proxy_ignore_client_abort off): an LLM must stop generating for it.
        return False

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.proxy.idle.forget(self)
        if self._observing:
            # nginx's 499: the client closed the connection before the response was complete.
            self._observe(self.resp_status if self.response_started else 499)
        if self.body is not None and not self.body.complete:
            self.body.fail(ClientGone())
        abandon(self)
        self.proxy.connection_closed(self)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.exchange is not None:
            self.exchange.client_paused()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.exchange is not None:
            self.exchange.client_resumed()

    # --- request side: the fast path ----------------------------------------------------

    def _consume(self, data: bytes) -> None:
        while data and not self.closed:
            mode = self._mode
            if mode == _FAST_BODY:
                left = self._body_left
                if len(data) <= left:
                    chunk, data = data, b""
                else:
                    chunk, data = data[:left], data[left:]
                self._on_body_bytes(chunk)
            elif mode == _FAST_HEAD:
                head = parse_request_head(data)
                if head is NEED_MORE:
                    if len(data) > self._max_head:
                        self._on_bad_input(HeadersTooLarge(f"request head is larger than {self._max_head} bytes"))
                    else:
                        self._buf = data
                        self._head_pending()
                    return
                if head is FALLBACK:
                    self._start_h11(data)
                    return
                end = head.head_length  # type: ignore[union-attr]
                if end > self._max_head:
                    self._on_bad_input(HeadersTooLarge(f"request head is larger than {self._max_head} bytes"))
                    return
                data = data[end:] if len(data) > end else b""
                self._keep_alive = head.keep_alive  # type: ignore[union-attr]
                length = head.content_length  # type: ignore[union-attr]
                framing = RequestFraming(length, False) if length else _NO_BODY_FRAMING
                request = RequestHead(head.method, head.target, head.headers)  # type: ignore[union-attr]
                if not self._begin_request(request, framing):
                    return
                if length:
                    # Body bytes already here go in before the handler starts, so
                    # a small POST is as complete as a GET and needs no task.
                    self._body_left = length
                    self._mode = _FAST_BODY
                    if data:
                        if len(data) <= length:
                            chunk, data = data, b""
                        else:
                            chunk, data = data[:length], data[length:]
                        self._on_body_bytes(chunk)
                    if self._mode == _FAST_BODY:
                        self._body_pending()
                else:
                    self.body.feed_eof()  # type: ignore[union-attr]
                    self._mode = _FAST_DONE
                try:
                    self.proxy.handler.start(self, request, self.body, framing)  # type: ignore[arg-type]
                except Exception:  # a bug: the client still gets an answer, the log the traceback
                    self._internal_error()
            else:  # _FAST_DONE: a pipelined request waits for the current response
                self._buf = data
                if len(data) > self._max_head:
                    self.read_gate.pause(PIPELINE_WAIT)  # type: ignore[union-attr]
                return

    def _on_body_bytes(self, chunk: bytes) -> None:
        body = self.body
        assert body is not None
        self._body_left -= len(chunk)
        body.feed(chunk)
        if not self._body_left:
            body.feed_eof()
            self._mode = _FAST_DONE

    # --- request side: h11 -------------------------------------------------------------

    def _start_h11(self, data: bytes) -> None:
        self._mode = _H11
        conn = self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_head)
        conn.receive_data(data)
        self._process_h11()

    def _process_h11(self) -> None:
        conn = self.h11
        assert conn is not None
        while not self.closed:
            try:
                event: Any = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._on_bad_input(_client_error(exc, self._max_head))
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
                if not self.busy:
                    self._head_pending()  # h11 holds part of a request head
                return
            elif event is _PAUSED:
                # A pipelined request waits for the current response. Keep
                # reading (to notice a client that leaves) unless it piles up.
                if len(conn.trailing_data[0]) > self._max_head:
                    self.read_gate.pause(PIPELINE_WAIT)  # type: ignore[union-attr]
                return
            elif kind is _Request:
                self._on_h11_request(event)
            else:  # ConnectionClosed: the client sent EOF between requests
                self.close()
                return

    def _on_h11_request(self, event: h11.Request) -> None:
        request = RequestHead(event.method, event.target, list(event.headers), event.http_version)
        try:
            if request.http_version not in _SUPPORTED_VERSIONS:
                raise VersionNotSupported(f"HTTP/{request.http_version.decode()} is not supported")
            # h11 bounds only a head that arrives in pieces; one that arrives
            # whole is measured here, so the limit holds either way.
            head_size = len(request.target) + len(request.method) + 14
            for name, value in request.headers:
                head_size += len(name) + len(value) + 4
            if head_size > self._max_head:
                raise HeadersTooLarge(f"request head is larger than {self._max_head} bytes")
            if request.method == b"CONNECT":
                raise MethodNotAllowed("CONNECT is not supported by a reverse proxy")
            framing = request_framing(request.headers)
        except ProxyError as exc:
            self._on_bad_input(exc)
            return
        if self._begin_request(request, framing):
            if framing.has_body:
                self._body_pending()
            self.task = self.loop.create_task(self._handle(request, framing))

    async def _handle(self, request: RequestHead, framing: RequestFraming) -> None:
        try:
            await self.proxy.handler.handle(self, request, self.body, framing)  # type: ignore[arg-type]
        except Exception:  # a bug (cancellation is not an Exception): answered all the same
            self._internal_error()

    def _internal_error(self) -> None:
        log.exception("unexpected error while proxying %s", self.req_target[:200].decode("latin-1"))
        self.send_error(ProxyError("internal proxy error"))

    # --- both paths ----------------------------------------------------------------------

    def _begin_request(self, request: RequestHead, framing: RequestFraming) -> bool:
        if framing.content_length is not None and framing.content_length > self._max_body:
            self._on_bad_input(
                BodyTooLarge(f"request body of {framing.content_length} bytes is larger than {self._max_body} bytes")
            )
            return False
        self._method = request.method
        self.busy = True
        self._head_started = 0.0
        self.body = RequestBody(self.loop, self._body_full, self._body_drained)
        self.started_at = perf_counter()  # durations: high resolution (uvloop's loop.time() is in ms)
        self.req_target = request.target
        self.request_id = b""
        self.resp_status = 0
        self.bytes_out = 0
        self.upstream_ttfb = -1.0
        self.cache_status = self.dedup_status = b"-"
        self.upstream_name = ""
        self.attempts = 0
        self.client_key = None
        # An unsafe request's answer may invalidate cached entries (RFC 9111 §4.4).
        self.unsafe_request = request if self.proxy.cache is not None and request.method not in SAFE_METHODS else None
        self._observing = True
        settings = self.proxy.settings
        self.accepts_gzip = settings.gzip and request.method != b"HEAD" and accepts_gzip(request.headers)
        return True

    def _body_full(self) -> None:
        self.read_gate.pause(BODY_BUFFER_FULL)  # type: ignore[union-attr]

    def _body_drained(self) -> None:
        if self.read_gate.reasons & BODY_BUFFER_FULL:  # type: ignore[union-attr]
            # Reading resumes after we held the client back: its rate window starts now.
            self._body_mark_at = self.loop.time()
            self._body_mark_bytes = self.body.received if self.body is not None else 0
        self.read_gate.resume(BODY_BUFFER_FULL)  # type: ignore[union-attr]

    def _on_bad_input(self, exc: ProxyError) -> None:
        """Malformed input: never forwarded; answered (if we still can) and closed."""
        self.must_close = True
        if exc.limit:
            self.proxy.metrics.limit_fired(exc.limit)
        if self.busy:
            if self.task is not None and self.body is not None:
                # A handler task owns this request: it answers (or truncates)
                # and aborts any upstream exchange the body was flowing into.
                self.body.fail(exc)
            else:  # pragma: no cover - taskless requests are complete: nothing left to parse
                self.close()
            return
        self.proxy.stats_client_errors += 1
        if self.transport is not None and not self.closed and not self.response_started:
            self.transport.write(raw_error_response(exc))
            self.close_lingering()
            return
        self.close()

    # --- response side (called by the handler and its exchange) ---------------------------

    def send_continue(self) -> None:
        conn = self.h11
        if conn is not None and conn.client_is_waiting_for_100_continue and not self.closed:
            self.transport.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))  # type: ignore

    def send_interim(self, status: int, reason: bytes, headers: List[Tuple[bytes, bytes]]) -> None:
        """Relay an upstream 1xx (RFC 9110 §15.2) before the final response: to HTTP/1.1
        clients only (1.0 has none), never a 101 (no protocol switch is relayed), and
        a 100 only to a client still waiting for one (pyproxy answers Expect itself,
        so an upstream's 100 is otherwise a second one)."""
        if self.closed or self.response_started or status == 101 or not 100 <= status < 200:
            return
        if self._mode == _H11:
            conn = self.h11
            if conn is None or conn.their_http_version != b"1.1":
                return
            if status == 100 and not conn.client_is_waiting_for_100_continue:
                return
            # Queued like the final head, in order; the exchange's flush sends them.
            self._out.append(conn.send(h11.InformationalResponse(status_code=status, headers=headers, reason=reason)))  # type: ignore
            return
        if status == 100:
            return  # the fast path reads no Expect: nobody here waits for a 100
        self._out.append(serialize_response_head(status, reason, headers))

    def start_response(self, status: int, reason: bytes, headers: List[Tuple[bytes, bytes]]) -> None:
        """Queue the response head. ``headers`` are already cleaned for the client and
        end with a Content-Length only when the body has a declared length (else:
        chunked); see client_response_headers and error_response_parts."""
        self.response_started = True
        self.resp_status = status
        if self.admitted is not None:  # x-ratelimit-* fields, and whether usage is read
            self.meter = self.admitted.on_head(status, headers)
        if self.unsafe_request is not None:
            self.proxy.unsafe_answered(self.unsafe_request, status, headers)
        if self.closed:
            return
        if self.accepts_gzip:
            settings = self.proxy.settings
            if should_compress(status, headers, settings.gzip_min_length):
                headers = gzip_headers(headers)
                self._gzip = GzipStream(settings.gzip_level)
        if self.proxy.decorate:
            self._decorate(headers)
        closing = self.closing
        if self._mode == _H11:
            if closing:
                headers.append(_CLOSE_HEADER)
            self._out.append(self.h11.send(h11.Response(status_code=status, headers=headers, reason=reason)))  # type: ignore
            if self._gzip is None and self._method != b"HEAD" and not (headers and headers[-1][0] == b"content-length"):
                self._watch_event_stream(status, headers)
            return
        if self._method == b"HEAD" or status == 204 or status == 304:
            self._framing = _FRAME_NONE
        elif headers and headers[-1][0] == b"content-length":  # declared last, by contract
            self._framing = _FRAME_LENGTH
        else:
            self._framing = _FRAME_CHUNKED
            headers.append(_CHUNKED_HEADER)
            if self._gzip is None:
                self._watch_event_stream(status, headers)
        if closing:
            headers.append(_CLOSE_HEADER)
        self._out.append(serialize_response_head(status, reason, headers))

    def _watch_event_stream(self, status: int, headers: List[Tuple[bytes, bytes]]) -> None:
        """A response without a declared length is starting: if it is an event stream,
        --sse-keepalive watches it (a comment can be added only where the framing has
        no length to keep: chunked, or close-delimited)."""
        every = self.proxy.settings.sse_keepalive
        if every and 200 <= status < 300 and is_event_stream(headers):
            self.ping_every(every)

    def ping_every(self, every: float) -> None:
        """Write ``: ping`` between events after ``every`` seconds of silence, until this
        response ends. Pings are written here, to this client only: never stored by the
        cache, never relayed to coalesced subscribers, and the upstream connection's
        read timeout never hears of them."""
        now = self.loop.time()
        self._sse_every = every
        self._sse_last = now
        self._sse_tail = STREAM_START
        self._check_at(now + every)

    def _decorate(self, headers: List[Tuple[bytes, bytes]]) -> None:
        """X-Request-Id (unless the upstream sent its own) and Server-Timing, before a
        trailing Content-Length (which stays last, by contract)."""
        settings = self.proxy.settings
        request_id = self.request_id if settings.request_id else b""
        if request_id:
            for name, _ in headers:
                if name == b"x-request-id":
                    request_id = b""
                    break
        last = headers.pop() if headers and headers[-1][0] == b"content-length" else None
        if request_id:
            headers.append((b"x-request-id", request_id))
        if settings.server_timing:
            headers.append((b"server-timing", self._server_timing()))
        if last is not None:
            headers.append(last)

    def _server_timing(self) -> bytes:
        """W3C Server Timing: pyproxy's own time, and the upstream's time to first byte,
        in milliseconds. Formatted from integer microseconds (float formatting costs
        more, on PyPy above all)."""
        total = int((perf_counter() - self.started_at) * 1e6)
        ttfb = self.upstream_ttfb
        if ttfb < 0:
            return b"proxy;dur=%d.%03d" % (total // 1000, total % 1000)
        upstream = int(ttfb * 1e6)
        own = max(0, total - upstream)
        return b"proxy;dur=%d.%03d, upstream;dur=%d.%03d" % (own // 1000, own % 1000, upstream // 1000, upstream % 1000)

    def response_decorations(self) -> List[Tuple[bytes, bytes]]:
        """The same headers for a response serialized elsewhere (a cache hit)."""
        extra: List[Tuple[bytes, bytes]] = []
        settings = self.proxy.settings
        if self.request_id and settings.request_id:
            extra.append((b"x-request-id", self.request_id))
        if settings.server_timing:
            extra.append((b"server-timing", self._server_timing()))
        return extra

    def note_upstream(self, name: str, attempts: int) -> None:
        self.upstream_name = name
        self.attempts = attempts

    @property
    def gone(self) -> bool:
        """Nobody will read this response any more (the sink interface's question)."""
        return self.closed

    @property
    def writes_raw(self) -> bool:
        """Prebuilt response bytes may be written as they are (not in h11 mode)."""
        return self._mode != _H11

    @property
    def closing(self) -> bool:
        """The connection closes after this response, so it must say Connection: close --
        also when the request body has not been read whole: what is left of it cannot be
        told from a next request (RFC 9112 §9.6)."""
        if self._mode == _H11:
            return self.must_close or self.proxy.draining or self.h11.their_state is not _DONE  # type: ignore
        return self.must_close or self.proxy.draining or not self._keep_alive or self._mode == _FAST_BODY

    def send_prebuilt(self, pieces: Sequence[bytes], status: int, body_bytes: int) -> None:
        """A whole response, already serialized with its framing (a cache hit)."""
        self.response_started = True
        self.resp_status = status
        self.bytes_out += body_bytes
        self._framing = _FRAME_NONE
        if not self.closed:
            self._out += pieces
        self.finish_response()

    def write_backlog(self) -> int:
        """Bytes written but not yet taken by the socket."""
        if self.closed or self.transport is None:
            return 0
        return self.transport.get_write_buffer_size()

    def send_data(self, data: bytes) -> None:
        if self.closed:
            return
        if self._sse_every:
            self._sse_last = self.loop.time()
            self._sse_tail = stream_tail(self._sse_tail, data)
        if self.meter is not None:
            self.meter.feed(data)
        if self._gzip is not None:
            data = self._gzip.compress(data)
            if not data:
                return  # held by the compressor until the next flush
        # _append_body, inlined: this runs once per relayed chunk (every SSE event).
        self.bytes_out += len(data)
        if self._mode == _H11:
            self._out += self.h11.send_with_data_passthrough(_Data(data=data))  # type: ignore
        elif self._framing == _FRAME_LENGTH:
            self._out.append(data)
        elif self._framing == _FRAME_CHUNKED and data:
            self._out += chunk_pieces(data)

    def _append_body(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self._mode == _H11:
            self._out += self.h11.send_with_data_passthrough(_Data(data=data))  # type: ignore
        elif self._framing == _FRAME_LENGTH:
            self._out.append(data)
        elif self._framing == _FRAME_CHUNKED and data:
            self._out += chunk_pieces(data)

    def flush(self) -> None:
        if self._gzip is not None and not self.closed:
            pending = self._gzip.flush()  # so a streamed response stays live
            if pending:
                self._append_body(pending)
        out = self._out
        if out:
            self._out = []
            if not self.closed:
                if len(out) == 1:
                    self.transport.write(out[0])  # type: ignore[union-attr]
                else:
                    self.transport.writelines(out)  # type: ignore[union-attr]

    def finish_response(self) -> None:
        """The response is complete: write its end, then start the next keep-alive cycle."""
        if self._gzip is not None:
            if not self.closed:
                self._append_body(self._gzip.finish())
            self._gzip = None
        if self._observing:
            self._observe(self.resp_status)
        self.exchange = None
        self.task = None
        self.busy = False
        self._sse_every = 0.0
        # What only this request needed goes now, not at the next one: an idle
        # keep-alive connection holds as little as it can (10,000 of them are usual).
        self.req_target = self.request_id = b""
        if self.closed:
            self._out = []
            return
        mode = self._mode
        if mode == _H11:
            conn = self.h11
            assert conn is not None
            self._out.append(conn.send(_END))  # type: ignore[arg-type]
            self.flush()
            reusable = conn.our_state is _DONE and conn.their_state is _DONE
            leftover = conn.trailing_data[0] if reusable else b""
            self.h11 = None
        else:
            if self._framing == _FRAME_CHUNKED:
                self._out.append(LAST_CHUNK)
            self.flush()
            # A request body still unread means we cannot find the next request.
            reusable = self._keep_alive and mode == _FAST_DONE
            leftover = self._buf
            self._buf = b""
        self.body = None
        self.response_started = False
        if not reusable or self.must_close or self.proxy.draining:
            self.close()
            return
        self._mode = _FAST_HEAD
        self._keep_alive = True
        self.last_activity = self.loop.time()
        self.read_gate.resume(PIPELINE_WAIT)  # type: ignore[union-attr]
        if leftover:
            self._consume(leftover)

    def abort_truncated(self) -> None:
        """The upstream broke mid-body: end the connection without completing the message,
        so the client sees a truncated response, never a fake complete one."""
        if self._observing:
            self._observe(self.resp_status or 502)
        self._gzip = None
        self.exchange = None
        self.task = None
        self.busy = False
        self.flush()
        self.close()

    def abort_now(self) -> None:
        """Drop the connection without flushing: its peer is not reading anyway."""
        if self._observing:
            self._observe(self.resp_status or 499)
        self._gzip = None
        self.exchange = None
        self.task = None
        self.busy = False
        self._out = []
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def send_error(self, exc: ProxyError) -> None:
        if self.closed:
            return
        if self.response_started:
            self.abort_truncated()
            return
        if isinstance(exc, BadRequest) or (self._mode == _H11 and self.h11.our_state is not h11.SEND_RESPONSE):  # type: ignore
            self.exchange = None
            self.task = None
            self.busy = False
            self.proxy.stats_client_errors += isinstance(exc, BadRequest)
            if self._observing:
                self._observe(exc.status)
            self.transport.write(raw_error_response(exc))  # type: ignore[union-attr]
            self.close_lingering()
            return
        status, headers, body = error_response_parts(exc)
        self.start_response(status, HTTPStatus(status).phrase.encode("ascii"), headers)
        self.send_data(body)
        self.finish_response()

    def _observe(self, status: int) -> None:
        self._observing = False
        self.proxy.request_done(self, status)

    # --- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        self.closed = True
        transport = self.transport
        if transport is not None and not transport.is_closing():  # lingering ones too
            transport.close()

    def close_lingering(self) -> None:
        """Close after an error answer in stages (RFC 9112 §9.6): half-close, then drop
        what the client still sends until it closes, for LINGER_SECONDS at most. Closing
        at once would make the kernel answer those bytes with a reset, and a reset
        discards the error answer still unread at the client (nginx's lingering_close)."""
        if self.closed:
            return
        self.closed = True
        transport = self.transport
        if transport is None:
            return
        try:
            transport.write_eof()
            transport.resume_reading()  # to see the client's own close
        except (OSError, RuntimeError, NotImplementedError, AttributeError):
            transport.close()
            return
        self.loop.call_later(LINGER_SECONDS, transport.close)

    def begin_drain(self, grace: float) -> None:
        """Shutdown: a busy connection closes after its response; an idle one after
        ``grace`` seconds unless a request arrives meanwhile (answered, then closed).
        Closing an idle connection at once would lose a request already on its way
        -- above all on a connection just accepted, whose first request is in flight."""
        self.must_close = True
        if not self.busy and not self.response_started:
            if grace <= 0:
                self.close()
            else:
                self.loop.call_later(grace, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if not self.busy and not self.response_started and not self._buf:
            self.close()

    # --- deadlines: a lazy timer per connection where precision matters, else proxy.idle ---

    def _head_pending(self) -> None:
        """Part of a request head is here: all of it must arrive within --header-timeout of
        its first byte, however slowly it trickles in (a slowloris resets no timer)."""
        if not self._head_started:
            now = self._head_started = self.loop.time()
            self._check_at(now + self.proxy.settings.header_timeout)

    def _body_pending(self) -> None:
        """A request body is still arriving: its rate is checked over --body-timeout windows."""
        now = self._body_mark_at = self.loop.time()
        self._body_mark_bytes = self.body.received if self.body is not None else 0
        self._check_at(now + self.proxy.settings.body_timeout)

    def _check_at(self, when: float) -> None:
        """A precise deadline (the connection leaves proxy.idle until it is met)."""
        timer = self._timer
        if timer is not None:
            if timer.when() <= when:
                return
            timer.cancel()
        if not self.closed:
            self.proxy.idle.forget(self)
            self._timer = self.loop.call_at(when, self._check_deadlines)

    def swept(self) -> None:
        """proxy.idle's call, for a deadline that needed no precision."""
        if self._timer is None:  # else a precise one took over meanwhile
            self._check_deadlines()

    def _check_deadlines(self) -> None:
        self._timer = None
        if self.closed:
            return
        settings = self.proxy.settings
        now = self.loop.time()
        precise = True  # a request head or body arriving, an event stream's pings
        if not self.busy:
            started = self._head_started
            if started:
                if now - started >= settings.header_timeout:
                    self._on_bad_input(
                        RequestTimeout(
                            f"request head not received whole within {settings.header_timeout:g} s",
                            limit="header_timeout",
                        )
                    )
                    return
                when = started + settings.header_timeout
            else:
                idle_for = now - self.last_activity
                if idle_for >= settings.client_timeout:
                    self.proxy.metrics.limit_fired("idle_timeout")
                    self.close()  # an idle keep-alive connection
                    return
                when = self.last_activity + settings.client_timeout
                precise = False
        else:
            body = self.body
            if body is not None and not body.complete and body.error is None and self._body_mark_at:
                if self.read_gate.reasons & BODY_BUFFER_FULL:  # type: ignore[union-attr]
                    # We hold the client back (the upstream is slower): not its fault.
                    self._body_mark_at, self._body_mark_bytes = now, body.received
                elif now - self._body_mark_at >= settings.body_timeout:
                    elapsed = now - self._body_mark_at
                    if body.received - self._body_mark_bytes < max(1.0, settings.body_min_rate * elapsed):
                        self._on_bad_input(
                            RequestTimeout(
                                f"request body arrived slower than {settings.body_min_rate} bytes/s "
                                f"over {settings.body_timeout:g} s",
                                limit="body_timeout",
                            )
                        )
                        return
                    self._body_mark_at, self._body_mark_bytes = now, body.received
                when = self._body_mark_at + settings.body_timeout
            else:
                when = now + settings.client_timeout
                precise = False
            if self._sse_every and self.response_started:
                when = min(when, self._keep_stream_alive(now))
                precise = True
        if precise:
            self._timer = self.loop.call_at(when, self._check_deadlines)
        else:
            self.proxy.idle.at(when, self)

    def _keep_stream_alive(self, now: float) -> float:
        """--sse-keepalive: a ping if the stream has been silent long enough and is
        between events; returns when to look again. A client that is not reading
        (writes paused) gets none: it has bytes waiting already."""
        ping, when = keepalive_due(now, self._sse_last, self._sse_every, self._sse_tail)
        if ping and not self._write_paused:
            self._sse_last = now
            self._append_body(PING)  # the tail stays: after a comment line, still between events
            self.flush()
            self.proxy.stats_sse_pings += 1
        return when


class BufferedClientConnection(ReusedBufferReads, ClientConnection, asyncio.BufferedProtocol):
    __slots__ = ()
