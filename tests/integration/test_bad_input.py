"""Malformed or ambiguous requests: a precise 4xx, the connection closed, and
zero bytes sent upstream (RFC 9112 §2.2, §6.3; request smuggling defences)."""

from __future__ import annotations

import json

import pytest

from tests.support.client import parse_raw_response, raw_exchange, running_proxy
from tests.support.origin import Origin

BAD_REQUESTS = {
    "cl_and_te": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "differing_content_lengths": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        400,
    ),
    "content_length_list": (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4, 5\r\n\r\nabcde", 400),
    "negative_content_length": (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
    "obfuscated_te_xchunked": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "obfuscated_te_list": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        400,
    ),
    "te_twice": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "te_vertical_tab": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "bad_chunk_size": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    "chunk_size_overflow_sign": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    "whitespace_before_colon": (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Test : 1\r\n\r\n", 400),
    "no_host_http11": (b"GET /v1/models HTTP/1.1\r\nAccept: */*\r\n\r\n", 400),
    "bare_lf_garbage": (b"GARBAGE\r\n\r\n", 400),
    "bad_version": (b"GET /v1/models HTTP/7.1\r\nHost: x\r\n\r\n", 505),
    "nul_in_header": (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),
    "authority_form": (b"OPTIONS proxy.test:80 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    # A GET goes through the cache and coalescer's routing first: it must answer too.
    "authority_form_get": (b"GET example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "no_slash_get": (b"GET example.com HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "connect": (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405),
    "content_length_too_large": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n",
        413,
    ),
    "chunked_body_too_large": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"400\r\n"
        + b"a" * 1024
        + b"\r\n"
        + b"400\r\n"
        + b"a" * 1024
        + b"\r\n0\r\n\r\n",
        413,
    ),
    "headers_too_large": (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n", 431),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
async def test_bad_request_rejected_and_never_forwarded(case: str) -> None:
    raw_request, expected_status = BAD_REQUESTS[case]
    async with Origin() as origin, running_proxy(origin.url, max_body_size=1500, max_header_size=4096) as proxy:
        raw = await raw_exchange(proxy.port, raw_request)  # returns only once the proxy closed
        resp = parse_raw_response(raw)
        assert resp.status == expected_status, raw
        assert resp.header(b"connection") == b"close"
        assert resp.header(b"date") is not None and resp.header(b"date").endswith(b" GMT")
        error = json.loads(resp.body)["error"]
        assert error["code"] == expected_status
        assert error["type"] == "invalid_request_error"
        assert error["message"]
        assert origin.raw_received == b"", f"bytes reached the upstream: {origin.raw_received!r}"
        assert origin.connections == [] or all(not c.raw for c in origin.connections)


async def test_chunk_error_after_streaming_started_never_completes_upstream_request() -> None:
    """A bad chunk after good ones: the upstream saw a request that never completes
    (its connection is aborted), and the client gets 400 and a close."""
    async with Origin() as origin, running_proxy(origin.url) as proxy:
        import asyncio

        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        # wait until the head has reached the origin, then break the body
        from tests.support.client import wait_until

        await wait_until(lambda: origin.raw_received.endswith(b"hello\r\n"))
        writer.write(b"zz\r\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await writer.wait_closed()
        assert parse_raw_response(raw).status == 400
        await asyncio.wait_for(origin.connections[0].closed.wait(), 5)
        assert origin.requests == []  # the origin never saw a complete request
        assert not origin.raw_received.endswith(b"0\r\n\r\n")


async def test_underscore_headers_dropped_by_default() -> None:
    async with Origin() as origin, running_proxy(origin.url) as proxy:
        raw = await raw_exchange(
            proxy.port,
            b"GET /echo HTTP/1.1\r\nHost: x\r\nTransfer_Encoding: chunked\r\nX_Api_Key: k\r\nX-Ok: 1\r\nConnection: close\r\n\r\n",
        )
        assert parse_raw_response(raw).status == 200
        names = [k for k, _ in origin.requests[0].headers]
        assert b"transfer_encoding" not in names and b"x_api_key" not in names
        assert b"x-ok" in names


async def test_underscore_headers_forwarded_when_allowed() -> None:
    async with Origin() as origin, running_proxy(origin.url, allow_underscore_headers=True) as proxy:
        raw = await raw_exchange(
            proxy.port, b"GET /echo HTTP/1.1\r\nHost: x\r\nX_Custom: 1\r\nConnection: close\r\n\r\n"
        )
        assert parse_raw_response(raw).status == 200
        assert origin.requests[0].header(b"x_custom") == b"1"


async def test_hop_by_hop_and_connection_named_headers_removed_both_ways() -> None:
    async with Origin() as origin, running_proxy(origin.url) as proxy:
        from tests.support.origin import Received, Reply

        @origin.route(b"/hop")
        async def hop(req: Received, reply: Reply) -> None:
            await reply.full(
                200,
                b"ok",
                [
                    (b"connection", b"x-secret-hop"),
                    (b"x-secret-hop", b"1"),
                    (b"keep-alive", b"timeout=5"),
                    (b"x-end-to-end", b"yes"),
                    (b"proxy-authenticate", b"Basic"),
                ],
            )

        raw = await raw_exchange(
            proxy.port,
            b"GET /hop HTTP/1.1\r\nHost: x\r\nConnection: close, X-Private\r\nX-Private: 1\r\nKeep-Alive: 300\r\n"
            b"TE: trailers\r\nUpgrade: websocket\r\nProxy-Authorization: Basic abc\r\nProxy-Connection: keep-alive\r\n"
            b"X-Keep: yes\r\n\r\n",
        )
        resp = parse_raw_response(raw)
        assert resp.status == 200 and resp.body == b"ok"
        got = {k for k, _ in origin.requests[0].headers}
        for name in (b"x-private", b"keep-alive", b"te", b"upgrade", b"proxy-authorization", b"proxy-connection"):
            assert name not in got, name
        assert origin.requests[0].header(b"connection") in (None, b"keep-alive")
        assert b"x-keep" in got
        sent_back = {k for k, _ in resp.headers}
        assert b"x-secret-hop" not in sent_back and b"keep-alive" not in sent_back
        assert b"proxy-authenticate" not in sent_back
        assert b"x-end-to-end" in sent_back


async def test_idle_client_with_partial_head_gets_408_and_is_closed() -> None:
    import asyncio

    async with Origin() as origin, running_proxy(origin.url, header_timeout=0.3) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")  # never finished (slowloris)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await writer.wait_closed()
        assert parse_raw_response(data).status == 408
        assert origin.raw_received == b""


async def test_idle_keepalive_client_is_closed_silently() -> None:
    import asyncio

    async with Origin() as origin, running_proxy(origin.url, client_timeout=0.3) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        data = await asyncio.wait_for(reader.read(), 10)  # sends nothing at all
        writer.close()
        await writer.wait_closed()
        assert data == b""
        assert proxy.metrics.limits["idle_timeout"] == 1


async def test_obs_fold_is_unfolded_not_forwarded_raw() -> None:
    """RFC 9112 §5.2: replace obs-fold with SP before forwarding (h11 does)."""
    async with Origin() as origin, running_proxy(origin.url) as proxy:
        raw = await raw_exchange(
            proxy.port, b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Test: a\r\n b\r\nConnection: close\r\n\r\n"
        )
        assert parse_raw_response(raw).status == 200
        assert origin.requests[0].header(b"x-test") == b"a b"
        assert b"\r\n b" not in origin.raw_received
