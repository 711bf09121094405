"""The cache through real sockets: an in-test origin, the proxy, and a test client.

Ages are driven by a fake wall clock handed to the proxy, so no test sleeps
for an entry to go stale.
"""

from __future__ import annotations

import asyncio
import json
from typing import Iterable, List, Tuple

from pyproxy.rules import Rule
from tests.support.client import Client, Response, raw_exchange, request, running_proxy, wait_until
from tests.support.fakes import FakeClock
from tests.support.origin import MODELS_BODY, Origin, Received, Reply

Headers = List[Tuple[bytes, bytes]]


def rule(path: bytes, methods: Iterable[bytes] = (b"GET",), **kw: object) -> Rule:
    prefix = path.endswith(b"*")
    return Rule(
        methods=frozenset(methods),
        path=path[:-1] if prefix else path,
        prefix=prefix,
        name=path.decode(),
        **kw,  # type: ignore[arg-type]
    )


def hits(origin: Origin, path: bytes) -> int:
    return sum(1 for r in origin.requests if r.target.split(b"?")[0] == path)


def add_counting_route(origin: Origin, path: bytes, headers: Headers, status: int = 200) -> None:
    """``path`` answers with its own request count, so a test sees which fetch it got."""

    @origin.route(path)
    async def route(req: Received, reply: Reply) -> None:
        body = json.dumps({"n": hits(origin, path), "auth": (req.header(b"authorization") or b"").decode()})
        await reply.full(status, body.encode(), [(b"content-type", b"application/json")] + headers)


async def test_default_rule_caches_models_with_x_cache_and_age() -> None:
    clock = FakeClock()
    async with Origin() as origin, running_proxy(origin.url, clock=clock) as proxy:
        first = await request(proxy.port, b"GET", b"/v1/models", [(b"authorization", b"Bearer a")])
        assert first.status == 200 and first.body == MODELS_BODY
        # Every response through the cache layer carries X-Cache and Age (0 when just fetched).
        assert first.header(b"x-cache") == b"MISS" and first.header(b"age") == b"0"
        clock.advance(42)
        async with await Client.connect(proxy.port) as client:
            for _ in range(3):  # keep-alive: hits keep the connection usable
                again = await client.request(b"GET", b"/v1/models", [(b"authorization", b"Bearer a")])
                assert again.status == 200 and again.body == MODELS_BODY
                assert again.header(b"x-cache") == b"HIT" and again.header(b"age") == b"42"
                assert again.header(b"content-type") == b"application/json"
        assert hits(origin, b"/v1/models") == 1
        clock.advance(300)  # past the default rule's 300 s
        stale = await request(proxy.port, b"GET", b"/v1/models", [(b"authorization", b"Bearer a")])
        assert stale.header(b"x-cache") == b"MISS" and hits(origin, b"/v1/models") == 2
        assert proxy.cache is not None
        assert (proxy.cache.stats.hits, proxy.cache.stats.misses, proxy.cache.stats.stores) == (3, 2, 2)


async def test_rfc_headers_decide_what_is_stored() -> None:
    cases = {
        b"/fresh": ([(b"cache-control", b"max-age=60")], True),
        b"/expires": ([(b"expires", b"Thu, 01 Jan 2099 00:00:00 GMT")], True),
        b"/nostore": ([(b"cache-control", b"no-store, max-age=60")], False),
        b"/private": ([(b"cache-control", b"private, max-age=60")], False),
        b"/cookie": ([(b"cache-control", b"max-age=60"), (b"set-cookie", b"s=1")], False),
        b"/varystar": ([(b"cache-control", b"max-age=60"), (b"vary", b"*")], False),
        b"/plain": ([], False),
    }
    async with Origin() as origin, running_proxy(origin.url) as proxy:
        for path, (headers, _) in cases.items():
            add_counting_route(origin, path, headers)
        for path, (_, stored) in cases.items():
            a = await request(proxy.port, b"GET", path)
            b = await request(proxy.port, b"GET", path)
            assert a.header(b"x-cache") == b"MISS", path
            assert b.header(b"x-cache") == (b"HIT" if stored else b"MISS"), path
            assert hits(origin, path) == (1 if stored else 2), path
            assert a.body == b.body if stored else a.body != b.body


async def test_authorization_needs_permission_without_a_rule_and_is_per_caller_with_one() -> None:
    async with Origin() as origin, running_proxy(origin.url) as proxy:
        add_counting_route(origin, b"/auth-plain", [(b"cache-control", b"max-age=60")])
        add_counting_route(origin, b"/auth-public", [(b"cache-control", b"public, max-age=60")])
        key = [(b"authorization", b"Bearer k1")]
        for _ in range(2):
            await request(proxy.port, b"GET", b"/auth-plain", key)
            await request(proxy.port, b"GET", b"/auth-public", key)
        assert hits(origin, b"/auth-plain") == 2  # §3.5: not stored
        assert hits(origin, b"/auth-public") == 1
        # Stored -- but keyed by the caller: another key misses.
        other = await request(proxy.port, b"GET", b"/auth-public", [(b"authorization", b"Bearer k2")])
        assert other.header(b"x-cache") == b"MISS" and other.json()["auth"] == "Bearer k2"


