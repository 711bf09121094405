"""The handler: the only place where the client side and the upstream side meet.

One task per request. It waits for the first body event (so a body malformed
from its first byte reaches nobody), checks out an upstream connection, writes
the request, pumps the body, and waits until the *exchange* -- a plain
listener object fed by the upstream protocol's callbacks -- has relayed the
response. Response chunks never pass through this coroutine: the upstream
protocol hands them to the exchange, which queues them for the client and
flushes once per upstream read.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, List, Optional

from pyproxy.errors import ProxyError, UpstreamDisconnected
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


class Exchange(ExchangeListener):
    """One request/response on one upstream connection, relayed to one client."""

    __slots__ = ("client", "conn", "done", "response_started", "finished", "body")

    def __init__(self, client: ClientConnection, conn: UpstreamConnection, body: RequestBody) -> None:
        self.client = client
        self.conn = conn
        self.body = body
        self.done: asyncio.Future[None] = client.loop.create_future()
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
        if not self.done.done():
            self.done.set_result(None)

    def on_error(self, exc: ProxyError) -> None:
        self.finished = True
        if self.response_started:
            log.warning("upstream response truncated: %s", exc.message)
            self.client.abort_truncated()
            if not self.done.done():
                self.done.set_result(None)
            return
        self.body.interrupt(exc)
        if not self.done.done():
            self.done.set_exception(exc)

    def client_gone(self) -> None:
        """Close the upstream at once (not pooled), so it stops generating."""
        if not self.finished:
            self.finished = True
            self.conn.detach()
        if not self.done.done():
            self.done.set_exception(ClientGone())


class Handler:
    def __init__(self, settings: "Settings", pool: ConnectionPool) -> None:
        upstream = settings.upstream
        assert upstream is not None
        self.pool = pool
        self.prefix = upstream.prefix
        self.host_header = upstream.host_header
        self.allow_underscores = settings.allow_underscore_headers

    async def handle(
        self, client: ClientConnection, request: RequestHead, body: RequestBody, framing: RequestFraming
    ) -> None:
        try:
            await self._relay(client, request, body, framing)
        except (asyncio.CancelledError, ClientGone):
            pass
        except ProxyError as exc:
            if exc.status >= 500:
                log.warning(
                    "%s %s -> %d: %s",
                    request.method.decode(),
                    request.target[:200].decode("latin-1"),
                    exc.status,
                    exc.message,
                )
            client.send_error(exc)
        except Exception:  # pragma: no cover - a bug; the client still gets an answer
            log.exception("unexpected error while proxying")
            client.send_error(ProxyError("internal proxy error"))

    async def _relay(
        self, client: ClientConnection, request: RequestHead, body: RequestBody, framing: RequestFraming
    ) -> None:
        target = to_origin_form(request.target)
        if self.prefix:
            target = self.prefix + (target if target != b"*" else b"/")
        method = request.method
        head = serialize_request_head(
            method,
            target,
            upstream_request_headers(
                request.headers,
                upstream_host=self.host_header,
                client_ip=client.client_ip,
                scheme=b"http",
                framing=framing,
                allow_underscores=self.allow_underscores,
            ),
        )
        if framing.has_body:
            client.send_continue()  # RFC 9110 §10.1.1: we will read the body
        if not body.started:
            await body.wait_started()
        elif body.error is not None:
            raise body.error
        # A body already complete (every bodiless request) goes out with the head.
        first: List[bytes] = body.take_buffered() if body.complete else []
        replay: Optional[List[bytes]] = list(first) if method in IDEMPOTENT_METHODS else None
        chunked = framing.chunked
        retried = False
        while True:
            conn = await self.pool.acquire()
            exchange = Exchange(client, conn, body)
            client.exchange = exchange
            try:
                if body.complete:
                    conn.start_exchange(exchange, method, head, chunked, replay if retried else first, end=True)
                else:
                    conn.start_exchange(exchange, method, head, chunked, replay if retried else None)
                    await self._pump_body(conn, exchange, body, replay)
                await exchange.done
                return
            except BaseException as exc:
                # Whatever went wrong, an unfinished upstream exchange must not
                # be left half-sent on a connection that could be reused.
                if not exchange.finished:
                    exchange.finished = True
                    conn.detach()
                if not isinstance(exc, UpstreamDisconnected):
                    raise
                if retried or exchange.response_started or not exc.reused:
                    raise
                # A reused keep-alive connection died before answering: the
                # upstream closed it as we picked it (RFC 9112 §9.3.1). Retry
                # once on a fresh one -- only if that cannot repeat an effect.
                never_sent = not exc.request_sent
                replayable = replay is not None and body.complete and body.received <= REPLAY_LIMIT
                if not (never_sent or replayable):
                    raise
                if replay is None:
                    replay = first  # never sent: what was taken is all there is
                retried = True
                self.pool.stats.stale_retries += 1

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
