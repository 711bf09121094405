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
import itertools
import logging
import os
from time import perf_counter
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, Union

from pyproxy.cache.entry import FRESH, STALE_IF_ERROR, STALE_WHILE_REVALIDATE, CachedResponse
from pyproxy.cache.key import parse_json_body
from pyproxy.cache.layer import BYPASS, HIT, MISS, STALE, Cache
from pyproxy.cache.policy import BYPASS as BYPASS_MODE
from pyproxy.cache.policy import LOOKUP, RANGE, REFETCH, only_if_cached
from pyproxy.cache.store import NEED_AWAIT
from pyproxy.dedup import X_DEDUP_FOLLOWER, Coalescer, Fetch
from pyproxy.errors import (
    BadRequest,
    BodyTooLarge,
    ClientStalled,
    NotInCache,
    ProxyError,
    UpstreamDisconnected,
    UpstreamError,
)
from pyproxy.gateway.early_head import early_head_after
from pyproxy.gateway.models import BY_MODEL, MODEL_LIST, NO_ROUTE, RouteNotFound, Target
from pyproxy.gateway.relay import Gateway, RoutedRequest, Run
from pyproxy.gateway.stream_usage import wants_injection
from pyproxy.http.fastpath import serialize_request_head
from pyproxy.http.headers import (
    RequestFraming,
    client_response_headers,
    interim_headers,
    to_origin_form,
    upstream_request_headers,
)
from pyproxy.http.messages import IDEMPOTENT_METHODS, RequestHead, ResponseHead
from pyproxy.metrics import RequestMetrics
from pyproxy.routing import UNPARSED, Plan, Router
from pyproxy.rules import request_path
from pyproxy.server.body import RequestBody
from pyproxy.server.protocol import ClientConnection
from pyproxy.sink import ClientGone
from pyproxy.upstream.connection import ExchangeListener, UpstreamConnection
from pyproxy.upstream.pool import ConnectionPool

if TYPE_CHECKING:  # pragma: no cover
    from pyproxy.config import Settings

log = logging.getLogger("pyproxy.handler")

# Request bodies kept for a retry on a stale connection, at most this much.
REPLAY_LIMIT = 64 * 1024
# Retries of one request after reused connections died before answering. Each
# retry opens a fresh connection, whose failure is not retried; a released
# connection handed over at the pool's bound may be stale too, hence more than one.
MAX_STALE_RETRIES = 3

# The X-Cache line a fetched response carries, by the request's cache mode.
_CACHE_HEADERS: Dict[Optional[str], Tuple[bytes, bytes]] = {
    LOOKUP: (b"x-cache", MISS),
    REFETCH: (b"x-cache", MISS),
    BYPASS_MODE: (b"x-cache", BYPASS),
    RANGE: (b"x-cache", BYPASS),  # when no stored response served it
}

_HEALTH_METHODS = frozenset({b"GET", b"HEAD"})
ANSWERED: Plan = Plan.__new__(Plan)  # a sentinel: the request needs nothing more
_HEALTH_BODY = b'{"status":"ok"}'


def answer_health(client: ClientConnection) -> None:
    """The main listener's own liveness answer (the users' current proxy has one)."""
    client.start_response(
        200,
        b"OK",
        [(b"content-type", b"application/json"), (b"cache-control", b"no-store"), (b"content-length", b"15")],
    )
    if client._method != b"HEAD":
        client.send_data(_HEALTH_BODY)
    client.finish_response()