async def test_request_no_cache_refetches_and_no_store_bypasses() -> None:
    async with Origin() as origin, running_proxy(origin.url) as proxy:
        add_counting_route(origin, b"/r", [(b"cache-control", b"max-age=60")])
        assert (await request(proxy.port, b"GET", b"/r")).json()["n"] == 1
        assert (await request(proxy.port, b"GET", b"/r")).header(b"x-cache") == b"HIT"
        refetched = await request(proxy.port, b"GET", b"/r", [(b"cache-control", b"no-cache")])
        assert refetched.header(b"x-cache") == b"MISS" and refetched.json()["n"] == 2
        # ... and its response replaced the entry.
        assert (await request(proxy.port, b"GET", b"/r")).json()["n"] == 2
        bypass = await request(proxy.port, b"GET", b"/r", [(b"cache-control", b"no-store")])
        assert bypass.header(b"x-cache") == b"BYPASS" and bypass.json()["n"] == 3
        assert bypass.header(b"age") == b"0"
        ranged = await request(proxy.port, b"GET", b"/r", [(b"range", b"bytes=0-3")])
        assert ranged.status == 206 and ranged.header(b"x-cache") == b"HIT"  # from the stored 200 (§3.4)
        assert (await request(proxy.port, b"GET", b"/r", [(b"pragma", b"no-cache")])).json()["n"] == 4
        # only-if-cached: a stored response, or a 504 without contacting the upstream (§5.2.1.7).
        before = hits(origin, b"/r")
        assert (await request(proxy.port, b"GET", b"/r", [(b"cache-control", b"only-if-cached")])).status == 200
        absent = await request(proxy.port, b"GET", b"/never-stored", [(b"cache-control", b"only-if-cached")])
        assert absent.status == 504 and absent.json()["error"]["type"] == "cache_miss"
        assert hits(origin, b"/r") == before and hits(origin, b"/never-stored") == 0
        # A client's max-age bounds the age it accepts (§5.2.1.1).
        assert proxy.cache is not None
        hits_before = proxy.cache.stats.hits
        assert (await request(proxy.port, b"GET", b"/r", [(b"cache-control", b"max-age=3600")])).json()["n"] == 4
        assert proxy.cache.stats.hits == hits_before + 1


async def test_vary_selects_the_stored_response() -> None:
    async with Origin() as origin, running_proxy(origin.url) as proxy:
        add_counting_route(origin, b"/v", [(b"cache-control", b"max-age=60"), (b"vary", b"Accept-Language")])
        en = [(b"accept-language", b"en")]
        assert (await request(proxy.port, b"GET", b"/v", en)).json()["n"] == 1
        assert (await request(proxy.port, b"GET", b"/v", en)).header(b"x-cache") == b"HIT"
        de = await request(proxy.port, b"GET", b"/v", [(b"accept-language", b"de")])
        assert de.header(b"x-cache") == b"MISS" and de.json()["n"] == 2
        # §4.1: both variants are kept, each served to its own requests.
        for language, n in ((b"en", 1), (b"de", 2), (b"en", 1)):
            again = await request(proxy.port, b"GET", b"/v", [(b"accept-language", language)])
            assert again.header(b"x-cache") == b"HIT" and again.json()["n"] == n, language


async def test_variants_per_key_are_bounded_least_recently_used_first() -> None:
    async with Origin() as origin, running_proxy(origin.url) as proxy:
        add_counting_route(origin, b"/v", [(b"cache-control", b"max-age=60"), (b"vary", b"Accept-Language")])

        async def ask(language: bytes) -> Response:
            return await request(proxy.port, b"GET", b"/v", [(b"accept-language", language)])

        for language in (b"a", b"b", b"c", b"d"):  # MAX_VARIANTS of them
            assert (await ask(language)).header(b"x-cache") == b"MISS"
        assert (await ask(b"a")).header(b"x-cache") == b"HIT"  # a is now the most recent
        assert (await ask(b"e")).header(b"x-cache") == b"MISS"  # a fifth: b, the least recent, goes
        assert (await ask(b"b")).header(b"x-cache") == b"MISS"  # (and b's return pushes out c)
        assert [(await ask(x)).header(b"x-cache") for x in (b"a", b"d", b"e", b"b")] == [b"HIT"] * 4
        assert proxy.cache is not None and len(proxy.cache.store) == 5  # four variants and the marker


