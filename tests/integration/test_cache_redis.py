"""The Redis backend against a real redis-server started by the test on a free port."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from typing import List

import redis.asyncio

from pyproxy.cache.entry import CachedResponse
from pyproxy.cache.redis_store import NAMESPACE
from tests.support.client import request, running_proxy
from tests.support.origin import MODELS_BODY, Origin, Received, Reply
from tests.support.redis_server import RedisServer, free_port

MODELS = b"/v1/models"
AUTH = [(b"authorization", b"Bearer sk-shared-test")]


def models_hits(origin: Origin) -> int:
    return sum(1 for r in origin.requests if r.target == MODELS)


async def redis_keys(server: RedisServer) -> int:
    """Cache entries in Redis (not the per-target invalidation indexes beside them)."""
    client = redis.asyncio.Redis.from_url(server.url)
    try:
        return len(await client.keys(NAMESPACE + b"*"))
    finally:
        await (client.aclose() if hasattr(client, "aclose") else client.close())


async def test_two_proxies_share_one_cache() -> None:
    async with RedisServer() as server, Origin() as origin:
        async with (
            running_proxy(origin.url, cache_backend=server.url) as a,
            running_proxy(origin.url, cache_backend=server.url) as b,
        ):
            first = await request(a.port, b"GET", MODELS, AUTH)
            assert first.header(b"x-cache") == b"MISS" and first.body == MODELS_BODY
            # The write to Redis is fire-and-forget: wait for it to land.
            await wait_until_async(lambda: redis_keys(server), 1)
            second = await request(b.port, b"GET", MODELS, AUTH)
            assert second.header(b"x-cache") == b"HIT" and second.body == MODELS_BODY
            assert second.header(b"age") is not None
            # Another caller is another entry, in Redis as in memory.
            other = await request(b.port, b"GET", MODELS, [(b"authorization", b"Bearer sk-other")])
            assert other.header(b"x-cache") == b"MISS"
            assert models_hits(origin) == 2
            # Purge through one proxy empties the cache for both.
            await wait_until_async(lambda: redis_keys(server), 2)
            assert a.cache is not None and await a.cache.purge(path=MODELS) == 2
            assert (await request(b.port, b"GET", MODELS, AUTH)).header(b"x-cache") == b"MISS"


async def test_gzip_form_is_made_by_the_writer_and_shared() -> None:
    """An entry goes to Redis with its gzip form, so the instances reading it serve
    gzip clients without compressing on every hit."""
    big = json.dumps({"data": [{"id": f"model-{i}", "object": "model"} for i in range(200)]}).encode()
    gzip_accepted = [(b"accept-encoding", b"gzip")]
    async with RedisServer() as server, Origin() as origin:

        @origin.route(MODELS)
        async def models(req: Received, reply: Reply) -> None:
            await reply.full(200, big)

        async with (
            running_proxy(origin.url, cache_backend=server.url) as a,
            running_proxy(origin.url, cache_backend=server.url) as b,
        ):
            first = await request(a.port, b"GET", MODELS, AUTH)  # a client without gzip
            assert first.header(b"x-cache") == b"MISS" and first.body == big
            await wait_until_async(lambda: redis_keys(server), 1)
            client = redis.asyncio.Redis.from_url(server.url)
            try:
                (key,) = await client.keys(NAMESPACE + b"*")
                stored = CachedResponse.from_bytes(await client.get(key))
            finally:
                await client.aclose()
            assert stored is not None and stored.body == big
            size = stored.size
            variant = stored.gzipped(1, 10**9)  # the stored form, whatever is asked now
            assert variant is not None and gzip.decompress(variant[1]) == big and stored.size == size
            hit = await request(b.port, b"GET", MODELS, AUTH + gzip_accepted)
            assert hit.header(b"x-cache") == b"HIT" and hit.header(b"content-encoding") == b"gzip"
            assert hit.body == variant[1]
            assert models_hits(origin) == 1


async def test_redis_killed_and_restarted_mid_test() -> None:
    server = RedisServer()
    await server.start()
    try:
        async with (
            Origin() as origin,
            running_proxy(origin.url, cache_backend=server.url, cache_redis_timeout=0.2) as proxy,
        ):
            assert proxy.cache is not None
            stats = proxy.cache.stats
            await request(proxy.port, b"GET", MODELS, AUTH)
            await wait_until_async(lambda: redis_keys(server), 1)
            assert (await request(proxy.port, b"GET", MODELS, AUTH)).header(b"x-cache") == b"HIT"

            server.kill()
            # Every request still succeeds, as a miss, and promptly.
            durations: List[float] = []
            for _ in range(20):
                started = time.monotonic()
                resp = await request(proxy.port, b"GET", MODELS, AUTH)
                durations.append(time.monotonic() - started)
                assert resp.status == 200 and resp.body == MODELS_BODY
                assert resp.header(b"x-cache") == b"MISS"
            assert stats.errors >= 1
            # The circuit is open after the first error: requests do not wait on
            # Redis at all (the bound holds with a wide margin on a loaded machine).
            assert sorted(durations)[len(durations) // 2] < 0.5, durations

            await server.start()  # the same port
            # It recovers by itself: a miss stores again, then a hit.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while (await request(proxy.port, b"GET", MODELS, AUTH)).header(b"x-cache") != b"HIT":
                assert loop.time() < deadline, "the cache did not recover after Redis came back"
                await asyncio.sleep(0.05)
    finally:
        server.kill()


async def test_redis_that_never_answers_costs_one_timeout_then_nothing() -> None:
    """A black hole: accepts connections, never replies."""
    held: List[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(65536):
            pass

    hole = await asyncio.start_server(swallow, "127.0.0.1", free_port())
    port = hole.sockets[0].getsockname()[1]
    try:
        async with (
            Origin() as origin,
            running_proxy(origin.url, cache_backend=f"redis://127.0.0.1:{port}/0", cache_redis_timeout=0.2) as proxy,
        ):
            started = time.monotonic()
            resp = await request(proxy.port, b"GET", MODELS, AUTH)
            first = time.monotonic() - started
            assert resp.status == 200 and resp.header(b"x-cache") == b"MISS"
            assert first < 3.0  # one 0.2 s deadline, with a wide margin for a loaded machine
            assert proxy.cache is not None and proxy.cache.stats.errors >= 1
            for _ in range(5):
                assert (await request(proxy.port, b"GET", MODELS, AUTH)).status == 200
    finally:
        for writer in held:
            writer.close()
        hole.close()
        await hole.wait_closed()


async def wait_until_async(probe, expected: int, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await probe() < expected:
        if loop.time() > deadline:
            raise AssertionError(f"redis did not reach {expected} keys within {timeout} s")
        await asyncio.sleep(0.01)


async def test_an_unsafe_request_through_one_proxy_invalidates_for_every_proxy_and_caller() -> None:
    """RFC 9111 §4.4 through Redis: a POST answered 201 via B removes what A stored for
    its target, under every caller (test_cache.py has the rest of §4.4, in memory)."""
    async with RedisServer() as server, Origin() as origin:

        @origin.route(b"/items")
        async def items(req: Received, reply: Reply) -> None:
            if req.method == b"GET":
                await reply.full(200, b"[1, 2]", [(b"cache-control", b"public, max-age=600")])
            elif req.header(b"x-fail"):
                await reply.full(500, b"no")
            else:
                await reply.full(201, b"created")

        callers = [[(b"authorization", b"Bearer sk-one")], [(b"authorization", b"Bearer sk-two")]]
        async with (
            running_proxy(origin.url, cache_backend=server.url) as a,
            running_proxy(origin.url, cache_backend=server.url) as b,
        ):
            for caller in callers:
                assert (await request(a.port, b"GET", b"/items", caller)).header(b"x-cache") == b"MISS"
            await wait_until_async(lambda: redis_keys(server), 2)
            for caller in callers:
                assert (await request(b.port, b"GET", b"/items", caller)).header(b"x-cache") == b"HIT"
            created = await request(b.port, b"POST", b"/items", [], b"{}")
            assert created.status == 201
            # The invalidation runs in the background, like writes: wait for it to land.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while await redis_keys(server) > 0:
                assert loop.time() < deadline, "the invalidation never reached Redis"
                await asyncio.sleep(0.01)
            for caller in callers:
                assert (await request(a.port, b"GET", b"/items", caller)).header(b"x-cache") == b"MISS"


def serve_by_language(origin: Origin) -> None:
    """/v answers in the request's Accept-Language, varying on it, fresh for 10 minutes."""

    @origin.route(b"/v")
    async def varying(req: Received, reply: Reply) -> None:
        language = req.header(b"accept-language") or b"-"
        await reply.full(200, b"in " + language, [(b"cache-control", b"max-age=600"), (b"vary", b"accept-language")])


