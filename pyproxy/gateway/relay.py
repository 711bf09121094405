"""The gateway's I/O: one connection pool per upstream, and the attempt loop.

Every decision is delegated to the pure modules -- ``balancer.choose`` picks
the deployment, ``outlier`` says whether a failure is retried, counts towards
ejection or cools a deployment down -- and this module only acts on them:
check out a connection, write the request for that upstream (its host, path
prefix, key, and the deployment's model name), relay the response, and on a
retryable failure before the first response byte reached the client, go again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from time import perf_counter
from typing import TYPE_CHECKING, Any, Dict, FrozenSet, List, Optional, Tuple

from pyproxy.errors import (
    ClientStalled,
    NoUpstreamAvailable,
    PoolTimeout,
    ProxyError,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamTimeout,
)
from pyproxy.gateway import outlier
from pyproxy.gateway.admission import Admission
from pyproxy.gateway.balancer import choose, observe_latency, soonest_recovery
from pyproxy.gateway.batcher import Batcher
from pyproxy.gateway.config import DEFAULT_MAX_ATTEMPTS, DEFAULT_RETRY_DEADLINE, Deployment, GatewayConfig, UpstreamSpec
from pyproxy.gateway.early_head import EarlyHeadSink
from pyproxy.gateway.models import GatewayRoutes, Target, rewrite_model
from pyproxy.gateway.state import UpstreamState
from pyproxy.gateway.stream_usage import UsageChunkStrip, inject_include_usage
from pyproxy.gateway.usage import UsageMeter
from pyproxy.http.headers import client_response_headers
from pyproxy.http.messages import IDEMPOTENT_METHODS, ResponseHead
from pyproxy.sink import ClientGone
from pyproxy.upstream.pool import ConnectionPool

if TYPE_CHECKING:  # pragma: no cover
    from pyproxy.config import Settings
    from pyproxy.handler import Handler
    from pyproxy.server.body import RequestBody

log = logging.getLogger("pyproxy.gateway")

Header = Tuple[bytes, bytes]
# Client credentials: removed when the upstream's own key is injected.
CREDENTIAL_HEADERS = frozenset({b"authorization", b"x-api-key", b"api-key"})
# The stale keep-alive race (RFC 9112 §9.3.1) is retried on a fresh connection to the
# same upstream this many times; it is nobody's failure.
MAX_STALE_RETRIES = 3


_STATUS_LABELS = {status: str(status) for status in range(100, 600)}


class RetryableStatus(UpstreamError):
    """The upstream answered with a status another deployment may do better with;
    the response was discarded (decided before: see GatewayExchange.on_response)."""

    kind = "status"

    def __init__(self, status: int) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status


class RoutedRequest:
    """A request as the gateway sends it: everything but what depends on the upstream
    (host, path prefix, credential, the deployment's model name, framing)."""

    __slots__ = (
        "method",
        "target",
        "headers",
        "chunked",
        "route",
        "whole",
        "_bodies",
        "content_length",
        "retry_until",
        "parsed",
        "inject_usage",
        "usage_client",
    )

    def __init__(
        self,
        method: bytes,
        target: bytes,
        headers: List[Header],
        chunked: bool,
        content_length: Optional[int],
        route: Target,
        whole: Optional[bytes],
    ) -> None:
        self.method = method
        self.target = target  # origin-form, without any upstream's prefix
        self.headers = headers  # without Host and framing headers
        self.chunked = chunked
        self.content_length = content_length
        self.route = route
        self.whole = whole  # the whole body when it was read to route by model, else None
        self._bodies: Optional[Dict[str, bytes]] = None  # renamed bodies, by model name
        self.retry_until = 0.0  # the loop time after which no attempt starts (see dispatch)
        self.parsed: Any = None  # the parsed body, kept for the batcher and stream_usage
        # stream_usage = "inject": the upstreams this stream would be sent to with
        # stream_options.include_usage (None: it asked itself, or is no such stream),
        # and the client connection whose usage meter reads the chunk taken out.
        self.inject_usage: Optional[FrozenSet[str]] = None
        self.usage_client: Any = None

    @property
    def rewrites(self) -> bool:
        """Whether the body sent may differ from the client's (see body_for)."""
        return self.route.renames or self.inject_usage is not None

    def injects_for(self, deployment: Deployment) -> bool:
        inject = self.inject_usage
        return inject is not None and deployment.upstream in inject

    def body_for(self, deployment: Deployment) -> Optional[bytes]:
        """The body for this deployment: the model renamed, stream_options added, when
        they must be; else as sent."""
        whole = self.whole
        if whole is None:
            return whole
        model = self.route.model_for(deployment) if self.route.renames else None
        inject = self.injects_for(deployment)
        if model is None and not inject:
            return whole
        bodies = self._bodies
        if bodies is None:
            bodies = self._bodies = {}
        which = (model or "") + ("+usage" if inject else "")
        body = bodies.get(which)
        if body is None:
            body = rewrite_model(whole, model) if model is not None else whole
            if inject:
                body = inject_include_usage(body, self.parsed)
            bodies[which] = body
        return body

    def head_for(self, upstream: "UpstreamHead", body: Optional[bytes]) -> Tuple[bytes, bool]:
        """The request head for one upstream, and whether its body goes chunked: the
        client's fields between the upstream's own constant lines, joined once (one
        join, as serialize_request_head: formatting each field costs more)."""
        chunked = False
        if body is not None:
            framing = b"content-length: %d\r\n" % len(body)
        elif self.chunked:
            framing = b"transfer-encoding: chunked\r\n"
            chunked = True
        elif self.content_length is not None:
            framing = b"content-length: %d\r\n" % self.content_length
        else:
            framing = b""
        target = self.target
        if upstream.prefix:
            target = upstream.prefix + (target if target != b"*" else b"/")
        parts = [self.method, b" ", target, b" HTTP/1.1\r\n", upstream.host_line]
        if upstream.credential is None:
            for name, value in self.headers:
                parts += (name, _SEP, value, _CRLF)
        else:
            for name, value in self.headers:
                if name not in CREDENTIAL_HEADERS:
                    parts += (name, _SEP, value, _CRLF)
            parts.append(upstream.credential_line)
        parts += (framing, _CRLF)
        return b"".join(parts), chunked


_SEP = b": "
_CRLF = b"\r\n"


class UpstreamHead:
    """What every request head to one upstream carries: computed once."""

    __slots__ = ("name", "host_line", "credential", "credential_line", "prefix", "first_attempt_headers")

    def __init__(self, spec: UpstreamSpec) -> None:
        self.name = spec.name.encode("ascii")  # x-pyproxy-upstream
        self.host_line = b"host: %s\r\n" % spec.upstream.host_header
        self.credential = spec.credential_header()
        self.credential_line = b"%s: %s\r\n" % self.credential if self.credential is not None else b""
        self.prefix = spec.upstream.prefix
        # What a response answered at the first attempt says (--upstream-headers).
        self.first_attempt_headers = ((b"x-pyproxy-upstream", self.name), (b"x-pyproxy-attempts", b"1"))


class Run:
    """One request's way through its attempts."""

    __slots__ = ("request", "sent", "replay", "tried", "last_error", "attempts", "stale", "fresh", "is_retry")

    def __init__(self, request: RoutedRequest, sent: Optional[List[bytes]]) -> None:
        self.request = request
        self.sent = sent  # body chunks to write with the head
        # Body chunks written, kept for a retry while they fit the retry buffer (a body
        # read whole to route by model is kept as it is).
        self.replay: Optional[List[bytes]] = list(sent or ()) if request.whole is None else None
        self.tried: List[str] = []  # upstreams that failed this request
        self.last_error: Optional[ProxyError] = None
        self.attempts = 0
        self.stale = 0  # fresh-connection retries after the keep-alive race
        self.fresh = False
        self.is_retry = False  # counted in the gateway's retries in flight


class Attempt:
    """One try of a request on one deployment."""

    __slots__ = ("gateway", "request", "deployment", "state", "number", "tried")

    def __init__(
        self, gateway: "Gateway", request: RoutedRequest, deployment: Deployment, number: int, tried: List[str]
    ) -> None:
        self.gateway = gateway
        self.request = request
        self.deployment = deployment
        self.state = gateway.states[deployment.upstream]
        self.number = number
        self.tried = tried


def _exchange_class() -> Any:
    # Imported late: handler imports this module.
    from pyproxy.handler import Exchange

    class GatewayExchange(Exchange):
        """An exchange that may discard a retryable response instead of relaying it."""

        __slots__ = ("attempt", "run", "strip")

        def on_response(self, head: ResponseHead) -> None:
            attempt: Attempt = self.attempt
            gateway = attempt.gateway
            ttfb = perf_counter() - self.sent_at
            if head.status >= 400 and gateway.retry_on_response(attempt, head, ttfb):
                self.finished = True
                self.conn.detach()  # the rest of that response is not wanted
                done = self.done
                if done is None:
                    gateway.taskless_failed(self, RetryableStatus(head.status))
                elif not done.done():
                    done.set_exception(RetryableStatus(head.status))
                return
            status = head.status
            if status < 400:  # the common case, recorded here (see retry_on_response)
                state = attempt.state
                observe_latency(state, ttfb, gateway.loop.time())
                state.failures = 0
                label = _STATUS_LABELS.get(status) or str(status)
                requests = state.requests
                requests[label] = requests.get(label, 0) + 1
                state.successes += 1
            self.response_started = True
            client = self.client
            client.upstream_ttfb = ttfb
            headers = client_response_headers(head.headers)
            if attempt.request.injects_for(attempt.deployment):
                self.strip = _usage_strip(attempt.request, status, headers)
            if gateway.upstream_headers:
                number = attempt.number
                if number == 1:
                    extra = gateway.heads[attempt.deployment.upstream].first_attempt_headers
                else:
                    extra = [(b"x-pyproxy-upstream", gateway.heads[attempt.deployment.upstream].name),
                             (b"x-pyproxy-attempts", b"%d" % number)]  # fmt: skip
                if headers and headers[-1][0] == b"content-length":
                    headers[-1:-1] = extra  # it stays last, by contract (see client_response_headers)
                else:
                    headers += extra
            client.note_upstream(attempt.deployment.upstream, attempt.number)
            client.start_response(head.status, head.reason, headers)
            if client._write_paused:
                self.conn.pause_reading()

        def on_body(self, data: bytes) -> None:
            strip = self.strip
            if strip is not None:
                data = strip.feed(data)
                if not data:
                    return
            self.client.send_data(data)

        def on_end(self) -> None:
            strip = self.strip
            if strip is not None:
                self.strip = None
                rest = strip.finish()
                if rest:
                    self.client.send_data(rest)
            super().on_end()
            if self.done is None:  # taskless_settled, written out (every request ends here)
                attempt = self.attempt
                attempt.state.in_flight -= 1
                attempt.gateway.requests_in_flight -= 1

        def on_error(self, exc: ProxyError) -> None:
            gateway = self.attempt.gateway
            if self.response_started:
                if not isinstance(exc, ClientStalled):
                    gateway.failed(self.attempt.state, "truncated: " + exc.message)
                super().on_error(exc)
                if self.done is None:
                    gateway.taskless_settled(self)
            elif self.done is None:
                self.finished = True
                gateway.taskless_failed(self, exc)
            else:
                super().on_error(exc)

        def client_gone(self) -> None:
            was_finished = self.finished
            super().client_gone()
            if self.done is None and not was_finished:
                self.attempt.gateway.taskless_settled(self)

    return GatewayExchange


def _processes(settings: "Settings") -> int:
    """How many processes serve this instance (--workers), to split its local share."""
    if settings.workers is None:
        return 1
    from pyproxy.supervisor import worker_count

    return worker_count(settings)


def _usage_strip(request: RoutedRequest, status: int, headers: List[Header]) -> Optional[UsageChunkStrip]:
    """The filter that takes the injected usage out of a 2xx event stream (None when
    the answer is something else: an error, JSON, an encoded body). ``headers`` lose a
    Content-Length, which the stream no longer matches: it goes chunked instead."""
    probe = UsageMeter()  # the meter's own test of which answers it reads
    if not probe.start(status, headers) or not probe.streamed:
        return None
    if headers and headers[-1][0] == b"content-length":
        headers.pop()
    client = request.usage_client

    def to_meter(event: bytes) -> None:
        meter = client.meter if client is not None else None
        if meter is not None:
            meter.feed(event)

    return UsageChunkStrip(to_meter)


class Gateway:
    def __init__(self, settings: "Settings", loop: asyncio.AbstractEventLoop) -> None:
        config = settings.gateway
        assert config is not None
        self.config: GatewayConfig = config
        self.loop = loop
        self.routes = GatewayRoutes(config)
        self.specs: Dict[str, UpstreamSpec] = {spec.name: spec for spec in config.upstreams}
        self.heads: Dict[str, UpstreamHead] = {spec.name: UpstreamHead(spec) for spec in config.upstreams}
        self.pools: Dict[str, ConnectionPool] = {}
        self.states: Dict[str, UpstreamState] = {}
        for spec in config.upstreams:
            bound = spec.max_connections or settings.pool_connections
            self.pools[spec.name] = ConnectionPool(spec.upstream, settings, loop, max_connections=bound)
            self.states[spec.name] = UpstreamState(spec.name, bound)
        # The groups the half-ejected bound holds for: each model's deployments, and all.
        every = list(self.states.values())
        self.groups: List[List[UpstreamState]] = [every] + [
            [self.states[name] for name in dict.fromkeys(d.upstream for d in model.deployments)]
            for model in config.models
        ]
        self.upstream_headers = settings.upstream_headers
        self.retry_buffer_bytes = settings.retry_buffer_bytes
        self.rng = random.Random()
        self.requests_in_flight = 0
        self.retries_in_flight = 0
        self._exchange = _exchange_class()
        # early_head_after: pings every --sse-keepalive seconds, or every early_head_after when off.
        self.sse_keepalive = settings.sse_keepalive
        self.early_heads = 0
        # [[batching]]: the requests a rule covers go through the batcher.
        self.batcher = Batcher(self, config.batching, loop) if config.batching else None
        # stream_usage = "inject": the upstreams streamed chat requests ask usage of.
        self.injecting: Optional[FrozenSet[str]] = (
            frozenset(spec.name for spec in config.upstreams if spec.stream_usage == "inject") or None
        )
        # [auth] mode = "keys": client keys, limits and usage (None: the client's key passes).
        self.admission = (
            Admission(config.auth, loop, processes=_processes(settings)) if config.auth is not None else None
        )

    def early_head(self, client: Any, after: float) -> EarlyHeadSink:
        """The sink that answers ``client`` itself if its upstream is silent ``after`` s."""
        return EarlyHeadSink(client, after, self.sse_keepalive or after, self)

    # --- deciding, with the pure functions -----------------------------------------------

    def retry_on_response(self, attempt: Attempt, head: ResponseHead, ttfb: float) -> bool:
        """A response head of status >= 400 arrived (the exchange records the others
        itself): record it, and say whether it is discarded for a retry elsewhere
        (decided now, while nothing has reached the client)."""
        state = attempt.state
        now = self.loop.time()
        status = head.status
        observe_latency(state, ttfb, now)
        state.count(state.requests, str(status))
        if status == 429:
            retry_after = None
            for name, value in head.headers:
                if name == b"retry-after":
                    retry_after = outlier.parse_retry_after(value, time.time())
            outlier.cool_down(state, now, retry_after)
            state.recent_errors.append((now, "429"))
        elif outlier.counts_as_failure(outlier.STATUS, status):
            self.failed(state, f"answered {status}")
        else:
            outlier.record_success(state)
        spec = attempt.request.route.spec
        retry_on = spec.retry_on if spec is not None else frozenset()
        if not outlier.retryable(outlier.STATUS, status, retry_on):
            state.count(state.attempts, "success" if status < 500 else "failure")
            return False
        if not self._may_retry(attempt, written=True):
            state.count(state.attempts, "failure")
            return False
        state.count(state.attempts, "retried")
        return True

    def _may_retry(self, attempt: Attempt, *, written: bool, budgeted: bool = True) -> bool:
        """``written``: the body must be replayable; ``budgeted``: the retry budget applies
        -- not to a connect failure, which reached no upstream and so adds no load to
        the fleet (the budget's reason); ``max_attempts`` bounds those still."""
        request = attempt.request
        spec = request.route.spec
        max_attempts = spec.max_attempts if spec is not None else DEFAULT_MAX_ATTEMPTS
        if attempt.number >= max_attempts or self.loop.time() >= request.retry_until:
            return False
        if budgeted and not outlier.budget_allows(self.requests_in_flight, self.retries_in_flight):
            return False
        if written and not self._replayable(request):
            return False
        # Another deployment must be there to take it: else the answer we have is relayed.
        tried = attempt.tried + [attempt.deployment.upstream]
        return choose(request.route.deployments, self.states, self.loop.time(), self.rng, tried) is not None

    def _replayable(self, request: RoutedRequest) -> bool:
        return request.whole is not None and len(request.whole) <= self.retry_buffer_bytes

    def failed(self, state: UpstreamState, error: str) -> None:
        length = outlier.record_failure(state, self.groups, self.loop.time(), error)
        if length is not None:
            log.warning(
                "upstream %s ejected for %g s after %d consecutive failures",
                state.name,
                length,
                outlier.CONSECUTIVE_FAILURES,
            )

    # --- acting ------------------------------------------------------------------------

    def dispatch(
        self, handler: "Handler", sink: Any, request: RoutedRequest, body: "RequestBody", sent: List[bytes]
    ) -> None:
        """Send a request, or give it to the batcher when a batching rule covers it."""
        if (
            request.parsed is not None
            and self.batcher is not None
            and self.batcher.submit(handler, sink, request, body)
        ):
            return
        self.send(handler, sink, request, body, sent)

    def send(
        self, handler: "Handler", sink: Any, request: RoutedRequest, body: "RequestBody", sent: List[bytes]
    ) -> None:
        """Send a request: when its body is complete and the chosen deployment has an
        idle connection, without a task (as the one-upstream relay does); else, or on a
        failure to go again, through one task per request."""
        run = Run(request, sent)
        route = request.route
        now = self.loop.time()
        spec = route.spec
        request.retry_until = now + (spec.retry_deadline if spec is not None else DEFAULT_RETRY_DEADLINE)
        if body.complete:
            deployment = choose(route.deployments, self.states, now, self.rng, uniform=route.uniform)
            if deployment is not None and self._start_taskless(handler, sink, run, body, deployment):
                return
        sink.task = sink.loop.create_task(self.run(handler, sink, run, body))

    def _start_taskless(
        self, handler: "Handler", sink: Any, run: "Run", body: "RequestBody", deployment: Deployment
    ) -> bool:
        """The first attempt on an idle connection, if the deployment has one."""
        request = run.request
        conn = self.pools[deployment.upstream].take_idle(request.method not in IDEMPOTENT_METHODS)
        if conn is None:
            return False
        attempt = self._begin(run, deployment)
        exchange = self._exchange(sink, conn, body, handler, None, run.sent, with_future=False)
        exchange.attempt = attempt
        exchange.run = run
        exchange.strip = None
        sink.exchange = exchange
        whole = request.body_for(deployment) if request.rewrites else request.whole
        head, chunked = request.head_for(self.heads[deployment.upstream], whole)
        try:
            conn.start_exchange(
                exchange, request.method, head, chunked, [whole] if whole is not None else run.sent, end=True
            )
        except UpstreamDisconnected:
            exchange.finished = True  # gone before use: nothing was sent; the task path goes on
            conn.detach()
            sink.exchange = None
            self._end(run, attempt)
            run.attempts -= 1
            return False
        return True

    def taskless_failed(self, exchange: Any, exc: ProxyError) -> None:
        """A taskless exchange failed before any response byte reached the client: judge
        it as the attempt loop does, and go on in a task, or answer."""
        run: Run = exchange.run
        attempt: Attempt = exchange.attempt
        sink = exchange.client
        sink.exchange = None
        self._end(run, attempt)
        handler = exchange.handler
        if self._judge(run, attempt, exc, False, exchange.body, self.pools[attempt.deployment.upstream]):
            sink.task = sink.loop.create_task(self.run(handler, sink, run, exchange.body))
            return
        self._answer_error(handler, sink, run, exc)

    def taskless_settled(self, exchange: Any) -> None:
        """A taskless exchange ended (response relayed, truncated, or its client left)."""
        self._end(exchange.run, exchange.attempt)

    async def run(self, handler: "Handler", sink: Any, run: "Run", body: "RequestBody") -> None:
        try:
            await self._attempts(handler, sink, run, body)
        except (asyncio.CancelledError, ClientGone):
            pass
        except ProxyError as exc:
            self._answer_error(handler, sink, run, exc)
        except Exception:  # pragma: no cover - a bug; the client still gets an answer
            log.exception("unexpected error while proxying")
            sink.send_error(ProxyError("internal proxy error"))
        finally:
            if run.is_retry:
                self.retries_in_flight -= 1
                run.is_retry = False

    def _answer_error(self, handler: "Handler", sink: Any, run: "Run", exc: ProxyError) -> None:
        if run.attempts and self.upstream_headers:
            exc.added_headers = [(b"x-pyproxy-attempts", b"%d" % run.attempts)]
        handler.log_failure(run.request.method, run.request.target, exc)
        sink.send_error(exc)

    def _begin(self, run: "Run", deployment: Deployment) -> Attempt:
        run.attempts += 1
        attempt = Attempt(self, run.request, deployment, run.attempts, run.tried)
        attempt.state.in_flight += 1
        self.requests_in_flight += 1
        return attempt

    def _end(self, run: "Run", attempt: Attempt) -> None:
        attempt.state.in_flight -= 1
        self.requests_in_flight -= 1

    async def _attempts(self, handler: "Handler", sink: Any, run: "Run", body: "RequestBody") -> None:
        request = run.request
        route = request.route
        while True:
            now = self.loop.time()
            deployment = choose(route.deployments, self.states, now, self.rng, run.tried, route.uniform)
            if deployment is None:
                if run.last_error is not None:
                    raise run.last_error
                soonest = soonest_recovery(route.deployments, self.states, now, run.tried)
                raise NoUpstreamAvailable(
                    "no upstream is available for this request (all ejected, cooling down or busy)",
                    retry_after=max(1, int(soonest + 0.999)),
                )
            attempt = self._begin(run, deployment)
            pool = self.pools[deployment.upstream]
            try:
                if await self._attempt(handler, sink, run, attempt, pool, body):
                    return
            finally:
                self._end(run, attempt)

    async def _attempt(
        self, handler: "Handler", sink: Any, run: "Run", attempt: Attempt, pool: ConnectionPool, body: "RequestBody"
    ) -> bool:
        """One attempt: True when the request is answered (or its client left); False to go
        again; raises what the client is answered with."""
        request, deployment = run.request, attempt.deployment
        try:
            conn = await pool.acquire(fresh=run.fresh, probe=request.method not in IDEMPOTENT_METHODS)
        except UpstreamError as exc:  # connect refused or timed out, or the pool's wait
            if self._judge(run, attempt, exc, False, body, pool, acquiring=True):
                return False
            raise
        if sink.gone or body.error is not None:
            pool.release(conn)  # unused and clean
            if body.error is not None and not sink.gone:
                raise body.error
            return True
        whole = request.body_for(deployment)
        head, chunked = request.head_for(self.heads[deployment.upstream], whole)
        exchange = self._exchange(sink, conn, body, handler, None, None, with_future=True)
        exchange.attempt = attempt
        exchange.run = run
        exchange.strip = None
        sink.exchange = exchange
        try:
            if whole is not None:
                conn.start_exchange(exchange, request.method, head, False, [whole], end=True)
            else:
                chunks = list(run.sent or ())
                if body.complete:
                    # What arrived while a connection was found goes out with the rest.
                    rest = body.take_buffered()
                    if rest:
                        chunks += rest
                        run.sent = chunks
                        if run.replay is not None:
                            run.replay.extend(rest)
                    conn.start_exchange(exchange, request.method, head, chunked, chunks, end=True)
                else:
                    conn.start_exchange(exchange, request.method, head, chunked, chunks)
                    await self._pump_body(conn, exchange, body, run.replay)
                    if run.replay is not None and body.received > self.retry_buffer_bytes:
                        run.replay = None
            await exchange.done
            return True
        except BaseException as exc:
            if not exchange.finished:
                exchange.finished = True
                conn.detach()
            if isinstance(exc, ProxyError) and self._judge(run, attempt, exc, exchange.response_started, body, pool):
                return False
            raise

    def _judge(
        self,
        run: "Run",
        attempt: Attempt,
        exc: ProxyError,
        response_started: bool,
        body: "RequestBody",
        pool: ConnectionPool,
        acquiring: bool = False,
    ) -> bool:
        """After a failed attempt: record it (ejection, metrics) and decide whether the
        request goes again (True) or is answered with ``exc`` (False). ``acquiring``: it
        failed getting a connection (nothing was sent)."""
        request, state = run.request, attempt.state
        if acquiring:
            kind: Optional[str] = outlier.CONNECT
        else:
            kind = self._failure_kind(exc, response_started, request, body, run.replay)
        if kind is None:  # not a failure another attempt could mend
            if isinstance(exc, UpstreamError) and not response_started:
                self.failed(state, exc.message)
                state.count(state.attempts, "failure")
            return False
        run.last_error = exc
        if kind == outlier.UNSENT and run.stale < MAX_STALE_RETRIES:
            # The keep-alive race: the same upstream again, on a fresh connection;
            # nobody's failure, and not another of the gateway's attempts.
            run.stale += 1
            pool.stats.stale_retries += 1
            state.count(state.attempts, "stale")
            run.fresh = True
            run.attempts -= 1
            if getattr(exc, "request_sent", False):
                run.sent = run.replay
            return True
        if kind == outlier.CONNECT:
            state.count(state.attempts, "connect_error")
            if not isinstance(exc, PoolTimeout):  # a full pool is not the upstream's failure
                self.failed(state, exc.message)
            if not self._may_retry(attempt, written=False, budgeted=False):
                return False
        elif kind != outlier.STATUS:  # a status was judged as it arrived
            self.failed(state, exc.message)
            state.count(state.attempts, kind)
            if not self._retry_after_failure(attempt, kind, request, body, run.replay):
                return False
            if request.whole is None:
                run.sent = run.replay  # what was written, to write again
        run.tried.append(attempt.deployment.upstream)
        run.fresh = False
        if not run.is_retry:
            run.is_retry = True
            self.retries_in_flight += 1
        return True

    def _failure_kind(
        self,
        exc: BaseException,
        response_started: bool,
        request: RoutedRequest,
        body: "RequestBody",
        replay: Optional[List[bytes]],
    ) -> Optional[str]:
        """The outlier kind of an attempt's failure, or None: nothing to retry (the
        response had begun, the client left, the body was bad, a protocol error)."""
        if isinstance(exc, RetryableStatus):
            return outlier.STATUS
        if response_started:
            return None
        if isinstance(exc, UpstreamDisconnected):
            return self._disconnect_kind(exc, request, body, replay)
        if isinstance(exc, UpstreamTimeout):
            return outlier.TIMEOUT
        return None

    def _disconnect_kind(
        self, exc: UpstreamDisconnected, request: RoutedRequest, body: "RequestBody", replay: Optional[List[bytes]]
    ) -> str:
        if not exc.request_sent:
            return outlier.UNSENT
        # A reused connection the upstream closed as we wrote to it, for a request that
        # may be repeated and that we can repeat whole: the stale race, as before.
        if exc.reused and request.method in IDEMPOTENT_METHODS and body.complete:
            if request.whole is not None or (replay is not None and body.received <= self.retry_buffer_bytes):
                return outlier.UNSENT
        return outlier.RESET

    def _retry_after_failure(
        self, attempt: Attempt, kind: str, request: RoutedRequest, body: "RequestBody", replay: Optional[List[bytes]]
    ) -> bool:
        spec = request.route.spec
        retry_on = spec.retry_on if spec is not None else frozenset()
        if not outlier.retryable(kind, 0, retry_on):
            return False
        if request.whole is None:
            # A streamed body: only when what was written is all at hand again.
            if replay is None or not body.complete or body.received > self.retry_buffer_bytes:
                return False
        elif not self._replayable(request):
            return False
        return self._may_retry(attempt, written=False)

    async def _pump_body(self, conn: Any, exchange: Any, body: "RequestBody", replay: Optional[List[bytes]]) -> None:
        limit = self.retry_buffer_bytes
        while not exchange.finished:
            try:
                chunks = await body.read()
            except ProxyError:
                if exchange.finished:
                    return
                raise
            if exchange.finished:
                return
            if chunks is None:
                conn.send_end()
                return
            conn.send_body_chunks(chunks)
            if replay is not None and body.received <= limit:
                replay.extend(chunks)
            if conn.write_paused:
                try:
                    await conn.drain()
                except OSError:
                    if exchange.finished:
                        return
                    raise UpstreamDisconnected("upstream connection lost while sending the request body") from None

    # --- the active check's verdicts, admin and shutdown ---------------------------------------

    def check_passed(self, name: str) -> None:
        state = self.states[name]
        state.checked_ok = True
        if state.ejected(self.loop.time()):
            outlier.end_ejection(state)
            log.info("upstream %s passed its check: back in rotation", name)

    def check_failed(self, name: str, error: str) -> None:
        state = self.states[name]
        if state.checked_ok is not False:
            log.warning("upstream %s failed its check: %s", name, error)
        state.checked_ok = False
        state.recent_errors.append((self.loop.time(), "check: " + error))

    def describe(self) -> Dict[str, Any]:
        now = self.loop.time()
        wall_offset = time.time() - now
        out: Dict[str, Any] = {}
        for name, state in self.states.items():
            pool = self.pools[name]
            entry = state.describe(now, wall_offset)
            entry["origin"] = self.specs[name].upstream.origin
            entry["key_injected"] = self.specs[name].api_key is not None
            entry["pool"] = pool.gauges()
            out[name] = entry
        return out

    def snapshot(self) -> Dict[str, Any]:
        now = self.loop.time()
        return {
            name: {
                "requests": dict(state.requests),
                "attempts": state.attempt_counts(),
                "ejections": state.ejections,
                "up": 1 if state.up(now) else 0,
                "in_flight": state.in_flight,
            }
            for name, state in self.states.items()
        }

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        if self.admission is not None:
            self.admission.close()
        for pool in self.pools.values():
            pool.close()