async def test_head_is_answered_from_the_stored_get() -> None:
    async with Origin() as origin, running_proxy(origin.url) as proxy:
        await request(proxy.port, b"GET", b"/v1/models")
        async with await Client.connect(proxy.port) as client:
            head = await client.request(b"HEAD", b"/v1/models")
            assert head.status == 200 and head.body == b"" and head.header(b"x-cache") == b"HIT"
            assert head.header(b"content-length") == str(len(MODELS_BODY)).encode()
            # The connection is still in step: a GET on it works.
            get = await client.request(b"GET", b"/v1/models")
            assert get.body == MODELS_BODY
        assert hits(origin, b"/v1/models") == 1


async def test_http10_client_gets_a_hit_through_h11() -> None:
    async with Origin() as origin, running_proxy(origin.url) as proxy:
        await request(proxy.port, b"GET", b"/v1/models")
        raw = await raw_exchange(proxy.port, b"GET /v1/models HTTP/1.0\r\n\r\n")
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"x-cache: hit" in head.lower() and body == MODELS_BODY


async def test_tenant_isolation_under_concurrency() -> None:
    """10 API keys x identical requests at once: every answer is the caller's own."""
    tenants = [b"Bearer sk-tenant-%d" % i for i in range(10)]
    async with Origin() as origin, running_proxy(origin.url, cache_rules=(rule(b"/whoami", ttl=60.0),)) as proxy:
        gate = asyncio.Event()

        @origin.route(b"/whoami")
        async def whoami(req: Received, reply: Reply) -> None:
            await gate.wait()  # held until every identical request has arrived
            await reply.full(200, req.header(b"authorization") or b"")

        async def ask(tenant: bytes) -> Tuple[bytes, Response]:
            return tenant, await request(proxy.port, b"GET", b"/whoami", [(b"authorization", tenant)])

        # First round: all 100 in flight at once (one fetch per tenant, the rest join it).
        first = [asyncio.ensure_future(ask(t)) for t in tenants for _ in range(10)]
        await wait_until(lambda: proxy.coalescer.stats.followers == 90)
        gate.set()
        # Second round: served from the cache.
        for results in ([await f for f in first], await asyncio.gather(*(ask(t) for t in tenants for _ in range(10)))):
            cross = [(t, r.body) for t, r in results if r.body != t]
            assert not cross and all(r.status == 200 for _, r in results)
        assert hits(origin, b"/whoami") == len(tenants)  # one fetch per tenant, ever
        assert proxy.cache is not None and proxy.cache.stats.hits == 100
        assert proxy.coalescer.stats.followers == 90


async def test_shared_rule_serves_every_caller_one_entry() -> None:
    async with (
        Origin() as origin,
        running_proxy(origin.url, cache_rules=(rule(b"/v1/models", ttl=60.0, shared=True),)) as proxy,
    ):
        for i in range(5):
            await request(proxy.port, b"GET", b"/v1/models", [(b"authorization", b"Bearer %d" % i)])
        assert hits(origin, b"/v1/models") == 1


async def test_post_rules_key_on_canonical_json() -> None:
    rules = (
        rule(b"/v1/embeddings", [b"POST"], ttl=3600.0),
        rule(b"/v1/chat/completions", [b"POST"], ttl=60.0, when=(("temperature", 0),), ignore_fields=("user",)),
    )
    async with Origin() as origin, running_proxy(origin.url, cache_rules=rules) as proxy:
        add_counting_route(origin, b"/v1/embeddings", [])
        add_counting_route(origin, b"/v1/chat/completions", [])
        one = await request(proxy.port, b"POST", b"/v1/embeddings", body=b'{"model":"e","input":["a","b"]}')
        two = await request(proxy.port, b"POST", b"/v1/embeddings", body=b'{ "input": ["a", "b"],\n  "model": "e" }')
        assert one.header(b"x-cache") == b"MISS" and two.header(b"x-cache") == b"HIT" and one.body == two.body
        other = await request(proxy.port, b"POST", b"/v1/embeddings", body=b'{"model":"e","input":["b","a"]}')
        assert other.header(b"x-cache") == b"MISS"
        raw1 = await request(proxy.port, b"POST", b"/v1/embeddings", body=b"not json")
        raw2 = await request(proxy.port, b"POST", b"/v1/embeddings", body=b"not json")
        assert (raw1.header(b"x-cache"), raw2.header(b"x-cache")) == (b"MISS", b"HIT")
        assert hits(origin, b"/v1/embeddings") == 3

        chat0 = b'{"model":"m","temperature":0,"messages":[],"user":"%s"}'
        assert (await request(proxy.port, b"POST", b"/v1/chat/completions", body=chat0 % b"a")).json()["n"] == 1
        hit = await request(proxy.port, b"POST", b"/v1/chat/completions", body=chat0 % b"b")
        assert hit.header(b"x-cache") == b"HIT"  # "user" is ignored in the key
        warm = b'{"model":"m","temperature":0.7,"messages":[]}'
        for _ in range(2):  # temperature 0.7: the rule's condition fails, no cache at all
            resp = await request(proxy.port, b"POST", b"/v1/chat/completions", body=warm)
            assert resp.header(b"x-cache") is None
        assert hits(origin, b"/v1/chat/completions") == 3
        # Other callers, same body: their own entry.
        theirs = await request(
            proxy.port, b"POST", b"/v1/embeddings", [(b"x-api-key", b"k2")], b'{"model":"e","input":["a","b"]}'
        )
        assert theirs.header(b"x-cache") == b"MISS"


