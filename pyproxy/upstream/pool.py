"""The upstream connection pool for one origin.

Shape borrowed from httpcore and aiohttp: every public operation first
*decides* synchronously (which idle connection, whether a new one may be
opened, which expired ones to close) and only then *acts* (awaits I/O).

* idle connections are reused most-recent-first (LIFO): the warmest socket is
  the least likely to have been closed by the upstream;
* one timer expires idle connections before the upstream's own idle timeout;
* a released connection goes straight to the oldest waiter;
* waiting for a slot is bounded by ``pool_timeout`` (then 503 + Retry-After).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from typing import Any, Deque, Optional, Set, Union

from pyproxy._compat import is_uvloop
from pyproxy.config import Settings, Upstream
from pyproxy.errors import PoolTimeout, UpstreamConnectError, UpstreamTimeout
from pyproxy.upstream.connection import ACTIVE, CLOSED, IDLE, BufferedUpstreamConnection, UpstreamConnection

log = logging.getLogger("pyproxy.pool")

# Idle connections beyond --keepalive-connections live at most this long.
SURPLUS_GRACE = 1.0

# A waiter is woken with a ready connection, or with SLOT: "you may open one".
SLOT = object()
Grant = Union[UpstreamConnection, object]


def make_ssl_context(cafile: Optional[str]) -> ssl.SSLContext:
    """Verify the upstream's certificate and hostname; system CAs unless told otherwise."""
    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols(["http/1.1"])
    return context


def _close_orphan(connect: "asyncio.Task[Any]") -> None:
    """A connect nobody waits for any more finished: close what it opened."""
    if connect.cancelled() or connect.exception() is not None:
        return
    _, conn = connect.result()
    conn.close()


class PoolStats:
    __slots__ = ("connects", "reuses", "connect_errors", "pool_timeouts", "expired", "stale_closed", "stale_retries")

    def __init__(self) -> None:
        self.connects = 0
        self.reuses = 0
        self.connect_errors = 0
        self.pool_timeouts = 0
        self.expired = 0
        self.stale_closed = 0
        self.stale_retries = 0


