"""Pool decisions with fake connections: LIFO reuse, expiry, bounds, waiters."""

from __future__ import annotations

import asyncio
import select
import socket

import pytest

from pyproxy.config import Settings, parse_upstream
from pyproxy.errors import PoolTimeout
from pyproxy.upstream import pool as pool_module
from pyproxy.upstream.connection import ACTIVE, CLOSED, IDLE, UpstreamConnection
from pyproxy.upstream.pool import ConnectionPool
from tests.support.fakes import FakeTransport


def make_pool(**overrides: object) -> ConnectionPool:
    values = dict(upstream=parse_upstream("http://127.0.0.1:9"), keepalive_expiry=4.0)
    values.update(overrides)
    settings = Settings(**values)  # type: ignore[arg-type]
    assert settings.upstream is not None
    return ConnectionPool(settings.upstream, settings, asyncio.get_running_loop())


def add_connection(pool: ConnectionPool) -> UpstreamConnection:
    """A connection as if just opened by the pool and used once."""
    conn = UpstreamConnection(pool, pool.loop, pool.read_timeout)
    conn.connection_made(FakeTransport(conn))
    conn.state = ACTIVE
    pool.active.add(conn)
    return conn


async def test_idle_connections_are_reused_most_recent_first() -> None:
    pool = make_pool()
    a, b, c = add_connection(pool), add_connection(pool), add_connection(pool)
    for conn in (a, b, c):
        pool.release(conn)
    assert [conn.state for conn in (a, b, c)] == [IDLE] * 3
    assert await pool.acquire() is c
    assert await pool.acquire() is b
    assert pool.stats.reuses == 2
    pool.close()


async def test_expired_idle_connections_are_closed_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = make_pool(keepalive_expiry=1.0)
    a, b = add_connection(pool), add_connection(pool)
    pool.release(a)
    pool.release(b)
    now = pool.loop.time()
    a.idle_since = now - 5
    b.idle_since = now - 2
    # both expired: nothing to reuse, so acquire would connect; decide only
    assert pool.take_idle() is None
    assert a.state == CLOSED and b.state == CLOSED
    assert pool.stats.expired == 2 and not pool.idle
    pool.close()


async def test_sweep_timer_expires_idle_connections() -> None:
    pool = make_pool(keepalive_expiry=0.05)
    conn = add_connection(pool)
    pool.release(conn)
    assert pool._sweep is not None
    deadline = pool.loop.time() + 5
    while conn.state != CLOSED and pool.loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert conn.state == CLOSED and not pool.idle and pool._sweep is None
    pool.close()


async def test_idle_surplus_is_kept_briefly_then_trimmed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past --keepalive-connections a released connection survives a short grace
    (a burst reuses it instead of reconnecting), then the oldest surplus goes."""
    monkeypatch.setattr(pool_module, "SURPLUS_GRACE", 0.05)
    pool = make_pool(pool_connections=5, keepalive_connections=1)
    a, b = add_connection(pool), add_connection(pool)
    pool.release(a)
    pool.release(b)
    assert list(pool.idle) == [a, b]
    assert await pool.acquire() is b  # reused during the burst
    pool.release(b)
    deadline = pool.loop.time() + 5
    while len(pool.idle) > 1 and pool.loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert list(pool.idle) == [b] and a.state == CLOSED
    pool.close()


async def test_idle_hard_bound_is_the_pool_size() -> None:
    pool = make_pool(pool_connections=2, keepalive_connections=1)
    conns = [add_connection(pool) for _ in range(3)]  # one more than the pool allows
    for conn in conns:
        pool.release(conn)
    assert list(pool.idle) == conns[:2] and conns[2].state == CLOSED
    pool.close()


async def test_eof_on_idle_connection_removes_it() -> None:
    pool = make_pool()
    conn = add_connection(pool)
    pool.release(conn)
    conn.eof_received()  # the upstream closed its idle keep-alive connection
    assert conn.state == CLOSED and not pool.idle
    assert pool.stats.stale_closed == 1
    pool.close()


async def test_release_hands_connection_to_oldest_waiter() -> None:
    pool = make_pool(pool_connections=1, keepalive_connections=1)
    conn = add_connection(pool)
    first = asyncio.ensure_future(pool.acquire())
    second = asyncio.ensure_future(pool.acquire())
    await asyncio.sleep(0)
    assert len(pool.waiters) == 2
    pool.release(conn)
    assert await first is conn
    assert not second.done()
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)
    assert not pool.waiters
    pool.close()


async def test_waiter_times_out_with_pool_timeout() -> None:
    pool = make_pool(pool_connections=1, keepalive_connections=1, pool_timeout=0.05)
    add_connection(pool)
    with pytest.raises(PoolTimeout) as info:
        await pool.acquire()
    assert info.value.status == 503 and info.value.retry_after == 1
    assert pool.stats.pool_timeouts == 1 and not pool.waiters
    pool.close()


async def test_closed_connection_frees_a_slot_for_a_waiter() -> None:
    pool = make_pool(pool_connections=1, keepalive_connections=1)
    conn = add_connection(pool)
    waiter = asyncio.ensure_future(pool._wait_for_grant())
    await asyncio.sleep(0)
    conn.close()
    from pyproxy.upstream.pool import SLOT

    assert await waiter is SLOT
    pool.close()


async def test_cancelled_waiter_passes_its_grant_on() -> None:
    pool = make_pool(pool_connections=1, keepalive_connections=1)
    conn = add_connection(pool)
    waiter = asyncio.ensure_future(pool.acquire())
    await asyncio.sleep(0)
    pool.release(conn)  # granted...
    waiter.cancel()  # ...but cancelled before it ran
    await asyncio.gather(waiter, return_exceptions=True)
    assert list(pool.idle) == [conn] and conn.state == IDLE  # not leaked
    pool.close()


async def test_a_probe_finds_what_the_upstream_closed_before_the_loop_has_seen_it() -> None:
    """RFC 9112 §9.3.1's race, narrowed for requests that are not retried once
    written: the upstream's FIN sits in the socket, the loop has not delivered it
    yet, and take_idle(probe=True) skips that connection for a healthy one (real
    sockets; the loop never runs between the close and the take)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)
        port = listener.getsockname()[1]
        pool = make_pool(upstream=parse_upstream(f"http://127.0.0.1:{port}"))
        a, b = await pool.acquire(), await pool.acquire()
        accepted = {}
        for _ in range(2):
            server_side, peer = listener.accept()
            accepted[peer] = server_side
        try:
            pool.release(a)
            pool.release(b)  # LIFO: b would be taken first
            assert b.transport is not None
            sock = b.transport.get_extra_info("socket")
            accepted[sock.getsockname()].close()  # the upstream closes b
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
            assert poller.poll(5000), "the FIN never reached b's socket"
            assert b.state == IDLE  # the loop has not seen it
            assert pool.take_idle(probe=True) is a
            assert b.state == CLOSED and pool.stats.stale_closed == 1
            pool.release(a)
            assert pool.take_idle(probe=True) is a  # a live connection passes the probe
        finally:
            for server_side in accepted.values():
                server_side.close()
            pool.close()