async def test_post_body_arriving_in_pieces_is_keyed_whole() -> None:
    async with (
        Origin() as origin,
        running_proxy(origin.url, cache_rules=(rule(b"/v1/embeddings", [b"POST"], ttl=60.0),)) as proxy,
    ):
        add_counting_route(origin, b"/v1/embeddings", [])
        body = json.dumps({"model": "e", "input": ["x" * 300_000]}).encode()
        for expected in (b"MISS", b"HIT"):
            async with await Client.connect(proxy.port) as client:
                await client.send_request(
                    b"POST", b"/v1/embeddings", [(b"content-length", b"%d" % len(body))], end=False
                )
                for start in range(0, len(body), 50_000):
                    client.writer.write(body[start : start + 50_000])
                    await client.writer.drain()
                    await asyncio.sleep(0.002)
                resp = await client.read_response()
                assert resp.status == 200 and resp.header(b"x-cache") == expected
        assert hits(origin, b"/v1/embeddings") == 1
        assert origin.requests[-1].body == body


async def test_stale_while_revalidate_serves_stale_and_refreshes_exactly_once() -> None:
    clock = FakeClock()
    gate = asyncio.Event()
    async with (
        Origin() as origin,
        running_proxy(
            origin.url, clock=clock, cache_rules=(rule(b"/swr", ttl=10.0, stale_while_revalidate=60.0),)
        ) as proxy,
    ):

        @origin.route(b"/swr")
        async def swr(req: Received, reply: Reply) -> None:
            if hits(origin, b"/swr") > 1:
                await gate.wait()  # hold the refresh until the stale answers are in
            await reply.full(200, b"v%d" % hits(origin, b"/swr"))

        assert (await request(proxy.port, b"GET", b"/swr")).body == b"v1"
        clock.advance(15)
        stale = await asyncio.gather(*(request(proxy.port, b"GET", b"/swr") for _ in range(20)))
        assert all(r.body == b"v1" and r.header(b"x-cache") == b"STALE" for r in stale)
        assert all(r.header(b"age") == b"15" for r in stale)
        await wait_until(lambda: hits(origin, b"/swr") == 2)
        gate.set()
        assert proxy.cache is not None
        await wait_until(lambda: proxy.cache.stats.stores == 2)  # type: ignore[union-attr]
        fresh = await request(proxy.port, b"GET", b"/swr")
        assert fresh.body == b"v2" and fresh.header(b"x-cache") == b"HIT"
        assert hits(origin, b"/swr") == 2 and proxy.cache.stats.refreshes == 1


async def test_stale_if_error_on_5xx_and_on_a_dead_upstream() -> None:
    clock = FakeClock()
    async with Origin() as origin:
        healthy = [True]

        @origin.route(b"/sie")
        async def sie(req: Received, reply: Reply) -> None:
            if healthy[0]:
                await reply.full(200, b"good")
            else:
                await reply.full(503, b"down")

        rules = (rule(b"/sie", ttl=10.0, stale_if_error=100.0),)
        async with running_proxy(origin.url, clock=clock, cache_rules=rules) as proxy:
            assert (await request(proxy.port, b"GET", b"/sie")).body == b"good"
            clock.advance(20)
            healthy[0] = False
            resp = await request(proxy.port, b"GET", b"/sie")
            assert (resp.status, resp.body, resp.header(b"x-cache")) == (200, b"good", b"STALE")
            clock.advance(200)  # beyond stale-if-error: the failure shows
            resp = await request(proxy.port, b"GET", b"/sie")
            assert (resp.status, resp.body) == (503, b"down")
        port = origin.port

    # The same with the upstream gone entirely (connection refused).
    async with Origin() as origin:
        healthy[0] = True
        origin.routes[b"/sie"] = sie
        async with running_proxy(origin.url, clock=clock, cache_rules=rules) as proxy:
            assert (await request(proxy.port, b"GET", b"/sie")).body == b"good"
            port = origin.port
        dead = f"http://127.0.0.1:{port}"
    async with running_proxy(dead, clock=clock, cache_rules=rules) as proxy2:
        resp = await request(proxy2.port, b"GET", b"/sie")
        assert resp.status == 502  # a fresh proxy has no entry: the honest error