async def test_two_variants_are_both_served_through_redis() -> None:
    """RFC 9111 §4.1 in the shared store: the marker and each variant under its key."""
    async with RedisServer() as server, Origin() as origin:
        serve_by_language(origin)

        async with (
            running_proxy(origin.url, cache_backend=server.url) as a,
            running_proxy(origin.url, cache_backend=server.url) as b,
        ):
            for language in (b"en", b"de"):
                resp = await request(a.port, b"GET", b"/v", [(b"accept-language", language)])
                assert resp.header(b"x-cache") == b"MISS"
            await wait_until_async(lambda: redis_keys(server), 3)  # two variants and the marker
            for language in (b"de", b"en"):
                resp = await request(b.port, b"GET", b"/v", [(b"accept-language", language)])
                assert resp.header(b"x-cache") == b"HIT" and resp.body == b"in " + language
            assert len(origin.requests) == 2


async def test_variants_per_key_are_bounded_in_redis_too() -> None:
    """RFC 9111 §4.1 with bounded memory: past MAX_VARIANTS variants of one key, the
    earliest stored leave Redis (the marker stays), seen from a second instance."""
    from pyproxy.cache.store import MAX_VARIANTS

    async with RedisServer() as server, Origin() as origin:
        serve_by_language(origin)

        languages = [b"l%d" % i for i in range(MAX_VARIANTS + 2)]
        async with (
            running_proxy(origin.url, cache_backend=server.url) as a,
            running_proxy(origin.url, cache_backend=server.url) as b,
        ):
            assert a.cache is not None
            loop = asyncio.get_running_loop()
            for language in languages:  # one at a time, each write done before the next
                resp = await request(a.port, b"GET", b"/v", [(b"accept-language", language)])
                assert resp.header(b"x-cache") == b"MISS"
                deadline = loop.time() + 5
                while a.cache.store._writes:
                    assert loop.time() < deadline, "a write to Redis never finished"
                    await asyncio.sleep(0.01)
            assert await redis_keys(server) == 1 + MAX_VARIANTS  # the marker and the newest
            for language in reversed(languages[2:]):
                resp = await request(b.port, b"GET", b"/v", [(b"accept-language", language)])
                assert resp.header(b"x-cache") == b"HIT" and resp.body == b"in " + language
            for language in languages[:2]:
                assert (await request(b.port, b"GET", b"/v", [(b"accept-language", language)])).header(
                    b"x-cache"
                ) == b"MISS"
