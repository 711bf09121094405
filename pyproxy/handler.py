"""The handler: the only place where the client side and the upstream side meet.

A request whose body is complete when its head is parsed (every GET, most
small POSTs) and that finds an idle upstream connection is relayed without
any task at all: the head and body go out in one write, and the *exchange*
-- a plain listener fed by the upstream protocol's callbacks -- relays the
response. Everything else (a body still arriving, a connection to open or
wait for, a retry) runs as one task per request, which waits for the first
body event (so a body malformed from its first byte reaches nobody), checks
out a connection, pumps the body and waits for the exchange to finish.
Response chunks never pass through a coroutine either way.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, List, Optional

from pyproxy.errors import ClientStalled, ProxyError, UpstreamDisconnected
from pyproxy.http.fastpath import serialize_request_head
from pyproxy.http.headers import RequestFraming, client_response_headers, to_origin_form, upstream_request_headers
from pyproxy.http.messages import RequestHead, ResponseHead
from pyproxy.server.body import RequestBody
from pyproxy.server.protocol import ClientConnection, ClientGone
from pyproxy.upstream.connection import ExchangeListener, UpstreamConnection
from pyproxy.upstream.pool import ConnectionPool

if TYPE_CHECKING:  # pragma: no cover
    from pyproxy.config import Settings

log = logging.getLogger("pyproxy.handler")

# RFC 9110 §9.2.2: a request with one of these methods may be repeated.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
# Request bodies kept for a retry on a stale connection, at most this much.
REPLAY_LIMIT = 64 * 1024


class Outbound:
    """The request as it will be written upstream, computed once per request."""

    __slots__ = ("method", "target", "head", "chunked")

    def __init__(self, method: bytes, target: bytes, head: bytes, chunked: bool) -> None:
        self.method = method
        self.target = target
        self.head = head
        self.chunked = chunked


class Exchange(ExchangeListener):
    """One request/response on one upstream connection, relayed to one client.

    ``done`` is a future only when a task waits on this exchange; a taskless
    exchange reports a failure before the response to ``handler`` instead.
    """

    __slots__ = ("client", "conn", "done", "response_started", "finished", "body", "handler", "outbound", "sent")

    def __init__(
        self,
        client: ClientConnection,
        conn: UpstreamConnection,
        body: RequestBody,
        handler: "Handler",
        outbound: Outbound,
        sent: Optional[List[bytes]],
        with_future: bool,
    ) -> None:
        self.client = client
        self.conn = conn
        self.body = body
        self.handler = handler
        self.outbound = outbound
        self.sent = sent  # body chunks already written, for a retry
        self.done: Optional[asyncio.Future[None]] = client.loop.create_future() if with_future else None
        self.response_started = False
        self.finished = False

    def on_response(self, head: ResponseHead) -> None:
        self.response_started = True
        client = self.client
        client.start_response(head.status, head.reason, client_response_headers(head.headers))
        if client._write_paused:
            self.conn.pause_reading()

    def on_body(self, data: bytes) -> None:
        self.client.send_data(data)

    def on_flush(self) -> None:
        self.client.flush()

    def on_end(self) -> None:
        self.finished = True
        self.client.finish_response()
        done = self.done
        if done is not None and not done.done():
            done.set_result(None)

    def on_error(self, exc: ProxyError) -> None:
        self.finished = True
        done = self.done
        if self.response_started:
            if isinstance(exc, ClientStalled):
                log.info("closing a client that stopped reading: %s", exc.message)
                self.client.abort_now()
            else:
                log.warning("upstream response truncated: %s", exc.message)
                self.client.abort_truncated()
            if done is not None and not done.done():
                done.set_result(None)
            return
        if done is None:
            self.handler.taskless_failed(self, exc)
            return
        self.body.interrupt(exc)
        if not done.done():
            done.set_exception(exc)

    def client_gone(self) -> None:
        """Close the upstream at once (not pooled), so it stops generating."""
        if not self.finished:
            self.finished = True
            self.conn.detach()
        done = self.done
        if done is not None and not done.done():
            done.set_exception(ClientGone())


class Handler:
    def __init__(self, settings: "Settings", pool: ConnectionPool) -> None:
        upstream = settings.upstream
        assert upstream is not None
        self.pool = pool
        self.prefix = upstream.prefix
        self.host_header = upstream.host_header
        self.allow_underscores = settings.allow_underscore_headers

    # --- entry point ---------------------------------------------------------------------

    def start(self, client: ClientConnection, request: RequestHead, body: RequestBody, framing: RequestFraming) -> None:
        """Called by the client protocol once per request; never blocks."""
        if body.complete and body.error is None:
            try:
                outbound = self._outbound(client, request, framing)
            except ProxyError as exc:
                client.send_error(exc)
                return
            sent = body.take_buffered()
            conn = self.pool.take_idle()
            if conn is not None:
                exchange = Exchange(client, conn, body, self, outbound, sent, with_future=False)
                client.exchange = exchange
                try:
                    conn.start_exchange(exchange, outbound.method, outbound.head, outbound.chunked, sent, end=True)
                    return
                except UpstreamDisconnected:
                    exchange.finished = True  # gone before use: nothing was sent
                    conn.detach()
                    client.exchange = None
            client.task = client.loop.create_task(self._run(client, outbound, body, sent, retried=False))
            return
        client.task = client.loop.create_task(self.handle(client, request, body, framing))

    def taskless_failed(self, exchange: Exchange, exc: ProxyError) -> None:
        """A taskless exchange failed before any response byte: retry if safe, else answer."""
        client = exchange.client
        client.exchange = None
        if self._may_retry(exc, exchange, exchange.outbound.method, exchange.body):
            self.pool.stats.stale_retries += 1
            client.task = client.loop.create_task(
                self._run(client, exchange.outbound, exchange.body, exchange.sent, retried=True)
            )
            return
        self._log_failure(exchange.outbound, exc)
        client.send_error(exc)

    # --- the task path ---------------------------------------------------------------------

    async def handle(
        self, client: ClientConnection, request: RequestHead, body: RequestBody, framing: RequestFraming
    ) -> None:
        try:
            outbound = self._outbound(client, request, framing)
            if framing.has_body:
                client.send_continue()  # RFC 9110 §10.1.1: we will read the body
            if not body.started:
                await body.wait_started()
            elif body.error is not None:
                raise body.error
        except (asyncio.CancelledError, ClientGone):
            return
        except ProxyError as exc:
            client.send_error(exc)
            return
        # A body already complete goes out with the head.
        sent = body.take_buffered() if body.complete else []
        await self._run(client, outbound, body, sent, retried=False)

    async def _run(
        self,
        client: ClientConnection,
        outbound: Outbound,
        body: RequestBody,
        sent: Optional[List[bytes]],
        retried: bool,
    ) -> None:
        try:
            await self._attempts(client, outbound, body, sent, retried)
        except (asyncio.CancelledError, ClientGone):
            pass
        except ProxyError as exc:
            self._log_failure(outbound, exc)
            client.send_error(exc)
        except Exception:  # pragma: no cover - a bug; the client still gets an answer
            log.exception("unexpected error while proxying")
            client.send_error(ProxyError("internal proxy error"))

    async def _attempts(
        self,
        client: ClientConnection,
        outbound: Outbound,
        body: RequestBody,
        sent: Optional[List[bytes]],
        retried: bool,
    ) -> None:
        # Body chunks written so far, kept (up to REPLAY_LIMIT) for an idempotent retry.
        replay: Optional[List[bytes]] = list(sent or ()) if outbound.method in IDEMPOTENT_METHODS else None
        while True:
            conn = await self.pool.acquire()
            exchange = Exchange(client, conn, body, self, outbound, sent, with_future=True)
            client.exchange = exchange
            try:
                if body.complete:
                    conn.start_exchange(exchange, outbound.method, outbound.head, outbound.chunked, sent, end=True)
                else:
                    conn.start_exchange(exchange, outbound.method, outbound.head, outbound.chunked, sent)
                    await self._pump_body(conn, exchange, body, replay)
                await exchange.done  # type: ignore[misc]
                return
            except BaseException as exc:
                # Whatever went wrong, an unfinished upstream exchange must not
                # be left half-sent on a connection that could be reused.
                if not exchange.finished:
                    exchange.finished = True
                    conn.detach()
                if retried or not isinstance(exc, UpstreamDisconnected):
                    raise
                if not self._may_retry(exc, exchange, outbound.method, body):
                    raise
                if exc.request_sent:
                    sent = replay
                retried = True
                self.pool.stats.stale_retries += 1

    @staticmethod
    def _may_retry(exc: ProxyError, exchange: Exchange, method: bytes, body: RequestBody) -> bool:
        """A reused keep-alive connection died before answering: the upstream closed it
        as we picked it (RFC 9112 §9.3.1). Retry once on a fresh one -- only if that
        cannot repeat an effect: nothing was sent, or the method is idempotent and
        the whole body is still at hand."""
        if not isinstance(exc, UpstreamDisconnected) or exchange.response_started or not exc.reused:
            return False
        if not exc.request_sent:
            return True
        return method in IDEMPOTENT_METHODS and body.complete and body.received <= REPLAY_LIMIT

    async def _pump_body(
        self,
        conn: UpstreamConnection,
        exchange: Exchange,
        body: RequestBody,
        replay: Optional[List[bytes]],
    ) -> None:
        while not exchange.finished:
            try:
                chunks = await body.read()
            except ProxyError:
                if exchange.finished:
                    return  # woken by the exchange's own failure: exchange.done says which
                raise
            if exchange.finished:
                return
            if chunks is None:
                conn.send_end()
                return
            conn.send_body_chunks(chunks)
            if replay is not None and body.received <= REPLAY_LIMIT:
                replay.extend(chunks)
            if conn.write_paused:
                try:
                    await conn.drain()
                except OSError:
                    if exchange.finished:
                        return
                    raise UpstreamDisconnected("upstream connection lost while sending the request body") from None

    # --- helpers -----------------------------------------------------------------------

    def _outbound(self, client: ClientConnection, request: RequestHead, framing: RequestFraming) -> Outbound:
        target = to_origin_form(request.target)
        if self.prefix:
            target = self.prefix + (target if target != b"*" else b"/")
        headers = upstream_request_headers(
            request.headers,
            upstream_host=self.host_header,
            client_ip=client.client_ip,
            scheme=b"http",
            framing=framing,
            allow_underscores=self.allow_underscores,
        )
        return Outbound(
            request.method, target, serialize_request_head(request.method, target, headers), framing.chunked
        )

    @staticmethod
    def _log_failure(outbound: Outbound, exc: ProxyError) -> None:
        if exc.status >= 500:
            log.warning(
                "%s %s -> %d: %s",
                outbound.method.decode(),
                outbound.target[:200].decode("latin-1"),
                exc.status,
                exc.message,
            )