async def test_memory_bound_holds_under_a_flood_of_distinct_keys() -> None:
    async with (
        Origin() as origin,
        running_proxy(
            origin.url, cache_max_bytes=64 * 1024, cache_max_entries=50, cache_rules=(rule(b"/flood*", ttl=60.0),)
        ) as proxy,
    ):

        @origin.route(b"/flood")
        async def flood(req: Received, reply: Reply) -> None:
            await reply.full(200, b"x" * 2000)

        async with await Client.connect(proxy.port) as client:
            for i in range(400):
                resp = await client.request(b"GET", b"/flood?i=%d" % i)
                assert resp.status == 200 and len(resp.body) == 2000
                store = proxy.cache.store  # type: ignore[union-attr]
                assert store.bytes_used <= 64 * 1024 and len(store) <= 50  # type: ignore[union-attr]
        assert proxy.cache is not None and proxy.cache.stats.evictions >= 350
        assert len(proxy.coalescer) == 0  # nothing left in flight
        assert proxy.coalescer.stats.retained_bytes == 0  # nor kept for one


async def test_objects_over_the_limit_are_relayed_not_stored() -> None:
    async with (
        Origin() as origin,
        running_proxy(origin.url, cache_max_object_bytes=10_000, cache_rules=(rule(b"/big", ttl=60.0),)) as proxy,
    ):
        for size in (50_000, 50_000):
            resp = await request(proxy.port, b"GET", b"/big?size=%d" % size)
            assert resp.complete and len(resp.body) == size and resp.header(b"x-cache") == b"MISS"
        small = [await request(proxy.port, b"GET", b"/big?size=5000") for _ in range(2)]
        assert [r.header(b"x-cache") for r in small] == [b"MISS", b"HIT"]
        assert proxy.cache is not None and proxy.cache.stats.too_large == 2


def chunk_payloads(raw: bytes) -> List[bytes]:
    """The chunks of a chunked body, as framed on the wire."""
    _, _, rest = raw.partition(b"\r\n\r\n")
    chunks = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return chunks
        chunks.append(rest[:size])
        rest = rest[size + 2 :]


async def test_sse_recorded_and_replayed_with_event_boundaries() -> None:
    rules = (rule(b"/sse", ttl=60.0, stream=True),)
    async with Origin() as origin, running_proxy(origin.url, cache_rules=rules) as proxy:
        request_bytes = b"GET /sse?n=5&interval=0.002 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        live = await raw_exchange(proxy.port, request_bytes)
        replay = await raw_exchange(proxy.port, request_bytes)
        assert b"x-cache: miss" in live.lower() and b"x-cache: hit" in replay.lower()
        events = chunk_payloads(replay)
        assert len(events) == 6 and all(e.startswith(b"data: ") and e.endswith(b"\n\n") for e in events)
        assert b"".join(events) == b"".join(chunk_payloads(live))
        assert hits(origin, b"/sse") == 1
    # Without stream = true an event stream is never stored.
    async with Origin() as origin, running_proxy(origin.url, cache_rules=(rule(b"/sse", ttl=60.0),)) as proxy:
        for _ in range(2):
            assert b"x-cache: miss" in (await raw_exchange(proxy.port, request_bytes)).lower()
        assert hits(origin, b"/sse") == 2


async def test_purge_by_path_prefix_and_all() -> None:
    async with Origin() as origin, running_proxy(origin.url, cache_rules=(rule(b"/p/*", ttl=60.0),)) as proxy:
        for path in (b"/p/a", b"/p/b"):
            add_counting_route(origin, path, [])
        for target in (b"/p/a", b"/p/a?q=1", b"/p/b"):
            await request(proxy.port, b"GET", target)
        cache = proxy.cache
        assert cache is not None
        assert await cache.purge(path=b"/p/a") == 2
        assert (await request(proxy.port, b"GET", b"/p/a")).header(b"x-cache") == b"MISS"
        assert (await request(proxy.port, b"GET", b"/p/b")).header(b"x-cache") == b"HIT"
        assert await cache.purge(prefix=b"/p/") == 2
        assert await cache.purge() == 0


async def test_no_cache_option_turns_the_layer_off() -> None:
    async with Origin() as origin, running_proxy(origin.url, cache_enabled=False) as proxy:
        for _ in range(2):
            resp = await request(proxy.port, b"GET", b"/v1/models")
            assert resp.header(b"x-cache") is None
        assert hits(origin, b"/v1/models") == 2 and proxy.cache is None


