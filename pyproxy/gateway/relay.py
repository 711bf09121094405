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
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

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
from pyproxy.gateway.balancer import choose, observe_latency
from pyproxy.gateway.config import DEFAULT_MAX_ATTEMPTS, Deployment, GatewayConfig, UpstreamSpec
from pyproxy.gateway.models import GatewayRoutes, Target, rewrite_model
from pyproxy.gateway.state import UpstreamState
from pyproxy.http.fastpath import serialize_request_head
from pyproxy.http.headers import client_response_headers
from pyproxy.http.messages import ResponseHead
from pyproxy.server.protocol import ClientGone
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
# RFC 9110 §9.2.2: a request with one of these methods may be repeated.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


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

    __slots__ = ("method", "target", "headers", "chunked", "route", "whole", "_bodies", "content_length")

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
        self._bodies: Dict[str, bytes] = {}

    def body_for(self, deployment: Deployment) -> Optional[bytes]:
        """The body for this deployment: the model renamed when it must be, else as sent."""
        whole = self.whole
        if whole is None:
            return None
        model = self.route.model_for(deployment)
        if model is None:
            return whole
        body = self._bodies.get(model)
        if body is None:
            body = self._bodies[model] = rewrite_model(whole, model)
        return body

    def head_for(self, spec: UpstreamSpec, body: Optional[bytes]) -> Tuple[bytes, bool]:
        """The request head for one upstream, and whether its body goes chunked."""
        upstream = spec.upstream
        credential = spec.credential_header()
        headers: List[Header] = [(b"host", upstream.host_header)]
        if credential is None:
            headers += self.headers
        else:
            headers += [h for h in self.headers if h[0] not in CREDENTIAL_HEADERS]
            headers.append(credential)
        chunked = False
        if body is not None:
            headers.append((b"content-length", b"%d" % len(body)))
        elif self.chunked:
            headers.append((b"transfer-encoding", b"chunked"))
            chunked = True
        elif self.content_length is not None:
            headers.append((b"content-length", b"%d" % self.content_length))
        target = self.target
        if upstream.prefix:
            target = upstream.prefix + (target if target != b"*" else b"/")
        return serialize_request_head(self.method, target, headers), chunked


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

        __slots__ = ("attempt",)

        def on_response(self, head: ResponseHead) -> None:
            attempt: Attempt = self.attempt
            gateway = attempt.gateway
            ttfb = perf_counter() - self.sent_at
            if gateway.retry_on_response(attempt, head, ttfb):
                self.finished = True
                self.conn.detach()  # the rest of that response is not wanted
                done = self.done
                if done is not None and not done.done():
                    done.set_exception(RetryableStatus(head.status))
                return
            self.response_started = True
            client = self.client
            client.upstream_ttfb = ttfb
            headers = client_response_headers(head.headers)
            if gateway.upstream_headers:
                last = headers.pop() if headers and headers[-1][0] == b"content-length" else None
                headers.append((b"x-pyproxy-upstream", attempt.deployment.upstream.encode("ascii")))
                headers.append((b"x-pyproxy-attempts", b"%d" % attempt.number))
                if last is not None:
                    headers.append(last)  # by contract the last header (see client_response_headers)
            note = getattr(client, "note_upstream", None)
            if note is not None:
                note(attempt.deployment.upstream, attempt.number)
            client.start_response(head.status, head.reason, headers)
            if client._write_paused:
                self.conn.pause_reading()

        def on_error(self, exc: ProxyError) -> None:
            if self.response_started and not isinstance(exc, ClientStalled):
                self.attempt.gateway.failed(self.attempt.state, "truncated: " + exc.message)
            super().on_error(exc)

    return GatewayExchange


