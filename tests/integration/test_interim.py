"""Interim responses (RFC 9110 §15.2): an upstream's 1xx reaches HTTP/1.1 clients
before the final response, and never HTTP/1.0 clients or the cache."""

from __future__ import annotations

from tests.support.client import raw_exchange, running_proxy
from tests.support.origin import Origin, Received, Reply

HINTS = b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n"
PROCESSING = b"HTTP/1.1 102 Processing\r\n\r\n"


def add_hinting_route(origin: Origin, path: bytes, headers=()) -> None:  # type: ignore[no-untyped-def]
    @origin.route(path)
    async def route(req: Received, reply: Reply) -> None:
        await reply.raw(PROCESSING + HINTS)  # before the final head, as a server sends them
        await reply.full(200, b"final", [(b"content-type", b"text/plain")] + list(headers))


def request_bytes(path: bytes, version: bytes = b"1.1") -> bytes:
    return b"GET %s HTTP/%s\r\nHost: proxy.test\r\nConnection: close\r\n\r\n" % (path, version)


async def test_early_hints_and_processing_reach_the_client_before_the_final_response() -> None:
    async with Origin() as origin, running_proxy(origin.url, cache_enabled=False, dedup_enabled=False) as proxy:
        add_hinting_route(origin, b"/page")
        raw = await raw_exchange(proxy.port, request_bytes(b"/page"))
        hints = raw.find(b"HTTP/1.1 103 Early Hints\r\n")
        processing = raw.find(b"HTTP/1.1 102 Processing\r\n")
        final = raw.find(b"HTTP/1.1 200 ")
        assert 0 <= processing < hints < final, raw[:400]
        assert b"link: </style.css>; rel=preload" in raw[hints:final]
        assert raw.endswith(b"final")


async def test_an_http10_client_gets_no_interim_response() -> None:
    async with Origin() as origin, running_proxy(origin.url, cache_enabled=False, dedup_enabled=False) as proxy:
        add_hinting_route(origin, b"/page")
        raw = await raw_exchange(proxy.port, request_bytes(b"/page", b"1.0"))
        assert raw.startswith(b"HTTP/1.1 200 ") and b" 103 " not in raw and b" 102 " not in raw


async def test_interim_responses_pass_through_the_cache_and_are_never_stored() -> None:
    async with Origin() as origin, running_proxy(origin.url) as proxy:
        add_hinting_route(origin, b"/cached", [(b"cache-control", b"max-age=60")])
        first = await raw_exchange(proxy.port, request_bytes(b"/cached"))
        assert first.find(b" 103 Early Hints") < first.find(b"HTTP/1.1 200 ") and b"x-cache: MISS" in first
        hit = await raw_exchange(proxy.port, request_bytes(b"/cached"))
        assert hit.startswith(b"HTTP/1.1 200 ") and b"x-cache: HIT" in hit and b" 103 " not in hit
        assert hit.endswith(b"final") and len(origin.requests) == 1