async def test_post_bodies_over_the_key_limit_are_relayed_plainly() -> None:
    async with (
        Origin() as origin,
        running_proxy(
            origin.url, cache_max_key_body=16, cache_rules=(rule(b"/v1/embeddings", [b"POST"], ttl=60.0),)
        ) as proxy,
    ):
        add_counting_route(origin, b"/v1/embeddings", [])
        body = b'{"model": "e", "input": "more than sixteen bytes"}'
        for _ in range(2):
            resp = await request(proxy.port, b"POST", b"/v1/embeddings", body=body)
            assert resp.status == 200 and resp.header(b"x-cache") is None
        assert hits(origin, b"/v1/embeddings") == 2
        small = [await request(proxy.port, b"POST", b"/v1/embeddings", body=b'{"a": 1}') for _ in range(2)]
        assert [r.header(b"x-cache") for r in small] == [b"MISS", b"HIT"]


async def test_unsafe_requests_invalidate_their_target_and_same_origin_locations() -> None:
    """RFC 9111 §4.4: a non-error answer to an unsafe method invalidates the target URI
    under every caller, and Location / Content-Location when of the same origin; an
    error answer, another origin's URI or a path a cache rule stores for that method
    (a chat completion keyed by its body) invalidate nothing."""
    async with Origin() as origin:

        @origin.route(b"/items")
        async def items(req: Received, reply: Reply) -> None:
            if req.method == b"GET":
                body = json.dumps({"n": hits(origin, b"/items")}).encode()
                await reply.full(200, body, [(b"cache-control", b"public, max-age=600")])
            else:
                await reply.full(int(req.header(b"x-status") or b"201"), b"done")

        @origin.route(b"/other")
        async def other(req: Received, reply: Reply) -> None:
            location = req.header(b"x-location")
            await reply.full(200, b"ok", [(req.header(b"x-field") or b"location", location)] if location else [])

        add_counting_route(origin, b"/chat", [])
        callers = [[(b"authorization", b"Bearer sk-one")], [(b"authorization", b"Bearer sk-two")]]
        chat_rule = rule(b"/chat", methods=(b"POST",), ttl=600.0)
        async with running_proxy(origin.url, cache_rules=(chat_rule,)) as proxy:

            async def statuses() -> List[bytes]:
                return [(await request(proxy.port, b"GET", b"/items", c)).header(b"x-cache") for c in callers]

            async def send(method: bytes, target: bytes, headers: Headers) -> None:
                assert (await request(proxy.port, method, target, headers, b"{}")).status < 600

            assert await statuses() == [b"MISS", b"MISS"]
            assert await statuses() == [b"HIT", b"HIT"]
            await send(b"POST", b"/items", [(b"x-status", b"500")])  # an error: nothing changed
            await send(b"DELETE", b"/other", [(b"x-location", b"http://elsewhere.example/items")])
            # A POST a cache rule stores is a read, by the operator's word: another body's
            # miss on that path leaves the stored completions there.
            chat = [(b"content-type", b"application/json")]
            assert (await request(proxy.port, b"POST", b"/chat", chat, b'{"q": 1}')).header(b"x-cache") == b"MISS"
            assert (await request(proxy.port, b"POST", b"/chat", chat, b'{"q": 2}')).header(b"x-cache") == b"MISS"
            assert (await request(proxy.port, b"POST", b"/chat", chat, b'{"q": 1}')).header(b"x-cache") == b"HIT"
            assert await statuses() == [b"HIT", b"HIT"]
            await send(b"PATCH", b"/other", [(b"x-location", b"/items"), (b"x-field", b"content-location")])
            assert await statuses() == [b"MISS", b"MISS"]  # the same origin's Content-Location
            await send(b"PUT", b"/other", [(b"x-location", b"items")])  # relative to /other
            assert await statuses() == [b"MISS", b"MISS"]
            await send(b"MKCOL", b"/items", [])  # a method not known to be safe is unsafe
            assert await statuses() == [b"MISS", b"MISS"]
            await send(b"POST", b"/items", [])
            assert await statuses() == [b"MISS", b"MISS"]
            assert sum(1 for r in origin.requests if r.method == b"GET" and r.target == b"/items") == 10
            assert proxy.cache is not None and proxy.cache.stats.invalidations == 8


def add_versioned_route(origin: Origin, path: bytes, state: dict, cache_control: bytes) -> None:
    """``path`` has a version (ETag) and a Last-Modified; it answers a matching
    If-None-Match with 304 carrying ``state["meta"]``, else 200 with the version."""

    @origin.route(path)
    async def route(req: Received, reply: Reply) -> None:
        etag = b'"v%d"' % state["version"]
        common = [(b"cache-control", cache_control), (b"etag", etag), (b"x-meta", state["meta"])]
        if req.header(b"if-none-match") == etag:
            await reply.head(304, common)
            await reply.end()
            return
        body = b"version %d " % state["version"] + b"x" * 4000
        common.append((b"last-modified", b"Sun, 06 Nov 1994 08:49:37 GMT"))
        await reply.full(200, body, [(b"content-type", b"text/plain")] + common)


