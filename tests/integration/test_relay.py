"""Happy-path relaying: methods, headers, keep-alive, framing, pipelining."""

from __future__ import annotations

import asyncio
import hashlib
import json

from tests.support.client import Client, parse_raw_response, raw_exchange, request, running_proxy
from tests.support.origin import MODELS_BODY, Origin, Received, Reply


async def test_get_models_relayed() -> None:
    async with Origin() as origin, running_proxy(origin.url) as proxy:
        resp = await request(proxy.port, b"GET", b"/v1/models")
        assert resp.status == 200
        assert resp.body == MODELS_BODY
        assert resp.header(b"via") == b"1.1 pyproxy"
        assert resp.header(b"content-length") == str(len(MODELS_BODY)).encode()
        assert len(origin.requests) == 1
        seen = origin.requests[0]
        assert seen.method == b"GET" and seen.target == b"/v1/models"
        assert seen.header(b"host") == f"127.0.0.1:{origin.port}".encode()
        assert seen.header(b"x-forwarded-for") == b"127.0.0.1"
        assert seen.header(b"x-forwarded-proto") == b"http"
        assert seen.header(b"x-forwarded-host") == b"proxy.test"
        assert seen.header(b"via") == b"1.1 pyproxy"


async def test_client_and_upstream_sockets_send_small_writes_at_once() -> None:
    """TCP_NODELAY on both sides (an SSE event must not wait for Nagle): the loop sets
    it on every TCP transport, pyproxy relies on that for client connections."""
    import socket

    async with Origin() as origin, running_proxy(origin.url) as proxy:
        async with await Client.connect(proxy.port) as client:
            assert (await client.request(b"GET", b"/v1/models")).status == 200
            (conn,) = proxy.connections
            for transport in (conn.transport, proxy.pool.idle[0].transport):  # type: ignore[union-attr]
                sock = transport.get_extra_info("socket")
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


async def test_post_body_and_keepalive_reuse_one_upstream_connection() -> None:
    async with Origin() as origin, running_proxy(origin.url) as proxy:
        async with await Client.connect(proxy.port) as client:
            for i in range(5):
                body = json.dumps({"model": "gpt-test", "n": i}).encode()
                resp = await client.request(b"POST", b"/echo", [(b"content-type", b"application/json")], body)
                assert resp.status == 200
                info = resp.json()
                assert info["method"] == "POST"
                assert info["body_sha256"] == hashlib.sha256(body).hexdigest()
        assert len(origin.requests) == 5
        assert len(origin.connections) == 1  # the pool reused one upstream connection
        assert proxy.pool.stats.connects == 1 and proxy.pool.stats.reuses == 4


async def test_path_prefix_and_absolute_form_target() -> None:
    async with Origin() as origin, running_proxy(origin.url + "/api/") as proxy:
        origin.routes[b"/api/v1/models"] = origin.routes[b"/v1/models"]
        resp = await request(proxy.port, b"GET", b"http://proxy.test/v1/models?x=1")
        assert resp.status == 200
        assert origin.requests[0].target == b"/api/v1/models?x=1"


async def test_upstream_chunked_response_rechunked_to_client() -> None:
    async with Origin() as origin, running_proxy(origin.url) as proxy:
        resp = await request(proxy.port, b"GET", b"/chunked")
        assert resp.status == 200 and resp.body == b"hello chunked world"
        assert resp.header(b"transfer-encoding") == b"chunked"


async def test_http10_client_gets_close_delimited_body() -> None:
    async with Origin() as origin, running_proxy(origin.url) as proxy:
        raw = await raw_exchange(proxy.port, b"GET /chunked HTTP/1.0\r\nHost: x\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200 ")
        head, _, body = raw.partition(b"\r\n\r\n")
        assert b"transfer-encoding" not in head.lower()
        assert body == b"hello chunked world"


async def test_head_request_keeps_content_length_without_body() -> None:
    async with Origin() as origin, running_proxy(origin.url) as proxy:
        async with await Client.connect(proxy.port) as client:
            resp = await client.request(b"HEAD", b"/big?size=5000")
            assert resp.status == 200 and resp.body == b""
            assert resp.header(b"content-length") == b"5000"
            # the connection is still usable after a HEAD
            resp = await client.request(b"GET", b"/v1/models")
            assert resp.body == MODELS_BODY


async def test_204_and_304_have_no_body() -> None:
    async with Origin() as origin, running_proxy(origin.url) as proxy:

        @origin.route(b"/nocontent")
        async def nocontent(req: Received, reply: Reply) -> None:
            await reply.head(204, [])
            await reply.end()

        @origin.route(b"/notmodified")
        async def notmodified(req: Received, reply: Reply) -> None:
            await reply.head(304, [(b"etag", b'"v1"')])
            await reply.end()

        async with await Client.connect(proxy.port) as client:
            resp = await client.request(b"GET", b"/nocontent")
            assert resp.status == 204 and resp.body == b""
            assert resp.header(b"transfer-encoding") is None
            resp = await client.request(b"GET", b"/notmodified")
            assert resp.status == 304 and resp.header(b"etag") == b'"v1"'
            resp = await client.request(b"GET", b"/v1/models")
            assert resp.status == 200


async def test_pipelined_requests_answered_in_order() -> None:
    async with Origin() as origin, running_proxy(origin.url) as proxy:

        @origin.route(b"/slow")
        async def slow(req: Received, reply: Reply) -> None:
            await asyncio.sleep(0.05)
            await reply.full(200, b"slow")

        @origin.route(b"/fast")
        async def fast(req: Received, reply: Reply) -> None:
            await reply.full(200, b"fast")

        pipeline = (
            b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /fast HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        raw = await raw_exchange(proxy.port, pipeline)
        parts = raw.split(b"HTTP/1.1 ")[1:]
        assert len(parts) == 4
        assert parse_raw_response(b"HTTP/1.1 " + parts[0]).body == b"slow"
        assert parse_raw_response(b"HTTP/1.1 " + parts[1]).body == b"fast"
        assert json.loads(parse_raw_response(b"HTTP/1.1 " + parts[2]).body)["body_len"] == 3
        assert parse_raw_response(b"HTTP/1.1 " + parts[3]).body == b"fast"
        assert [r.target for r in origin.requests] == [b"/slow", b"/fast", b"/echo", b"/fast"]
