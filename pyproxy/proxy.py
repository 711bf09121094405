"""The proxy's lifecycle: listen, track client connections, observe requests, drain and stop."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from time import perf_counter
from typing import Any, Callable, Dict, Optional, Sequence, Set, Tuple

from pyproxy._compat import is_uvloop
from pyproxy.accesslog import AccessLog
from pyproxy.admin import AdminServer, AdminSource, admin_token_bytes
from pyproxy.cache.layer import Cache
from pyproxy.cache.policy import invalidated_targets
from pyproxy.config import ConfigError, Settings
from pyproxy.dedup import Coalescer
from pyproxy.errors import BadRequest
from pyproxy.gateway.probe import GatewayChecks
from pyproxy.gateway.relay import Gateway
from pyproxy.handler import Handler
from pyproxy.health import UpstreamProbe
from pyproxy.http.messages import RequestHead
from pyproxy.metrics import RequestMetrics, snapshot
from pyproxy.routing import Endpoints
from pyproxy.server.heap import HeapReleaser
from pyproxy.server.idle import IdleSweeper, tick_for
from pyproxy.server.protocol import BufferedClientConnection, ClientConnection
from pyproxy.upstream.pool import ConnectionPool

log = logging.getLogger("pyproxy")

# On shutdown, an idle client connection gets this long to deliver a request
# that may already be on its way before it is closed.
DRAIN_IDLE_GRACE = 1.0
# On shutdown, how long connections already accepted may take to be set up (to
# reach connection_made) before draining goes on without them.
SETUP_SETTLE_TIMEOUT = 1.0


class Proxy:
    def __init__(
        self,
        settings: Settings,
        loop: Optional[asyncio.AbstractEventLoop] = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock`` is the wall clock cache ages are measured by (tests pass a fake one)."""
        if settings.upstream is None:
            raise ValueError("settings.upstream is required")
        self.settings = settings
        self.loop = loop or asyncio.get_event_loop()
        # Several upstreams ([[upstreams]]): the gateway owns one pool per upstream, and the
        # first one's pool stands for "the" pool in the metrics of one-upstream code.
        self.gateway: Optional[Gateway] = Gateway(settings, self.loop) if settings.gateway is not None else None
        if self.gateway is not None:
            self.pool = next(iter(self.gateway.pools.values()))
        else:
            self.pool = ConnectionPool(settings.upstream, settings, self.loop)
        self.cache: Optional[Cache] = Cache(settings, self.loop, clock) if settings.cache_enabled else None
        self.coalescer = Coalescer(
            settings.dedup_replay_bytes, settings.dedup_max_backlog, settings.inflight_buffer_bytes
        )
        self.metrics = RequestMetrics()
        # Idle and busy connections' --client-timeout deadlines, on one timer.
        self.idle = IdleSweeper(self.loop, tick_for(settings.client_timeout))
        self.heap = HeapReleaser(self.loop)  # counts connection churn; started if --heap-release
        self.endpoints = Endpoints(settings)
        self.handler = Handler(settings, self.pool, self.cache, self.coalescer, self.metrics, self.gateway)
        self.gateway_checks = GatewayChecks(self.gateway, settings) if self.gateway is not None else None
        self.access_log: Optional[AccessLog] = None
        self.probe = UpstreamProbe(settings.upstream, settings.health_interval, settings.connect_timeout)
        self.admin: Optional[AdminServer] = None
        # Response headers pyproxy adds to every response (X-Request-Id, Server-Timing).
        self.decorate = settings.request_id or settings.server_timing
        self.connections: Set[ClientConnection] = set()
        self.draining = False
        self.stats_client_errors = 0
        self.stats_sse_pings = 0  # --sse-keepalive comments written
        self._server: Optional[asyncio.AbstractServer] = None
        # stdlib loop: read into a reused buffer (see ReusedBufferReads)
        self._protocol = ClientConnection if is_uvloop(self.loop) else BufferedClientConnection
        self._all_closed: Optional[asyncio.Event] = None
        self._setting_up = 0  # accepted connections whose connection_made has not run yet
        self._drain_grace: Optional[float] = None  # set once draining: for late arrivals

    async def start(self, sock: Optional[socket.socket] = None, *, admin: bool = True) -> None:
        """Listen (on ``sock`` if given: a worker's inherited socket). ``admin``: run the
        admin listener and the upstream probe here (a supervisor runs its own instead)."""
        settings = self.settings
        if settings.access_log is not None:
            self.access_log = AccessLog(settings.access_log, settings.access_log_format)
        try:
            if sock is not None:
                self._server = await self.loop.create_server(self._new_connection, sock=sock, backlog=2048)
            else:
                host, port = self.settings.listen
                self._server = await self.loop.create_server(
                    self._new_connection, host, port, reuse_address=True, backlog=2048
                )
        except OSError as exc:
            await self._stop_aux()
            host, port = self.settings.listen
            raise ConfigError(f"--listen {host}:{port}: {exc.strerror or exc}") from None
        if admin and settings.admin_listen is not None:  # the probe feeds the admin /health only
            self.admin = AdminServer(ProxyAdmin(self), admin_token_bytes(settings))
            try:
                await self.admin.start(*settings.admin_listen)
            except OSError as exc:
                self.admin = None
                if self._server is not None:
                    self._server.close()
                    await self._server.wait_closed()
                await self._stop_aux()
                host, port = settings.admin_listen
                raise ConfigError(f"--admin-listen {host}:{port}: {exc.strerror or exc}") from None
            # Started only once every address is bound: a start-up failure leaves
            # nothing running in the background to wait for.
            self.probe.start()
        if self.gateway_checks is not None:  # they bring ejected upstreams back: every worker runs them
            self.gateway_checks.start()
        if settings.heap_release:
            self.heap.start()
        if self.gateway is not None and self.gateway.admission is not None:
            self.gateway.admission.start()  # every worker watches the keys file itself

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return self._server.sockets[0].getsockname()[1]

    def unsafe_answered(self, request: RequestHead, status: int, headers: Sequence[Tuple[bytes, bytes]]) -> None:
        """A response to an unsafe method is starting (the cache is on): RFC 9111 §4.4
        invalidation. A method a cache rule stores (POST to a chat completion, keyed
        by its body) is a read by the operator's word: it does not invalidate the
        entries it is stored among -- else every miss would empty its own path."""
        if not 200 <= status < 400 or self.cache is None:
            return
        try:
            target, cache_rule, _ = self.handler.router.route(request.method, request.target)
        except BadRequest:  # pragma: no cover - refused before any response
            return
        if cache_rule is not None:
            return
        host = next((v for n, v in request.headers if n == b"host"), b"")
        targets = invalidated_targets(request.method, status, target, host, b"http", headers)
        if targets:
            self.cache.invalidate(targets)

    def request_done(self, client: ClientConnection, status: int) -> None:
        """Once per request, when its response ended (or could not be completed)."""
        method = _METHODS.get(client._method, "other")
        endpoint = self.endpoints.name(client._method, client.req_target)
        duration = perf_counter() - client.started_at
        body = client.body
        bytes_in = body.received if body is not None else 0
        self.metrics.request_done(
            endpoint, method, status, duration, client.upstream_ttfb, bytes_in, client.bytes_out, client.upstream_name
        )
        admitted = client.admitted
        usage = None
        if admitted is not None:  # [auth] mode = "keys": free its slot, settle its tokens
            client.admitted = None
            client.meter = None
            usage = self.gateway.admission.done(admitted, status, client.cache_status, client.dedup_status)  # type: ignore[union-attr]
        if self.access_log is not None:
            self.access_log.log(
                client.client_ip.decode("latin-1"),
                client._method.decode("latin-1"),
                client.req_target,
                status,
                client.bytes_out,
                duration,
                client.upstream_ttfb,
                client.cache_status.decode("latin-1"),
                client.dedup_status.decode("latin-1"),
                client.request_id.decode("latin-1"),
                client.upstream_name,
                client.attempts,
                usage,
            )

    def _new_connection(self) -> ClientConnection:
        """The protocol factory: a connection taken from the listening socket, not yet
        set up (its connection_made comes at least one loop iteration later)."""
        self._setting_up += 1
        return self._protocol(self)

    def connection_opened(self, conn: ClientConnection) -> None:
        self._setting_up -= 1
        self.connections.add(conn)
        self.heap.churn += 1
        if self._drain_grace is not None:  # accepted before stop(), set up after it
            conn.begin_drain(self._drain_grace)

    def connection_closed(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        self.heap.churn += 1
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()

    async def stop(self, drain_timeout: Optional[float] = None) -> None:
        """Stop accepting, let in-flight requests finish (up to the drain timeout), close."""
        if drain_timeout is None:
            drain_timeout = self.settings.drain_timeout
        self.draining = True
        if self._server is not None:
            await self._stop_accepting(self._server)
        # Logged only once the listening socket is closed: whoever reads this
        # line may rely on new connections being refused.
        log.info(
            "shutting down: stopped accepting; draining %d connection(s), up to %g s",
            len(self.connections),
            drain_timeout,
        )
        self._all_closed = asyncio.Event()
        grace = self._drain_grace = min(DRAIN_IDLE_GRACE, drain_timeout / 2)
        for conn in list(self.connections):
            conn.begin_drain(grace)
        if self.connections:
            try:
                await asyncio.wait_for(self._all_closed.wait(), drain_timeout)
            except asyncio.TimeoutError:
                log.warning("drain timeout: closing %d connection(s) with requests in flight", len(self.connections))
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        self.pool.close()
        self.idle.close()
        if self.gateway is not None:
            self.gateway.close()
        if self.cache is not None:
            await self.cache.close()
        await self._stop_aux()
        if self._server is not None:
            await self._server.wait_closed()
        # Let the transports' connection_lost callbacks run before the loop ends.
        await asyncio.sleep(0)

    async def _stop_accepting(self, server: asyncio.AbstractServer) -> None:
        """Close the listener without dropping a connection already taken from it.

        Both loops accept in a batch and set each connection up a loop iteration or
        more later. asyncio's Server.close() makes those pending setups fail (CPython
        gh-109564: Server._attach asserts), so the client is reset even though the
        kernel had handed its connection to this process. So: stop reading the
        listening sockets first, let the setups already scheduled take their first
        step, close, then wait for every accepted connection to be set up; each then
        drains like any other. With a listening socket shared by workers, whatever
        was not accepted stays queued for the others."""
        loop = self.loop
        for sock in server.sockets or ():
            loop.remove_reader(sock.fileno())  # asyncio's accept callback; a no-op on uvloop
        await asyncio.sleep(0)
        server.close()
        deadline = loop.time() + SETUP_SETTLE_TIMEOUT
        while self._setting_up > 0 and loop.time() < deadline:
            await asyncio.sleep(0.001)

    async def _stop_aux(self) -> None:
        self.heap.stop()
        await self.probe.stop()
        if self.gateway_checks is not None:
            await self.gateway_checks.stop()
        if self.admin is not None:
            await self.admin.stop()
            self.admin = None
        if self.access_log is not None:
            self.access_log.close()
            self.access_log = None


_METHODS: Dict[bytes, str] = {
    m: m.decode() for m in (b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS")
}


class ProxyAdmin(AdminSource):
    """The admin endpoints of one proxy process."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def snapshot(self) -> Dict[str, Any]:
        return snapshot(self.proxy)

    def health(self) -> Dict[str, Any]:
        return {"status": "ok", "draining": self.proxy.draining, "upstream": self.proxy.probe.state()}

    async def upstreams(self) -> Dict[str, Any]:
        return upstreams_view(self.proxy)

    def auth_config(self) -> Any:
        gateway = self.proxy.settings.gateway
        return gateway.auth if gateway is not None else None

    def ready(self) -> bool:
        return not self.proxy.draining

    async def purge(self, path: Optional[bytes], prefix: Optional[bytes]) -> int:
        cache = self.proxy.cache
        return await cache.purge(path=path, prefix=prefix) if cache is not None else 0


def upstreams_view(proxy: Proxy) -> Dict[str, Any]:
    """The admin /upstreams answer of one process: state, load, latency, errors, pool."""
    if proxy.gateway is not None:
        return proxy.gateway.describe()
    pool = proxy.pool
    upstream = proxy.settings.upstream
    assert upstream is not None
    return {
        "default": {
            "origin": upstream.origin,
            "state": "up" if proxy.probe.reachable is not False else "failing_check",
            "in_flight": len(pool.active),
            "pool": pool.gauges(),
        }
    }