async def test_a_stale_entry_is_revalidated_with_its_etag_and_a_304_freshens_it() -> None:
    """RFC 9111 §4.3: a stale entry with a validator goes upstream as a conditional
    request; a 304 makes it fresh with the 304's headers (§3.2) and the stored body,
    a 200 replaces it."""
    clock = FakeClock()
    state = {"version": 1, "meta": b"a"}
    async with Origin() as origin, running_proxy(origin.url, clock=clock) as proxy:
        add_versioned_route(origin, b"/doc", state, b"max-age=10")
        first = await request(proxy.port, b"GET", b"/doc")
        assert first.header(b"x-cache") == b"MISS" and first.body.startswith(b"version 1")
        assert origin.requests[-1].header(b"if-none-match") is None
        clock.advance(11)  # stale
        state["meta"] = b"b"
        again = await request(proxy.port, b"GET", b"/doc")
        sent = origin.requests[-1]
        assert sent.header(b"if-none-match") == b'"v1"'  # §4.3.1: both validators
        assert sent.header(b"if-modified-since") == b"Sun, 06 Nov 1994 08:49:37 GMT"
        assert again.status == 200 and again.header(b"x-cache") == b"REVALIDATED"
        assert again.body == first.body  # the stored body: the upstream sent none
        assert again.header(b"x-meta") == b"b"  # the 304's fields replace the stored ones
        assert again.header(b"content-length") == str(len(first.body)).encode()
        hit = await request(proxy.port, b"GET", b"/doc")  # fresh again, for the 304's max-age
        assert hit.header(b"x-cache") == b"HIT" and hit.header(b"x-meta") == b"b"
        assert len(origin.requests) == 2
        clock.advance(11)
        state["version"] = 2  # changed upstream: the conditional request gets a 200
        changed = await request(proxy.port, b"GET", b"/doc")
        assert changed.header(b"x-cache") == b"MISS" and changed.body.startswith(b"version 2")
        assert (await request(proxy.port, b"GET", b"/doc")).body.startswith(b"version 2")
        assert proxy.cache is not None and proxy.cache.stats.revalidated == 1


async def test_no_cache_responses_with_a_validator_are_stored_and_revalidated_every_time() -> None:
    """§5.2.2.4: no-cache means "validate before each use", not "never store"."""
    state = {"version": 1, "meta": b"a"}
    async with Origin() as origin, running_proxy(origin.url) as proxy:
        add_versioned_route(origin, b"/nc", state, b"no-cache")
        assert (await request(proxy.port, b"GET", b"/nc")).header(b"x-cache") == b"MISS"
        for _ in range(3):
            resp = await request(proxy.port, b"GET", b"/nc")
            assert resp.header(b"x-cache") == b"REVALIDATED" and resp.body.startswith(b"version 1")
            assert origin.requests[-1].header(b"if-none-match") == b'"v1"'
        assert len(origin.requests) == 4


async def test_a_clients_conditional_request_against_a_fresh_entry_is_answered_304() -> None:
    """§4.3.2, with RFC 9110 §13.1.2's weak comparison (pyproxy's gzip form carries
    the weak W/ of the stored strong tag) and If-None-Match before If-Modified-Since."""
    state = {"version": 1, "meta": b"a"}
    async with Origin() as origin, running_proxy(origin.url) as proxy:
        add_versioned_route(origin, b"/doc", state, b"max-age=60")
        assert (await request(proxy.port, b"GET", b"/doc")).status == 200
        for tags in (b'"v1"', b'W/"v1"', b'"v0", "v1"', b"*"):
            resp = await request(proxy.port, b"GET", b"/doc", [(b"if-none-match", tags)])
            assert resp.status == 304 and resp.body == b"", tags
            assert resp.header(b"etag") == b'"v1"' and resp.header(b"cache-control") == b"max-age=60"
        other = await request(proxy.port, b"GET", b"/doc", [(b"if-none-match", b'"v0"')])
        assert other.status == 200 and other.header(b"x-cache") == b"HIT"
        later = [(b"if-modified-since", b"Mon, 07 Nov 1994 08:49:37 GMT")]
        assert (await request(proxy.port, b"GET", b"/doc", later)).status == 304
        earlier = [(b"if-modified-since", b"Sat, 05 Nov 1994 08:49:37 GMT")]
        assert (await request(proxy.port, b"GET", b"/doc", earlier)).status == 200
        both = [(b"if-none-match", b'"v0"')] + later  # If-None-Match decides (§13.2.2)
        assert (await request(proxy.port, b"GET", b"/doc", both)).status == 200
        assert len(origin.requests) == 1