class ConnectionPool:
    def __init__(
        self,
        upstream: Upstream,
        settings: Settings,
        loop: asyncio.AbstractEventLoop,
        max_connections: Optional[int] = None,
    ) -> None:
        """``max_connections``: this pool's bound (a gateway upstream's own), else --pool-connections."""
        self.upstream = upstream
        self.loop = loop
        self.max_connections = max_connections or settings.pool_connections
        self.max_idle = min(settings.keepalive_connections, self.max_connections)
        # how many more may sit idle briefly (see release)
        self.max_surplus = self.max_connections - self.max_idle
        self.keepalive_expiry = settings.keepalive_expiry
        self.connect_timeout = settings.connect_timeout
        self.read_timeout = settings.read_timeout
        self.pool_timeout = settings.pool_timeout
        self.ssl_context = make_ssl_context(settings.upstream_ca) if upstream.tls else None
        self.idle: Deque[UpstreamConnection] = deque()
        self.active: Set[UpstreamConnection] = set()
        self.connecting = 0
        self.waiters: Deque[asyncio.Future[Grant]] = deque()
        self.stats = PoolStats()
        self.closed = False
        self._sweep: Optional[asyncio.TimerHandle] = None
        # stdlib loop: read into a reused buffer (see ReusedBufferReads)
        self._protocol = UpstreamConnection if is_uvloop(loop) else BufferedUpstreamConnection

    # --- counts ----------------------------------------------------------------

    def gauges(self) -> dict:
        return {
            "active": len(self.active),
            "idle": len(self.idle),
            "connecting": self.connecting,
            "waiting": len(self.waiters),
            "max": self.max_connections,
        }

    @property
    def size(self) -> int:
        return len(self.idle) + len(self.active) + self.connecting

    # --- checkout ----------------------------------------------------------------

    async def acquire(self, fresh: bool = False, probe: bool = False) -> UpstreamConnection:
        """A connection for one exchange. ``fresh``: skip the idle ones (a retry after a
        stale connection: the others idle as long may be stale too) and open a new one
        while the bound allows; at the bound, a released connection is still taken.
        ``probe``: see take_idle."""
        if self.closed:
            raise UpstreamConnectError("proxy is shutting down")
        if not fresh:
            conn = self.take_idle(probe)
            if conn is not None:
                return conn
        elif self.size >= self.max_connections and self.idle:
            # Make room: an idle connection is the least useful use of the slot.
            self.idle.popleft().close()
        if self.size < self.max_connections:
            return await self._open()
        grant = await self._wait_for_grant()
        if grant is SLOT:
            return await self._open()
        return grant  # type: ignore[return-value]

    def take_idle(self, probe: bool = False) -> Optional[UpstreamConnection]:
        """Decide: the most recently used live connection, closing expired ones.
        ``probe`` (for a request that is not retried once written): first ask the
        socket whether the upstream already closed it (UpstreamConnection.peer_closed);
        such a connection is closed and the next one tried."""
        now = self.loop.time()
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.state != IDLE or conn.transport is None or conn.transport.is_closing():
                continue
            if conn.is_expired(now, self.keepalive_expiry):
                # Everything older is expired too: LIFO keeps the deque age-ordered.
                self.stats.expired += 1 + len(idle)
                self._close_all_idle(conn)
                return None
            if probe and conn.peer_closed():
                self.stats.stale_closed += 1
                conn.close()
                continue
            conn.state = ACTIVE
            self.active.add(conn)
            self.stats.reuses += 1
            return conn
        return None

    def close_idle(self) -> int:
        """Close every idle connection (the next request opens a new one); returns how many."""
        doomed = list(self.idle)
        self.idle.clear()
        for conn in doomed:
            conn.close()
        return len(doomed)

    def _close_all_idle(self, first: UpstreamConnection) -> None:
        first.close()
        self.close_idle()

    async def _wait_for_grant(self) -> Grant:
        waiter: asyncio.Future[Grant] = self.loop.create_future()
        self.waiters.append(waiter)
        timer = self.loop.call_later(self.pool_timeout, self._expire_waiter, waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            # Cancelled after being granted something: pass it on, never leak it.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._regrant(waiter.result())
            raise
        finally:
            timer.cancel()
            try:
                self.waiters.remove(waiter)
            except ValueError:
                pass

    def _expire_waiter(self, waiter: asyncio.Future[Grant]) -> None:
        if not waiter.done():
            self.stats.pool_timeouts += 1
            retry_after = max(1, int(round(self.pool_timeout)))
            waiter.set_exception(
                PoolTimeout(
                    f"all {self.max_connections} upstream connections are busy (waited {self.pool_timeout:g} s)",
                    retry_after=retry_after,
                )
            )

    def _regrant(self, grant: Grant) -> None:
        if grant is SLOT:
            self._slot_freed()
        else:
            self.release(grant)  # type: ignore[arg-type]

    async def _open(self) -> UpstreamConnection:
        self.connecting += 1
        opened: Optional[UpstreamConnection] = None
        upstream = self.upstream
        # The connect runs shielded, so that when the request is cancelled (its client
        # left) or times out, a connection completing anyway is closed by
        # _close_orphan instead of leaking: asyncio.wait_for alone drops such a
        # connection on Python 3.9 (an open socket nobody owns), and on 3.11 returns
        # it to the cancelled caller, swallowing the cancellation -- which is why the
        # handler checks that its sink is still there after acquire().
        connect = self.loop.create_task(
            self.loop.create_connection(
                lambda: self._protocol(self, self.loop, self.read_timeout),
                upstream.host,
                upstream.port,
                ssl=self.ssl_context,
                server_hostname=upstream.host if self.ssl_context is not None else None,
            )
        )
        try:
            try:
                _, opened = await asyncio.wait_for(asyncio.shield(connect), self.connect_timeout)
            except (asyncio.CancelledError, asyncio.TimeoutError):
                connect.cancel()
                connect.add_done_callback(_close_orphan)
                raise
        except asyncio.TimeoutError:
            self.stats.connect_errors += 1
            raise UpstreamTimeout(
                f"connecting to upstream {upstream.origin} timed out after {self.connect_timeout:g} s"
            ) from None
        except ssl.SSLError as exc:
            self.stats.connect_errors += 1
            raise UpstreamConnectError(
                f"TLS handshake with upstream {upstream.origin} failed: {exc.reason or exc}"
            ) from None
        except OSError as exc:
            self.stats.connect_errors += 1
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise UpstreamConnectError(f"cannot connect to upstream {upstream.origin}: {reason}") from None
        finally:
            self.connecting -= 1
            if opened is None:
                self._slot_freed()
        self.stats.connects += 1
        if self.closed:
            opened.close()
            raise UpstreamConnectError("proxy is shutting down")
        opened.state = ACTIVE
        self.active.add(opened)
        return opened

    # --- checkin -------------------------------------------------------------------

    def release(self, conn: UpstreamConnection) -> None:
        """A connection whose exchange completed cleanly (both h11 sides DONE)."""
        self.active.discard(conn)
        if conn.state == CLOSED or self.closed:
            conn.close()
            return
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                conn.state = ACTIVE
                self.active.add(conn)
                self.stats.reuses += 1
                waiter.set_result(conn)
                return
        if len(self.idle) >= self.max_idle + self.max_surplus:
            conn.close()
            return
        # Past --keepalive-connections the connection is still kept for a
        # moment: under a burst wider than the idle bound, closing it now only
        # to open another an instant later would churn sockets. The sweep
        # trims the surplus once it has sat idle for SURPLUS_GRACE.
        conn.state = IDLE
        now = conn.idle_since = self.loop.time()
        self.idle.append(conn)
        delay = self.keepalive_expiry
        if len(self.idle) > self.max_idle:
            delay = min(delay, SURPLUS_GRACE)
        self._schedule_sweep(now + delay)

    def on_connection_closed(self, conn: UpstreamConnection) -> None:
        """Called once per connection when it closes, whoever closed it."""
        was_idle = False
        self.active.discard(conn)
        try:
            self.idle.remove(conn)
            was_idle = True
        except ValueError:
            pass
        if was_idle and not self.closed:
            self.stats.stale_closed += 1
        self._slot_freed()

    def _slot_freed(self) -> None:
        if self.closed:
            return
        while self.waiters and self.size < self.max_connections:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(SLOT)
                return

    def _sweep_idle(self) -> None:
        """The one expiry timer: close idle connections past keepalive_expiry."""
        self._sweep = None
        now = self.loop.time()
        idle = self.idle
        while idle and idle[0].is_expired(now, self.keepalive_expiry):
            conn = idle.popleft()
            self.stats.expired += 1
            conn.close()
        # The oldest idle connections beyond the idle bound, once past the grace.
        while len(idle) > self.max_idle and idle[0].is_expired(now, SURPLUS_GRACE):
            idle.popleft().close()
        if idle:
            when = idle[0].idle_since + self.keepalive_expiry
            if len(idle) > self.max_idle:
                when = min(when, idle[0].idle_since + SURPLUS_GRACE)
            self._schedule_sweep(max(now + 0.05, when))

    def _schedule_sweep(self, when: float) -> None:
        """One timer for the whole pool, moved earlier when needed, never later."""
        if self._sweep is not None:
            if self._sweep.when() <= when:
                return
            self._sweep.cancel()
        self._sweep = self.loop.call_at(when, self._sweep_idle)

    # --- shutdown --------------------------------------------------------------------

    def close(self) -> None:
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for waiter in list(self.waiters):
            if not waiter.done():
                waiter.set_exception(UpstreamConnectError("proxy is shutting down"))
        self.waiters.clear()
        for conn in list(self.idle) + list(self.active):
            conn.close()
        self.idle.clear()
        self.active.clear()
