"""Upstream failures are honest: 502 / 504 / 503, truncation stays truncation,
stale keep-alive connections are retried only when that is safe."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import List

import pytest

from tests.support.client import Client, raw_exchange, request, running_proxy, wait_until
from tests.support.origin import Origin, Received, Reply
from tests.support.sockets import blackholed_port, free_port


async def test_connection_refused_is_502() -> None:
    port = free_port()  # nothing listens there any more
    async with running_proxy(f"http://127.0.0.1:{port}") as proxy:
        resp = await request(proxy.port, b"GET", b"/v1/models")
        assert resp.status == 502
        error = resp.json()["error"]
        assert error["code"] == 502 and error["type"] == "upstream_error"
        assert "cannot connect" in error["message"]


@pytest.mark.loops("asyncio")  # uvloop resolves inside C: no injection point there
async def test_dns_failure_is_502(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resolution failure, injected into the resolver so no query leaves the machine."""
    loop = asyncio.get_running_loop()

    async def no_such_host(*args: object, **kwargs: object) -> List[object]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(loop, "getaddrinfo", no_such_host)
    async with running_proxy("http://upstream.invalid:8000") as proxy:
        resp = await request(proxy.port, b"GET", b"/v1/models")
        assert resp.status == 502
        assert "Name or service not known" in resp.json()["error"]["message"]


async def test_connect_timeout_is_504() -> None:
    with blackholed_port() as port:
        async with running_proxy(f"http://127.0.0.1:{port}", connect_timeout=0.3) as proxy:
            started = time.monotonic()
            resp = await request(proxy.port, b"GET", b"/v1/models")
            assert resp.status == 504, resp.body
            assert "timed out" in resp.json()["error"]["message"]
            assert time.monotonic() - started < 5


async def test_read_timeout_before_head_is_504() -> None:
    async with Origin() as origin, running_proxy(origin.url, read_timeout=0.3) as proxy:

        @origin.route(b"/hang")
        async def hang(req: Received, reply: Reply) -> None:
            await asyncio.sleep(3)

        resp = await request(proxy.port, b"GET", b"/hang")
        assert resp.status == 504
        assert "read timeout" in resp.json()["error"]["message"]
        await asyncio.wait_for(origin.connections[0].closed.wait(), 5)


async def test_read_timeout_resets_on_every_read() -> None:
    """--read-timeout is the longest silence, not a total: a slow but steady stream passes."""
    async with Origin() as origin, running_proxy(origin.url, read_timeout=0.3) as proxy:
        resp = await request(proxy.port, b"GET", b"/sse?n=8&interval=0.1")  # 0.7 s in all
        assert resp.status == 200 and resp.complete
        assert resp.body.count(b"data: ") == 9


async def test_read_timeout_mid_body_truncates() -> None:
    async with Origin() as origin, running_proxy(origin.url, read_timeout=0.3) as proxy:

        @origin.route(b"/stall")
        async def stall(req: Received, reply: Reply) -> None:
            await reply.head(200, [(b"content-length", b"100")])
            await reply.data(b"x" * 10)
            await asyncio.sleep(3)

        resp = await request(proxy.port, b"GET", b"/stall")
        assert resp.status == 200
        assert not resp.complete and resp.body == b"x" * 10


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_upstream_dies_mid_body_client_sees_truncation(framing: str) -> None:
    async with Origin() as origin, running_proxy(origin.url) as proxy:

        @origin.route(b"/die")
        async def die(req: Received, reply: Reply) -> None:
            headers = [(b"content-length", b"1000")] if framing == "content-length" else []
            await reply.head(200, headers)
            await reply.data(b"y" * 100)
            reply.writer.transport.abort()

        async with await Client.connect(proxy.port) as client:
            resp = await client.request(b"GET", b"/die")
            assert resp.status == 200
            assert resp.body == b"y" * 100
            assert not resp.complete, "a truncated upstream body must look truncated"
            assert await client.reader.read() == b""  # and the connection is closed


async def test_invalid_upstream_response_is_502() -> None:
    async with Origin() as origin, running_proxy(origin.url) as proxy:

        @origin.route(b"/garbage")
        async def garbage(req: Received, reply: Reply) -> None:
            await reply.raw(b"NOT HTTP AT ALL\r\n\r\n")
            reply.writer.close()

        resp = await request(proxy.port, b"GET", b"/garbage")
        assert resp.status == 502
        assert "invalid response" in resp.json()["error"]["message"]


async def test_pool_exhausted_is_503_with_retry_after() -> None:
    release = asyncio.Event()
    async with (
        Origin() as origin,
        running_proxy(origin.url, pool_connections=1, keepalive_connections=1, pool_timeout=0.2) as proxy,
    ):

        @origin.route(b"/slow")
        async def slow(req: Received, reply: Reply) -> None:
            await release.wait()
            await reply.full(200, b"slow")

        first = asyncio.ensure_future(request(proxy.port, b"GET", b"/slow"))
        await wait_until(lambda: len(origin.requests) == 1)
        resp = await request(proxy.port, b"GET", b"/v1/models")
        assert resp.status == 503
        assert resp.header(b"retry-after") == b"1"
        assert resp.json()["error"]["type"] == "overloaded_error"
        release.set()
        assert (await first).body == b"slow"
        # the slot is free again, and a waiter within the limit is served
        second = asyncio.ensure_future(request(proxy.port, b"GET", b"/v1/models"))
        third = asyncio.ensure_future(request(proxy.port, b"GET", b"/v1/models"))
        assert (await second).status == 200 and (await third).status == 200
        assert proxy.pool.size <= 1