async def test_a_range_is_served_from_a_stored_full_response() -> None:
    """RFC 9111 §3.4: one byte range as a 206 from the stored 200, a 416 past its end;
    several ranges, If-Range or nothing stored: to the upstream, and never stored."""
    body = bytes(range(256)) * 40  # 10,240 bytes
    async with Origin() as origin, running_proxy(origin.url) as proxy:

        @origin.route(b"/blob")
        async def blob(req: Received, reply: Reply) -> None:
            await reply.full(
                200, body, [(b"content-type", b"application/octet-stream"), (b"cache-control", b"max-age=60")]
            )

        early = await request(proxy.port, b"GET", b"/blob", [(b"range", b"bytes=0-9")])
        assert early.header(b"x-cache") == b"BYPASS"  # nothing stored yet: the upstream's answer
        assert (await request(proxy.port, b"GET", b"/blob")).header(b"x-cache") == b"MISS"
        part = await request(proxy.port, b"GET", b"/blob", [(b"range", b"bytes=1000-1999")])
        assert part.status == 206 and part.body == body[1000:2000]
        assert part.header(b"content-range") == b"bytes 1000-1999/10240" and part.header(b"x-cache") == b"HIT"
        tail = await request(proxy.port, b"GET", b"/blob", [(b"range", b"bytes=-16")])
        assert tail.status == 206 and tail.body == body[-16:]
        past = await request(proxy.port, b"GET", b"/blob", [(b"range", b"bytes=20000-")])
        assert past.status == 416 and past.header(b"content-range") == b"bytes */10240"
        before = len(origin.requests)
        several = await request(proxy.port, b"GET", b"/blob", [(b"range", b"bytes=0-1,5-6")])
        conditional = await request(proxy.port, b"GET", b"/blob", [(b"range", b"bytes=0-1"), (b"if-range", b'"x"')])
        assert several.header(b"x-cache") == conditional.header(b"x-cache") == b"BYPASS"
        assert len(origin.requests) == before + 2
        assert (await request(proxy.port, b"GET", b"/blob")).header(b"x-cache") == b"HIT"  # still the full one


async def test_a_clients_validator_against_a_stale_entry_is_merged_and_answered_304() -> None:
    """§4.3.2: a client's If-None-Match naming the stored tag revalidates the stale entry
    for it (a 304 to the client, the entry fresh again); one naming another tag goes
    upstream as the client wrote it."""
    clock = FakeClock()
    state = {"version": 1, "meta": b"a"}
    async with Origin() as origin, running_proxy(origin.url, clock=clock) as proxy:
        add_versioned_route(origin, b"/doc", state, b"max-age=10")
        assert (await request(proxy.port, b"GET", b"/doc")).status == 200
        clock.advance(11)
        mine = await request(proxy.port, b"GET", b"/doc", [(b"if-none-match", b'"v1"')])
        assert mine.status == 304 and mine.header(b"x-cache") == b"REVALIDATED" and mine.body == b""
        assert origin.requests[-1].header(b"if-none-match") == b'"v1"'
        assert (await request(proxy.port, b"GET", b"/doc")).header(b"x-cache") == b"HIT"  # freshened
        clock.advance(11)
        other = await request(proxy.port, b"GET", b"/doc", [(b"if-none-match", b'"v0"')])
        assert other.status == 200 and other.header(b"x-cache") == b"MISS"
        assert origin.requests[-1].header(b"if-none-match") == b'"v0"'  # not merged: as written
        assert len(origin.requests) == 3


async def test_fields_a_qualified_no_cache_private_or_connection_names_are_not_stored() -> None:
    """§5.2.2.4 and §5.2.2.7: ``no-cache="a"`` and ``private="p"`` keep the named
    fields out of the stored response, which is otherwise reused while fresh; RFC
    9110 §7.6.1: fields the upstream's Connection names are its hop's own, never
    relayed nor stored."""
    headers = [
        (b"cache-control", b'no-cache="a", private="p"'),
        (b"cache-control", b"max-age=3600"),
        (b"connection", b"x-hop"),
        (b"x-hop", b"1"),
        (b"a", b"1"),
        (b"p", b"2"),
        (b"b", b"3"),
    ]
    async with Origin() as origin, running_proxy(origin.url) as proxy:
        add_counting_route(origin, b"/q", headers)
        first = await request(proxy.port, b"GET", b"/q")
        assert first.header(b"x-cache") == b"MISS" and first.header(b"a") == b"1"
        assert first.header(b"x-hop") is None
        hit = await request(proxy.port, b"GET", b"/q")
        assert hit.header(b"x-cache") == b"HIT" and hits(origin, b"/q") == 1
        assert hit.header(b"b") == b"3"
        assert hit.header(b"a") is None and hit.header(b"p") is None and hit.header(b"x-hop") is None