class Gateway:
    def __init__(self, settings: "Settings", loop: asyncio.AbstractEventLoop) -> None:
        config = settings.gateway
        assert config is not None
        self.config: GatewayConfig = config
        self.loop = loop
        self.routes = GatewayRoutes(config)
        self.specs: Dict[str, UpstreamSpec] = {spec.name: spec for spec in config.upstreams}
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

    # --- deciding, with the pure functions -----------------------------------------------

    def retry_on_response(self, attempt: Attempt, head: ResponseHead, ttfb: float) -> bool:
        """A response head arrived: record it, and say whether it is discarded for a
        retry elsewhere (decided now, while nothing has reached the client)."""
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

    def _may_retry(self, attempt: Attempt, *, written: bool) -> bool:
        request = attempt.request
        spec = request.route.spec
        max_attempts = spec.max_attempts if spec is not None else DEFAULT_MAX_ATTEMPTS
        if attempt.number >= max_attempts:
            return False
        if not outlier.budget_allows(self.requests_in_flight, self.retries_in_flight):
            return False
        if written and not self._replayable(request):
            return False
        # Another deployment must be there to take it: else the answer we have is relayed.
        tried = attempt.tried + [attempt.deployment.upstream]
        return choose(request.route.deployments, self.states, self.loop.time(), self.rng, tried).deployment is not None

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

    async def run(
        self, handler: "Handler", sink: Any, request: RoutedRequest, body: "RequestBody", sent: Optional[List[bytes]]
    ) -> None:
        attempts: List[int] = [0]
        try:
            await self._attempts(handler, sink, request, body, sent, attempts)
        except (asyncio.CancelledError, ClientGone):
            pass
        except ProxyError as exc:
            if attempts[0]:
                exc.added_headers = [(b"x-pyproxy-attempts", b"%d" % attempts[0])] if self.upstream_headers else []
            handler.log_failure(request.method, request.target, exc)
            sink.send_error(exc)
        except Exception:  # pragma: no cover - a bug; the client still gets an answer
            log.exception("unexpected error while proxying")
            sink.send_error(ProxyError("internal proxy error"))

    async def _attempts(
        self,
        handler: "Handler",
        sink: Any,
        request: RoutedRequest,
        body: "RequestBody",
        sent: Optional[List[bytes]],
        counter: List[int],
    ) -> None:
        route = request.route
        tried: List[str] = []
        last_error: Optional[ProxyError] = None
        stale = 0
        fresh = False
        is_retry = False
        # Body chunks written, kept for a retry while they fit the retry buffer (a body
        # read whole to route by model is kept as it is).
        replay: Optional[List[bytes]] = list(sent or ()) if request.whole is None else None
        self.requests_in_flight += 1
        try:
            while True:
                now = self.loop.time()
                choice = choose(route.deployments, self.states, now, self.rng, tried)
                if choice.deployment is None:
                    if last_error is not None:
                        raise last_error
                    raise NoUpstreamAvailable(
                        "no upstream is available for this request (all ejected, cooling down or busy)",
                        retry_after=max(1, int(choice.retry_after + 0.999)),
                    )
                deployment = choice.deployment
                counter[0] += 1
                attempt = Attempt(self, request, deployment, counter[0], tried)
                state = attempt.state
                pool = self.pools[deployment.upstream]
                state.in_flight += 1
                try:
                    try:
                        conn = await pool.acquire(fresh=fresh)
                    except UpstreamError as exc:  # connect refused or timed out, or the pool was full
                        state.count(state.attempts, "connect_error")
                        if not isinstance(exc, PoolTimeout):  # a full pool is not a failure
                            self.failed(state, exc.message)
                        last_error = exc
                        if not self._may_retry(attempt, written=False):
                            raise
                        tried.append(deployment.upstream)
                        fresh = False
                        if not is_retry:
                            is_retry = True
                            self.retries_in_flight += 1
                        continue
                    if sink.gone or body.error is not None:
                        pool.release(conn)
                        if body.error is not None and not sink.gone:
                            raise body.error
                        return
                    whole = request.body_for(deployment)
                    head, chunked = request.head_for(self.specs[deployment.upstream], whole)
                    exchange = self._exchange(sink, conn, body, handler, None, None, with_future=True)
                    exchange.attempt = attempt
                    sink.exchange = exchange
                    try:
                        if whole is not None:
                            conn.start_exchange(exchange, request.method, head, False, [whole], end=True)
                        else:
                            chunks = list(sent or ())
                            if body.complete:
                                rest = body.take_buffered()
                                if rest:
                                    chunks += rest
                                    sent = chunks
                                    if replay is not None:
                                        replay.extend(rest)
                                conn.start_exchange(exchange, request.method, head, chunked, chunks, end=True)
                            else:
                                conn.start_exchange(exchange, request.method, head, chunked, chunks)
                                await self._pump_body(conn, exchange, body, replay)
                                if replay is not None and body.received > self.retry_buffer_bytes:
                                    replay = None
                        await exchange.done
                        return
                    except BaseException as exc:
                        if not exchange.finished:
                            exchange.finished = True
                            conn.detach()
                        kind = self._failure_kind(exc, exchange.response_started, request, body, replay)
                        if kind is None:  # not a failure another attempt could mend
                            if isinstance(exc, UpstreamError) and not exchange.response_started:
                                self.failed(state, exc.message)
                                state.count(state.attempts, "failure")
                            raise
                        last_error = exc  # type: ignore[assignment]
                        if kind == outlier.UNSENT and stale < MAX_STALE_RETRIES:
                            # The keep-alive race: the same upstream again, on a fresh connection;
                            # nobody's failure, and not another of the gateway's attempts.
                            stale += 1
                            pool.stats.stale_retries += 1
                            state.count(state.attempts, "stale")
                            fresh = True
                            counter[0] -= 1
                            if getattr(exc, "request_sent", False):
                                sent = replay
                            continue
                        if kind != outlier.STATUS:  # a status was judged as it arrived
                            self.failed(state, str(exc))
                            state.count(state.attempts, kind)
                            if not self._retry_after_failure(attempt, kind, request, body, replay):
                                raise
                            if request.whole is None:
                                sent = replay  # what was written, to write again
                        tried.append(deployment.upstream)
                        fresh = False
                        if not is_retry:
                            is_retry = True
                            self.retries_in_flight += 1
                finally:
                    state.in_flight -= 1
        finally:
            self.requests_in_flight -= 1
            if is_retry:
                self.retries_in_flight -= 1

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
                "attempts": dict(state.attempts),
                "ejections": state.ejections,
                "up": 1 if state.up(now) else 0,
                "in_flight": state.in_flight,
            }
            for name, state in self.states.items()
        }

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