class Keyed:
    """A request on its way through the cache and the coalescer.

    Its upstream request is serialized only if it is sent: a cache hit never
    needs it. Building it cannot fail here, as the plan already parsed the target,
    and it reads nothing of the client's that the client's next request changes.
    """

    __slots__ = (
        "handler",
        "client",
        "request",
        "framing",
        "body",
        "plan",
        "chunks",
        "parsed",
        "_new_id",
        "_outbound",
    )

    def __init__(
        self,
        handler: "Handler",
        client: ClientConnection,
        request: RequestHead,
        framing: RequestFraming,
        body: RequestBody,
        plan: Plan,
        chunks: List[bytes],
    ) -> None:
        self.handler = handler
        self.client = client
        self.request = request
        self.framing = framing
        self.body = body
        self.plan = plan
        self.chunks = chunks  # the whole body, or what was collected before giving up on keying
        self.parsed: Any = UNPARSED  # the body's JSON, when routing by model parsed it already
        self._new_id = handler.assign_request_id(client, request)  # hits return the id too
        self._outbound: Optional[AnyOutbound] = None
        gateway = handler.gateway
        if gateway is not None:  # the upstream is chosen per attempt: built now, serialized then
            self._outbound = handler.routed_request(client, request, framing, self._new_id)

    def add_conditional(self, fields: List[Tuple[bytes, bytes]]) -> None:
        """The validators of a stale entry, for the upstream request only (RFC 9111
        §4.3.1): the plan keeps the client's own fields, which key and vary the entry."""
        request = self.request
        self.request = RequestHead(request.method, request.target, request.headers + fields, request.http_version)
        if type(self._outbound) is RoutedRequest:
            self._outbound.headers = self._outbound.headers + fields
        else:
            self._outbound = None  # built again, from the request with its validators

    def outbound(self) -> "AnyOutbound":
        if self._outbound is None:
            self._outbound = self.handler.build_outbound(self.client, self.request, self.framing, self._new_id)
        return self._outbound


# Whatever an exchange relays a response to: a client, or a coalesced fetch.
Sink = Union[ClientConnection, Fetch]
# The request as it goes upstream: serialized once (one upstream), or per attempt (the gateway).
AnyOutbound = Union["Outbound", RoutedRequest]


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

    __slots__ = (
        "client",
        "conn",
        "done",
        "response_started",
        "finished",
        "body",
        "handler",
        "outbound",
        "sent",
        "sent_at",
    )

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
        # Durations come from perf_counter: uvloop advances loop.time() once per loop
        # iteration, in milliseconds, which would quantize every histogram.
        self.sent_at = perf_counter()

    def on_response(self, head: ResponseHead) -> None:
        self.response_started = True
        client = self.client
        client.upstream_ttfb = perf_counter() - self.sent_at
        client.start_response(head.status, head.reason, client_response_headers(head.headers))
        if client._write_paused:
            self.conn.pause_reading()

    def on_interim(self, head: ResponseHead) -> None:
        self.client.send_interim(head.status, head.reason, interim_headers(head.headers))

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
                self.handler.metrics.limit_fired(exc.limit)
                log.info("closing a client that stopped reading: %s", exc.message)
                self.client.abort_now()
            else:
                log.warning("upstream response truncated: %s", exc.message)
                self.handler.metrics.upstream_error("truncated")
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

    def client_paused(self) -> None:
        self.conn.pause_reading()

    def client_resumed(self) -> None:
        self.conn.resume_reading()

    def client_gone(self) -> None:
        """Close the upstream at once (not pooled), so it stops generating."""
        if not self.finished:
            self.finished = True
            self.conn.detach()
        done = self.done
        if done is not None and not done.done():
            done.set_exception(ClientGone())