async def test_stale_keepalive_under_load_no_get_errors_no_duplicate_posts() -> None:
    """The origin closes idle connections after 0.2 s while the proxy keeps them 4 s:
    GETs never fail, and no POST ever reaches the origin twice."""
    async with Origin(idle_close_after=0.2) as origin, running_proxy(origin.url) as proxy:
        get_statuses = []
        post_statuses = []
        async with await Client.connect(proxy.port) as client:
            for i in range(12):
                get_statuses.append((await client.request(b"GET", b"/v1/models")).status)
                body = json.dumps({"id": i}).encode()
                post_statuses.append((await client.request(b"POST", b"/echo", [], body)).status)
                await asyncio.sleep(0.2 + (i % 3) * 0.01)
        assert get_statuses == [200] * 12
        posted = [json.loads(r.body)["id"] for r in origin.requests if r.method == b"POST"]
        assert len(posted) == len(set(posted)), "a POST reached the upstream twice"
        assert post_statuses.count(200) == len(posted)
        assert proxy.pool.stats.stale_closed >= 1  # stale connections were noticed


async def test_reused_connection_dropped_before_answer_retries_get_not_post() -> None:
    """Deterministic version of the stale race: the origin accepts a second request
    on a kept-alive connection and closes without answering."""
    async with Origin() as origin, running_proxy(origin.url) as proxy:
        served_per_conn: dict = {}

        @origin.route(b"/flaky")
        async def flaky(req: Received, reply: Reply) -> None:
            served_per_conn[req.conn_id] = served_per_conn.get(req.conn_id, 0) + 1
            if served_per_conn[req.conn_id] == 2:
                reply.writer.transport.abort()  # dropped, as if closed while idle
                return
            await reply.full(200, req.method)

        async with await Client.connect(proxy.port) as client:
            assert (await client.request(b"GET", b"/flaky")).status == 200
            resp = await client.request(b"GET", b"/flaky")  # reuses conn 0, dropped, retried
            assert resp.status == 200 and resp.body == b"GET"
            assert proxy.pool.stats.stale_retries == 1
        gets = [r for r in origin.requests if r.method == b"GET"]
        assert len(gets) == 3  # first, dropped, retried

        # The retried GET left a fresh connection (1 request served) idle.
        async with await Client.connect(proxy.port) as client:
            resp = await client.request(b"POST", b"/flaky", [], b'{"n": 1}')  # its 2nd: dropped
            assert resp.status == 502
            assert resp.json()["error"]["message"] == "upstream closed the connection without a response"
        posts = [r for r in origin.requests if r.method == b"POST"]
        assert len(posts) == 1, "a POST that may have reached the upstream was sent again"
        assert proxy.pool.stats.stale_retries == 1


async def test_client_abort_mid_sse_closes_upstream_promptly() -> None:
    async with Origin() as origin, running_proxy(origin.url) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET /sse?n=500&interval=2 HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        data = b""
        while b"data: " not in data:
            data += await reader.read(4096)
        # The origin now waits 2 s before its next event: only the proxy
        # closing the upstream connection can end it early.
        aborted_at = time.monotonic()
        writer.transport.abort()
        await asyncio.wait_for(origin.connections[0].closed.wait(), 5)
        closed_at = origin.connections[0].closed_at
        assert closed_at is not None
        # 2 s would mean the origin only noticed on its next write; the margin is for
        # a loaded machine under PyPy
        assert closed_at - aborted_at < 0.5, closed_at - aborted_at
        assert proxy.pool.size == 0


async def test_client_abort_while_waiting_for_head_closes_upstream() -> None:
    async with Origin() as origin, running_proxy(origin.url) as proxy:

        @origin.route(b"/think")
        async def think(req: Received, reply: Reply) -> None:
            await asyncio.sleep(5)

        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"POST /think HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        await wait_until(lambda: len(origin.requests) == 1)
        writer.transport.abort()
        await asyncio.wait_for(origin.connections[0].closed.wait(), 2)
        await wait_until(lambda: proxy.pool.size == 0)


async def test_upstream_error_keeps_client_connection_usable() -> None:
    port = free_port()
    async with running_proxy(f"http://127.0.0.1:{port}") as proxy:
        async with await Client.connect(proxy.port) as client:
            assert (await client.request(b"GET", b"/a")).status == 502
            assert (await client.request(b"GET", b"/b")).status == 502  # same connection


async def test_expect_100_continue() -> None:
    async with Origin() as origin, running_proxy(origin.url) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 ")
        writer.write(b"hello")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        writer.close()
        await writer.wait_closed()
        assert origin.requests[0].body == b"hello"
        assert origin.requests[0].header(b"expect") is None


async def test_oversized_body_with_expect_gets_413_without_100() -> None:
    async with Origin() as origin, running_proxy(origin.url, max_body_size=10) as proxy:
        raw = await raw_exchange(
            proxy.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\nExpect: 100-continue\r\n\r\n"
        )
        assert raw.startswith(b"HTTP/1.1 413 ")
        assert origin.raw_received == b""