class Handler:
    def __init__(
        self,
        settings: "Settings",
        pool: ConnectionPool,
        cache: Optional[Cache],
        coalescer: Coalescer,
        metrics: RequestMetrics,
        gateway: Optional[Gateway] = None,
    ) -> None:
        upstream = settings.upstream
        assert upstream is not None
        self.gateway = gateway  # several upstreams ([[upstreams]]); None: the one pool
        self.route_body_bytes = settings.route_body_bytes
        self.pool = pool
        self.cache = cache
        self.coalescer = coalescer
        self.metrics = metrics
        self.router = Router(settings)
        self.health_path = settings.health_path
        self.request_ids = settings.request_id
        # Generated request ids: unique per process (random prefix), cheap per request (a counter).
        self._rid_prefix = os.urandom(6).hex().encode()
        self._rid_counter = itertools.count(1)
        self.max_key_body = settings.cache_max_key_body
        self.prefix = upstream.prefix
        self.host_header = upstream.host_header
        self.allow_underscores = settings.allow_underscore_headers

    # --- entry point ---------------------------------------------------------------------

    def _preroute(self, client: ClientConnection, request: RequestHead, framing: RequestFraming) -> Optional[Plan]:
        """The layers' plan for a request, or None for the plain relay. A health check
        is answered here and yields ANSWERED."""
        if request.target == self.health_path and request.method in _HEALTH_METHODS:
            answer_health(client)
            return ANSWERED
        if not self.router.active:
            return None
        try:
            return self.router.plan(request, framing.has_body)
        except ProxyError as exc:  # a request-target no upstream request can be made of
            client.send_error(exc)
            return ANSWERED

    def start(self, client: ClientConnection, request: RequestHead, body: RequestBody, framing: RequestFraming) -> None:
        """Called by the client protocol once per request; never blocks."""
        if self.gateway is not None:
            self._gateway_start(client, request, body, framing)
            return
        plan = self._preroute(client, request, framing)
        if plan is not None:
            if plan is ANSWERED:
                return
            if body.complete and body.error is None:
                self._keyed(Keyed(self, client, request, framing, body, plan, body.take_buffered()))
            else:
                client.task = client.loop.create_task(self._keyed_task(client, request, body, framing, plan))
            return
        if body.complete and body.error is None:
            try:
                outbound = self._outbound(client, request, framing)
            except ProxyError as exc:
                client.send_error(exc)
                return
            self._dispatch(client, body, outbound, body.take_buffered())
            return
        client.task = client.loop.create_task(self.handle(client, request, body, framing))

    def _dispatch(self, sink: "Sink", body: RequestBody, outbound: "AnyOutbound", sent: List[bytes]) -> None:
        """Send a request whose body is complete (or whose rest a task will pump): on an
        idle connection without a task when there is one, else through a task."""
        if type(outbound) is RoutedRequest:
            self.gateway.dispatch(self, sink, outbound, body, sent)  # type: ignore[union-attr]
            return
        if body.complete:
            conn = self.pool.take_idle(outbound.method not in IDEMPOTENT_METHODS)
            if conn is not None:
                exchange = Exchange(sink, conn, body, self, outbound, sent, with_future=False)
                sink.exchange = exchange
                try:
                    conn.start_exchange(exchange, outbound.method, outbound.head, outbound.chunked, sent, end=True)
                    return
                except UpstreamDisconnected:
                    exchange.finished = True  # gone before use: nothing was sent
                    conn.detach()
                    sink.exchange = None
        sink.task = sink.loop.create_task(self._run(sink, outbound, body, sent, retries=0))

    def taskless_failed(self, exchange: Exchange, exc: ProxyError) -> None:
        """A taskless exchange failed before any response byte: retry if safe, else answer."""
        client = exchange.client
        client.exchange = None
        if self._may_retry(exc, exchange, exchange.outbound.method, exchange.body):
            self.pool.stats.stale_retries += 1
            client.task = client.loop.create_task(
                self._run(client, exchange.outbound, exchange.body, exchange.sent, retries=1)
            )
            return
        self.log_failure(exchange.outbound.method, exchange.outbound.target, exc)
        client.send_error(exc)

    # --- the keyed path: cache and coalescer ---------------------------------------------------

    async def _keyed_task(
        self, client: ClientConnection, request: RequestHead, body: RequestBody, framing: RequestFraming, plan: Plan
    ) -> None:
        """A keyed request whose body is still arriving: collect it (it is part of the key),
        up to cache_max_key_body; a larger one is relayed plainly."""
        req = Keyed(self, client, request, framing, body, plan, [])
        if framing.has_body:
            client.send_continue()
        await self._keyed_collect(req)

    def _keyed(self, req: "Keyed") -> None:
        plan = req.plan
        if plan.needs_body:
            whole = b"".join(req.chunks)
            # Too large to key on (the limit holds for a body already complete too),
            # or no rule's conditions hold: relayed plainly.
            if len(whole) > self.max_key_body or not plan.finish(whole, req.parsed):
                self._dispatch(req.client, req.body, req.outbound(), req.chunks)
                return
        cache = self.cache
        entry = None
        if cache is not None and (plan.cache_mode == LOOKUP or plan.cache_mode == RANGE):
            entry = cache.lookup_now(plan.cache_key, plan.headers)
            if entry is NEED_AWAIT:
                req.client.task = req.client.loop.create_task(self._lookup_then(req))
                return
        self._after_lookup(req, entry)  # type: ignore[arg-type]

    async def _lookup_then(self, req: "Keyed") -> None:
        try:
            entry = await self.cache.lookup(req.plan.cache_key, req.plan.headers)  # type: ignore[union-attr]
        except asyncio.CancelledError:
            return
        if not req.client.closed:
            self._after_lookup(req, entry)

    def _after_lookup(self, req: "Keyed", entry: Optional[CachedResponse]) -> None:
        cache = self.cache
        plan = req.plan
        stale = revalidate = None
        validators: Optional[List[Tuple[bytes, bytes]]] = None
        if cache is not None and plan.cache_mode == RANGE:
            # §3.4: a fresh stored full response serves one byte range; anything else
            # goes to the upstream as the client sent it, and is not stored.
            if entry is not None and cache.judge(entry, plan.headers) is FRESH:
                if cache.serve_range(req.client, entry, plan.method == b"HEAD", plan.headers):
                    return
        elif cache is not None and plan.cache_mode == LOOKUP:
            state = cache.judge(entry, plan.headers) if entry is not None else None
            if state is FRESH:
                if plan.conditional and cache.answer_conditional(
                    req.client,
                    entry,  # type: ignore[arg-type]
                    plan.method,
                    plan.headers,
                ):
                    return
                cache.serve(req.client, entry, HIT, plan.method == b"HEAD")  # type: ignore[arg-type]
                return
            if state is STALE_WHILE_REVALIDATE:
                cache.serve(req.client, entry, STALE, plan.method == b"HEAD")  # type: ignore[arg-type]
                if plan.records:
                    self._refresh(req, entry)  # type: ignore[arg-type]
                return
            cache.stats.misses += 1  # nothing stored, or nothing usable for this request
            validators = cache.revalidation(entry, plan.headers) if plan.records else None
            if validators is not None:
                revalidate = entry
            if state is STALE_IF_ERROR:
                stale = entry
            if only_if_cached(plan.headers):
                # RFC 9111 §5.2.1.7: no stored response may be used, and the client
                # asked that the upstream not be contacted.
                req.client.send_error(NotInCache("no stored response for this request (only-if-cached)"))
                return
        self._fetch(req, stale, revalidate, validators)

    def _fetch(
        self,
        req: "Keyed",
        stale: Optional[CachedResponse],
        revalidate: Optional[CachedResponse] = None,
        validators: Optional[List[Tuple[bytes, bytes]]] = None,
    ) -> None:
        """Fetch from the upstream (or join a fetch on its way); ``revalidate``: a stale
        entry the request is made conditional on, served again if the answer is 304."""
        client, plan = req.client, req.plan
        coalescer = self.coalescer
        cache_header = _CACHE_HEADERS.get(plan.cache_mode)
        if plan.may_join:
            fetch = coalescer.get(plan.key)
            if fetch is not None and fetch.joinable:
                coalescer.stats.followers += 1
                extra = [cache_header, X_DEDUP_FOLLOWER] if cache_header else [X_DEDUP_FOLLOWER]
                fetch.subscribe(
                    client, extra, plan.headers, lambda c: self._dispatch(c, req.body, req.outbound(), req.chunks)
                )
                return
        cache = self.cache
        if cache is not None and (plan.cache_mode == BYPASS_MODE or plan.cache_mode == RANGE):
            cache.stats.bypass += 1
        fetch = self._new_fetch(
            req,
            background=False,
            stale_fallback=self._stale_fallback(stale, plan.method == b"HEAD") if stale is not None else None,
        )
        if plan.may_lead or plan.records:
            coalescer.add(fetch)
            coalescer.stats.leaders += plan.may_lead
        if revalidate is not None and validators is not None:
            if validators:
                req.add_conditional(validators)
            fetch.revalidating = revalidate
        fetch.subscribe(client, [cache_header] if cache_header else [], plan.headers)
        self._dispatch(fetch, req.body, req.outbound(), req.chunks)

    def _refresh(self, req: "Keyed", entry: CachedResponse) -> None:
        """Stale-while-revalidate: one background fetch per key refreshes the entry --
        conditionally, when it has a validator (a 304 costs the upstream no body)."""
        if self.coalescer.get(req.plan.key) is not None:
            return  # a fetch for this key is already on its way
        cache = self.cache
        assert cache is not None
        cache.stats.refreshes += 1
        fetch = self._new_fetch(req, background=True, stale_fallback=None)
        validators = cache.revalidation(entry, req.plan.headers)
        if validators is not None:
            if validators:
                req.add_conditional(validators)
            fetch.revalidating = entry
        self.coalescer.add(fetch)
        self._dispatch(fetch, req.body, req.outbound(), req.chunks)

    def _new_fetch(self, req: "Keyed", *, background: bool, stale_fallback: Optional[Callable[[Fetch], bool]]) -> Fetch:
        plan, cache = req.plan, self.cache
        return Fetch(
            self.pool.loop,
            plan.key,
            self.coalescer,
            joinable=plan.may_lead,
            background=background,
            recording=cache.recording(plan.cache_key, plan.method, plan.cache_rule, plan.headers)
            if cache is not None and plan.records
            else None,
            stale_fallback=stale_fallback,
            leader_headers=plan.headers,
        )

    def _stale_fallback(self, entry: CachedResponse, head_only: bool) -> Callable[[Fetch], bool]:
        cache = self.cache
        assert cache is not None

        def serve_stale(fetch: Fetch) -> bool:
            if not entry.usable_if_error(cache.clock()):
                return False
            cache.stats.stale_if_error += 1
            for sub in fetch.take_subscribers():
                cache.serve(sub.client, entry, STALE, head_only)
            return True

        return serve_stale

    # --- the task path ---------------------------------------------------------------------

    async def handle(
        self, client: ClientConnection, request: RequestHead, body: RequestBody, framing: RequestFraming
    ) -> None:
        if self.gateway is not None:
            self._gateway_start(client, request, body, framing)
            return
        plan = self._preroute(client, request, framing)
        if plan is not None:
            if plan is not ANSWERED:
                await self._keyed_task(client, request, body, framing, plan)
            return
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
        await self._run(client, outbound, body, sent, retries=0)

    async def _run(
        self,
        client: ClientConnection,
        outbound: Outbound,
        body: RequestBody,
        sent: Optional[List[bytes]],
        retries: int,
    ) -> None:
        try:
            await self._attempts(client, outbound, body, sent, retries)
        except (asyncio.CancelledError, ClientGone):
            pass
        except ProxyError as exc:
            self.log_failure(outbound.method, outbound.target, exc)
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
        retries: int,
    ) -> None:
        # Body chunks written so far, kept (up to REPLAY_LIMIT) for an idempotent retry.
        replay: Optional[List[bytes]] = list(sent or ()) if outbound.method in IDEMPOTENT_METHODS else None
        while True:
            conn = await self.pool.acquire(fresh=retries > 0, probe=replay is None)
            if client.gone or body.error is not None:
                # The sink left while the connection was found, and the cancellation
                # did not reach us (see ConnectionPool._open), or the body failed (too
                # slow, malformed): the connection is unused and clean.
                self.pool.release(conn)
                if body.error is not None and not client.gone:
                    raise body.error
                return
            exchange = Exchange(client, conn, body, self, outbound, sent, with_future=True)
            client.exchange = exchange
            try:
                if body.complete:
                    # The body may have completed while a connection was found (a new
                    # one takes a round trip): what arrived meanwhile is still in its
                    # buffer and goes out with the rest, or the upstream waits forever.
                    rest = body.take_buffered()
                    if rest:
                        sent = list(sent or ()) + rest
                        if replay is not None and body.received <= REPLAY_LIMIT:
                            replay.extend(rest)
                        exchange.sent = sent
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
                if retries >= MAX_STALE_RETRIES or not isinstance(exc, UpstreamDisconnected):
                    raise
                if not self._may_retry(exc, exchange, outbound.method, body):
                    raise
                if exc.request_sent:
                    sent = replay
                retries += 1
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
        return self.build_outbound(client, request, framing, self.assign_request_id(client, request))

    def assign_request_id(self, client: ClientConnection, request: RequestHead) -> bytes:
        """Set the request's id: the client's X-Request-Id, or a new one. Returns a new
        one (it must go upstream too), else b""."""
        if not self.request_ids:
            return b""
        for name, value in request.headers:
            if name == b"x-request-id" and 0 < len(value) <= 200:
                client.request_id = value
                return b""
        if client.request_id:  # made earlier in this request (for an answer of pyproxy's own)
            return client.request_id
        client.request_id = b"%s-%x" % (self._rid_prefix, next(self._rid_counter))
        return client.request_id

    def build_outbound(
        self, client: ClientConnection, request: RequestHead, framing: RequestFraming, new_request_id: bytes
    ) -> Outbound:
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
        if new_request_id:
            headers.append((b"x-request-id", new_request_id))
        return Outbound(
            request.method, target, serialize_request_head(request.method, target, headers), framing.chunked
        )

    def log_failure(self, method: bytes, target: bytes, exc: ProxyError) -> None:
        if isinstance(exc, UpstreamError):
            self.metrics.upstream_error(exc.kind)
        if exc.status >= 500:
            log.warning("%s %s -> %d: %s", method.decode(), target[:200].decode("latin-1"), exc.status, exc.message)

    async def _send(self, sink: "Sink", outbound: "AnyOutbound", body: RequestBody, sent: List[bytes]) -> None:
        """Relay a request from a task that already runs (no new task)."""
        if type(outbound) is RoutedRequest:
            await self.gateway.run(self, sink, Run(outbound, sent), body)  # type: ignore[union-attr]
        else:
            await self._run(sink, outbound, body, sent, retries=0)  # type: ignore[arg-type]

    # --- the gateway: several upstreams --------------------------------------------------

    def _gateway_start(
        self, client: ClientConnection, request: RequestHead, body: RequestBody, framing: RequestFraming
    ) -> None:
        """Route by path (and, for model-routed paths, by the body's "model"), then through
        the cache and the coalescer as for one upstream; the gateway sends it."""
        gateway = self.gateway
        assert gateway is not None
        method = request.method
        if request.target == self.health_path and method in _HEALTH_METHODS:
            answer_health(client)
            return
        tenant = None
        if gateway.admission is not None:
            # pyproxy's own 401/403/429 carry the request id too: a client can quote it.
            self.assign_request_id(client, request)
        try:
            if gateway.admission is not None:  # 401 before anything else is looked at
                key = client.client_key = gateway.admission.authenticate(request.headers)
                tenant = key.tenant
            kind, target = gateway.routes.by_head(method, request.target)
            if kind is NO_ROUTE:
                path = request_path(to_origin_form(request.target))
                raise RouteNotFound(f"no upstream serves {path[:200].decode('latin-1')}")
            plan = self.router.plan(request, framing.has_body, tenant) if self.router.active else None
        except ProxyError as exc:
            client.send_error(exc)
            return
        if kind is MODEL_LIST:
            answer_models(client, gateway.routes.models_body)
            return
        if not body.complete or body.error is not None:
            client.task = client.loop.create_task(self._gateway_task(client, request, body, framing, target, plan))
            return
        chunks = body.take_buffered()
        if kind is not BY_MODEL:
            value = None
            if target.spec is not None and target.spec.early_head_after is not None and chunks:
                # A route's early head needs "stream": true from the body (that came whole).
                whole = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                if len(whole) <= self.route_body_bytes:
                    value = parse_json_body(whole)[1]
            self._gateway_go(client, request, framing, body, target, plan, chunks, None, UNPARSED, value)
            return
        # The body came with the head (most chat requests): routed without a task.
        whole = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        try:
            target, value, parsed = self._by_model(whole, plan)
        except ProxyError as exc:
            client.send_error(exc)
            return
        self._gateway_go(client, request, framing, body, target, plan, [whole], whole, parsed, value)

    def _by_model(self, whole: bytes, plan: Optional[Plan]) -> Tuple[Target, Any, Any]:
        """The target of a model-routed body, its JSON value, and the parse the cache
        key reuses."""
        limit = self.route_body_bytes
        if len(whole) > limit:
            raise BodyTooLarge(f"a request routed by model may have at most {limit} body bytes")
        ok, value = parse_json_body(whole)
        if not ok:
            raise BadRequest("the request body is not valid JSON")
        target = self.gateway.routes.by_model(value)  # type: ignore[union-attr]
        if plan is None:
            return target, value, UNPARSED
        # Cache and coalescing keys name the public model, not the alias.
        return target, value, (True, dict(value, model=target.public_model))

    async def _gateway_task(
        self,
        client: ClientConnection,
        request: RequestHead,
        body: RequestBody,
        framing: RequestFraming,
        target: Optional[Target],
        plan: Optional[Plan],
    ) -> None:
        gateway = self.gateway
        assert gateway is not None
        whole: Optional[bytes] = None
        parsed: Any = UNPARSED
        value: Any = None
        chunks: List[bytes] = []
        try:
            if framing.has_body:
                client.send_continue()
            if target is None:  # by model: the whole body first, parsed once
                limit = self.route_body_bytes
                while True:
                    got = await body.read()
                    if got is None:
                        break
                    chunks += got
                    if body.received > limit:
                        raise BodyTooLarge(f"a request routed by model may have at most {limit} body bytes")
                whole = b"".join(chunks)
                chunks = [whole]
                target, value, parsed = self._by_model(whole, plan)
            elif not body.started:
                await body.wait_started()
            elif body.error is not None:
                raise body.error
        except (asyncio.CancelledError, ClientGone):
            return
        except ProxyError as exc:
            client.send_error(exc)
            return
        if whole is None and plan is None:
            if gateway.admission is not None:
                decided: Optional["asyncio.Future[Any]"] = None
                then = None
                if gateway.admission.shared is not None:  # Redis may decide: this task waits
                    decided = client.loop.create_future()
                    then = lambda outcome: _settle(decided, outcome, gateway)  # type: ignore[arg-type]  # noqa: E731
                admitted = self._admit(client, target, body, None, then)  # type: ignore[arg-type]
                if admitted is False:
                    return
                if admitted is None and not self._admitted(client, await decided):  # type: ignore[misc]
                    return
            # Streamed through: a body already complete goes out with the head.
            chunks = body.take_buffered() if body.complete else []
            routed = self.routed_request(client, request, framing, self.assign_request_id(client, request), target)
            await gateway.run(self, client, Run(routed, chunks), body)
            return
        self._gateway_go(client, request, framing, body, target, plan, chunks, whole, parsed, value)

    def _gateway_go(
        self,
        client: ClientConnection,
        request: RequestHead,
        framing: RequestFraming,
        body: RequestBody,
        target: Target,
        plan: Optional[Plan],
        chunks: List[bytes],
        whole: Optional[bytes],
        parsed: Any,
        value: Any = None,
    ) -> None:
        """``value``: the body's JSON when routed by model (or read for a route's early
        head); kept for the batcher and the early head only."""
        gateway = self.gateway
        assert gateway is not None
        if gateway.admission is not None:
            then = None
            if gateway.admission.shared is not None:  # Redis may decide: go on once it has (no task)
                args = (client, request, framing, body, target, plan, chunks, whole, parsed, value)
                then = lambda outcome: self._gateway_go_admitted(outcome, args)  # noqa: E731
            if not self._admit(client, target, body, value, then):
                return  # answered (False), or Redis decides (None)
        self._gateway_send(client, request, framing, body, target, plan, chunks, whole, parsed, value)

    def _gateway_go_admitted(self, outcome: Any, args: Tuple[Any, ...]) -> None:
        client = args[0]
        try:
            if self._admitted(client, outcome):
                self._gateway_send(*args)
        except Exception:  # pragma: no cover - a bug; the client still gets an answer
            log.exception("unexpected error after admission")
            client.send_error(ProxyError("internal proxy error"))

    def _gateway_send(
        self,
        client: ClientConnection,
        request: RequestHead,
        framing: RequestFraming,
        body: RequestBody,
        target: Target,
        plan: Optional[Plan],
        chunks: List[bytes],
        whole: Optional[bytes],
        parsed: Any,
        value: Any = None,
    ) -> None:
        gateway = self.gateway
        assert gateway is not None
        if plan is None:
            routed = self.routed_request(client, request, framing, self.assign_request_id(client, request), target)
            routed.whole = whole
            if gateway.batcher is not None:
                routed.parsed = value
            if gateway.injecting is not None:
                self._inject_usage(client, request, routed, value)
            after = early_head_after(target, value)
            if after is not None:  # a stream its upstream may be slow to start
                gateway.dispatch(self, gateway.early_head(client, after), routed, body, chunks)
                return
            gateway.dispatch(self, client, routed, body, chunks)
            return
        req = Keyed(self, client, request, framing, body, plan, chunks)
        routed = req._outbound
        assert type(routed) is RoutedRequest
        routed.route = target
        routed.whole = whole
        if gateway.batcher is not None:
            routed.parsed = value
        if gateway.injecting is not None:
            self._inject_usage(client, request, routed, value)
        req.parsed = parsed
        if plan.needs_body and whole is None and not body.complete:
            client.task = client.loop.create_task(self._keyed_collect(req))
            return
        self._keyed(req)

    def _inject_usage(self, client: ClientConnection, request: RequestHead, routed: RoutedRequest, value: Any) -> None:
        """stream_usage = "inject": a stream that would not report its usage asks for it
        from the upstreams so configured (see gateway/stream_usage.py)."""
        if routed.whole is not None and wants_injection(request.target, value):
            routed.inject_usage = self.gateway.injecting  # type: ignore[union-attr]
            routed.usage_client = client
            routed.parsed = value

    def _admit(
        self,
        client: ClientConnection,
        target: Target,
        body: RequestBody,
        value: Any,
        then: Optional[Callable[[Any], None]] = None,
    ) -> Optional[bool]:
        """[auth] mode = "keys": the limits of the key (403, 429 answered here). The
        admission is held by the client connection until the request ends. True:
        admitted; False: answered. None: the Redis backend decides, and ``then`` gets
        its outcome (for _admitted) a round trip later."""
        model = target.public_model
        label = target.spec.name if model is not None and target.spec is not None else "other"
        try:
            admitted = self.gateway.admission.admit(  # type: ignore[union-attr]
                client.client_key, model, label, body.received, value, then
            )
        except ProxyError as exc:
            client.send_error(exc)
            return False
        if admitted is None:
            return None
        client.admitted = admitted
        return True

    def _admitted(self, client: ClientConnection, outcome: Any) -> bool:
        """Redis's admission arrived: hold it, or answer its 429. False: answered, or
        the client is gone (then the admission ends at once)."""
        if isinstance(outcome, ProxyError):
            client.send_error(outcome)
            return False
        if client.closed:  # gone while Redis decided: the request ends here
            self.gateway.admission.done(outcome, 499, b"", b"")  # type: ignore[union-attr]
            return False
        client.admitted = outcome
        return True

    async def _keyed_collect(self, req: "Keyed") -> None:
        """Collect a keyed request's body (it is part of the key), up to
        cache_max_key_body; a larger one is relayed plainly."""
        client, body = req.client, req.body
        try:
            while True:
                got = await body.read()
                if got is None:
                    break
                req.chunks += got
                if body.received > self.max_key_body:
                    await self._send(client, req.outbound(), body, req.chunks)
                    return
        except (asyncio.CancelledError, ClientGone):
            return
        except ProxyError as exc:
            client.send_error(exc)
            return
        self._keyed(req)

    def routed_request(
        self,
        client: ClientConnection,
        request: RequestHead,
        framing: RequestFraming,
        new_request_id: bytes,
        target: Optional[Target] = None,
    ) -> RoutedRequest:
        """The request as the gateway sends it, before the upstream is chosen."""
        headers = upstream_request_headers(
            request.headers,
            upstream_host=b"",
            client_ip=client.client_ip,
            scheme=b"http",
            framing=_NO_FRAMING,
            allow_underscores=self.allow_underscores,
        )
        del headers[0]  # the Host: each upstream's own, per attempt
        if new_request_id:
            headers.append((b"x-request-id", new_request_id))
        return RoutedRequest(
            request.method,
            to_origin_form(request.target),
            headers,
            framing.chunked,
            framing.content_length,
            target,  # type: ignore[arg-type]  # set by the caller once routed
            None,
        )


_NO_FRAMING = RequestFraming(None, False)


def _settle(decided: "asyncio.Future[Any]", outcome: Any, gateway: Gateway) -> None:
    """A shared admission's outcome for a task waiting on it; if the task is gone (its
    client left), the admission ends here."""
    if not decided.done():
        decided.set_result(outcome)
    elif not isinstance(outcome, ProxyError):
        gateway.admission.done(outcome, 499, b"", b"")  # type: ignore[union-attr]


def answer_models(client: ClientConnection, body: bytes) -> None:
    """GET /v1/models with [[models]] configured: the public names, from pyproxy."""
    client.start_response(
        200,
        b"OK",
        [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
    )
    if client._method != b"HEAD":
        client.send_data(body)
    client.finish_response()
