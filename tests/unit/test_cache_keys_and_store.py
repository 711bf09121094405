"""Keys (canonical JSON, caller identity), rules from TOML, and the bounded memory store."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import List, Optional

import pytest

from pyproxy.cache.entry import CachedResponse
from pyproxy.cache.key import (
    ANONYMOUS,
    IDENTITY_HEADERS,
    SHARED,
    body_digest,
    body_matches,
    caller_identity,
    identity_for,
    parse_json_body,
    request_key,
)
from pyproxy.cache.store import CacheStats, MemoryStore, key_path
from pyproxy.config import ConfigError, build_settings
from pyproxy.http.headers import Header
from pyproxy.rules import DEFAULT_CACHE_RULES, Rule

EMBED = Rule(methods=frozenset({b"POST"}), path=b"/v1/embeddings", prefix=False, name="e", ttl=60)


def digest(body: bytes, rule: Rule = EMBED) -> bytes:
    return body_digest(body, rule, parse_json_body(body))


def test_canonical_json_same_request_written_two_ways_is_one_key() -> None:
    a = b'{"model": "m", "input": ["x", "y"], "opts": {"b": 1, "a": 2.5}}'
    b = b'{"opts":{"a":2.5,"b":1},\n "input":["x","y"],"model":"m"}'
    assert digest(a) == digest(b)
    assert digest(a) != digest(b'{"model": "m", "input": ["y", "x"], "opts": {"b": 1, "a": 2.5}}')
    # Not JSON: keyed by the exact bytes.
    assert digest(b"not json") == digest(b"not json") != digest(b"not json ")
    assert digest(b"not json").startswith(b"raw-") and digest(a).startswith(b"json-")
    # Integers beyond 64 bits are valid JSON (orjson refuses them; the fallback parses them).
    assert digest(b'{"n": 123456789012345678901234567890}').startswith(b"json-")


def test_ignore_fields_and_when_conditions() -> None:
    rule = Rule(
        methods=frozenset({b"POST"}),
        path=b"/v1/chat/completions",
        prefix=False,
        name="c",
        ttl=60,
        ignore_fields=("user",),
        when=(("temperature", 0),),
    )
    a = b'{"model": "m", "temperature": 0, "user": "alice"}'
    b = b'{"model": "m", "temperature": 0.0, "user": "bob"}'
    assert digest(a, rule) == digest(b, rule)
    assert body_matches(rule, parse_json_body(a)) and body_matches(rule, parse_json_body(b))
    assert not body_matches(rule, parse_json_body(b'{"model": "m", "temperature": 0.7}'))
    assert not body_matches(rule, parse_json_body(b'{"model": "m"}'))
    assert not body_matches(rule, parse_json_body(b'{"model": "m", "temperature": false}'))
    assert not body_matches(rule, parse_json_body(b"[0]"))
    assert not body_matches(rule, parse_json_body(b"temperature=0"))


def test_caller_identity_separates_credentials() -> None:
    names = IDENTITY_HEADERS
    keys = {caller_identity([(b"authorization", b"Bearer sk-%d" % i)], names) for i in range(100)}
    assert len(keys) == 100
    assert caller_identity([], names) == ANONYMOUS
    assert caller_identity([(b"accept", b"*/*")], names) == ANONYMOUS
    # The same value in different headers is a different caller.
    assert caller_identity([(b"x-api-key", b"k")], names) != caller_identity([(b"api-key", b"k")], names)
    # Configured headers count too; the secret never appears in the key.
    tenant = caller_identity([(b"x-tenant", b"acme")], names + (b"x-tenant",))
    assert tenant != ANONYMOUS and b"acme" not in tenant
    shared = Rule(methods=frozenset({b"GET"}), path=b"/", prefix=True, name="", ttl=1, shared=True)
    assert identity_for([(b"authorization", b"Bearer sk-1")], shared, names) == SHARED


def test_key_starts_with_the_target_and_is_bounded() -> None:
    key = request_key(b"/v1/models?x=1", b"GET", b"abc")
    assert key.startswith(b"/v1/models?x=1\x00GET\x00")
    assert key_path(key) == b"/v1/models"
    long_key = request_key(b"/" + b"a" * 100_000, b"GET", b"abc")
    assert len(long_key) < 2200
    assert long_key != request_key(b"/" + b"a" * 99_999 + b"b", b"GET", b"abc")


def test_rules_from_toml(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        """
upstream = "http://127.0.0.1:1"
[cache]
backend = "memory"
max_bytes = 1048576
[[cache.rules]]
methods = ["GET"]
path = "/v1/models"
ttl = 300
stale_while_revalidate = 60
[[cache.rules]]
methods = ["POST"]
path = "/v1/*"
ttl = 3600
ignore_fields = ["user"]
when = { temperature = 0 }
[dedup]
replay_bytes = 4096
[[dedup.rules]]
methods = ["POST"]
path = "/v1/chat/completions"
"""
    )
    s = build_settings({"config": str(config)}, {})
    assert s.cache_max_bytes == 1048576 and s.dedup_replay_bytes == 4096
    models, v1 = s.cache_rules
    assert models.stale_while_revalidate == 60 and models.matches(b"GET", b"/v1/models")
    assert v1.prefix and v1.matches(b"POST", b"/v1/embeddings") and not v1.matches(b"GET", b"/v1/embeddings")
    assert v1.when == (("temperature", 0),) and v1.ignore_fields == ("user",)
    assert s.dedup_rules[0].matches(b"POST", b"/v1/chat/completions")
    # Without [[cache.rules]]: the one default rule.
    assert build_settings({"upstream": "http://x"}, {}).cache_rules == DEFAULT_CACHE_RULES


@pytest.mark.parametrize(
    "toml, message",
    [
        ("[[cache.rules]]\npath = '/x'\n", "cache.rules[0]: ttl must be given"),
        ("[[cache.rules]]\npath = 'x'\nttl = 1\n", "path must be a string starting with '/'"),
        ("[[cache.rules]]\npath = '/x'\nttl = 1\ntll = 2\n", "unknown key 'tll'"),
        ("[[cache.rules]]\npath = '/x'\nttl = -1\n", "ttl must be a number of seconds"),
        ("[[cache.rules]]\npath = '/x*/y'\nttl = 1\n", "may only end in '*'"),
        ("[[dedup.rules]]\npath = '/x'\nttl = 1\n", "dedup.rules[0]: unknown key 'ttl'"),
        ("[cache]\nbackend = 'memcached'\n", "expected 'memory' or a redis:// URL"),
        ("[cache]\nmax_bytez = 1\n", "unknown setting 'cache.max_bytez'"),
    ],
)
def test_bad_rules_are_one_line_errors(tmp_path: Path, toml: str, message: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text('upstream = "http://127.0.0.1:1"\n' + toml)
    with pytest.raises(ConfigError) as info:
        build_settings({"config": str(config)}, {})
    assert message in str(info.value) and "\n" not in str(info.value)


def entry(body_size: int, body: bytes = b"", headers: Optional[List[Header]] = None) -> CachedResponse:
    return CachedResponse(
        200,
        b"OK",
        headers or [],
        body or b"x" * body_size,
        stream=False,
        stored_at=0.0,
        lifetime=1e9,
        initial_age=0.0,
        stale_while_revalidate=0.0,
        stale_if_error=0.0,
        vary_names=(),
        vary_values=(),
    )


def test_memory_store_holds_its_byte_and_entry_bounds_under_a_flood() -> None:
    stats = CacheStats()
    store = MemoryStore(max_bytes=200_000, max_entries=300, stats=stats, clock=lambda: 1.0)
    for i in range(20_000):
        store.put(b"/k%d\x00GET\x00-\x00" % i, entry(i % 2000))
        assert store.bytes_used <= 200_000 and len(store) <= 300
    assert stats.evictions > 19_000 and stats.bytes_stored == store.bytes_used
    # LRU: the most recent survive, a touched old one outlives its neighbours.
    assert store.get_now(b"/k19999\x00GET\x00-\x00") is not None
    assert store.get_now(b"/k0\x00GET\x00-\x00") is None
    # Larger than the whole bound: refused and counted.
    assert not store.put(b"/huge", entry(300_000)) and stats.too_large == 1


def test_memory_store_lru_order_and_expiry() -> None:
    now = [0.0]
    store = MemoryStore(max_bytes=10_000, max_entries=3, stats=CacheStats(), clock=lambda: now[0])
    for name in (b"/a", b"/b", b"/c"):
        store.put(name, entry(10))
    assert store.get_now(b"/a") is not None  # /a becomes the most recent
    store.put(b"/d", entry(10))  # evicts /b, the least recent
    assert store.get_now(b"/b") is None and store.get_now(b"/a") is not None
    short = entry(10)
    short.lifetime = 5.0
    store.put(b"/e", short)
    now[0] = 6.0
    assert store.get_now(b"/e") is None and len(store) == 2  # dropped when found expired


def test_memory_store_counts_gzip_forms_made_after_storing() -> None:
    """A hit for a gzip client makes the entry's gzip form; the byte bound counts it,
    evicting the least recent entries when it no longer holds."""
    rng = random.Random(7)
    json_type: List[Header] = [(b"content-type", b"application/json")]

    def compressible() -> CachedResponse:
        body = json.dumps([rng.randrange(10**6) for _ in range(600)]).encode()
        return entry(0, body, json_type)

    keys = [b"/j%d" % i for i in range(4)]
    entries = [compressible() for _ in keys]
    # Room for the four as stored and one gzip form (about 45% of a body), not four.
    bound = sum(e.size + len(k) for k, e in zip(keys, entries)) + len(entries[0].body) // 2
    stats = CacheStats()
    store = MemoryStore(max_bytes=bound, max_entries=100, stats=stats, clock=lambda: 0.0)
    for key, stored in zip(keys, entries):
        assert store.put(key, stored)
    assert stats.evictions == 0
    for key in keys:
        found = store.get_now(key)
        if found is None:
            continue  # evicted to make room for an earlier one's gzip form
        assert isinstance(found, CachedResponse)
        size = found.size
        variant = found.gzipped(6, 1000)
        assert variant is not None and found.size == size + len(variant[0]) + len(variant[1])
        store.grew(found, found.size - size)
        held = sum(e.size + len(k) for k, e in store._entries.items())
        assert store.bytes_used == held == stats.bytes_stored <= bound
    assert stats.evictions >= 1 and store.get_now(keys[-1]) is not None
    # An entry no longer stored grows nothing here; the accounting never drifts.
    gone = compressible()
    gone.gzipped(6, 1000)
    store.grew(gone, 1000)
    assert store.bytes_used == sum(e.size + len(k) for k, e in store._entries.items())
    store.put(keys[0], compressible())
    assert store.bytes_used <= bound


async def test_memory_store_purge() -> None:
    store = MemoryStore(max_bytes=1 << 20, max_entries=100, stats=CacheStats(), clock=lambda: 0.0)
    for key in (b"/v1/models", b"/v1/models?x=1", b"/v1/modelsX", b"/v2/a", b"/v2/b"):
        store.put(request_key(key, b"GET", b"-"), entry(1))
    assert await store.purge(path=b"/v1/models") == 2
    assert await store.purge(prefix=b"/v2/") == 2
    assert len(store) == 1
    assert await store.purge() == 1 and len(store) == 0


def test_memory_store_invalidates_a_target_under_every_caller_and_keeps_no_index_for_the_gone() -> None:
    stats = CacheStats()
    store = MemoryStore(max_bytes=10_000, max_entries=3, stats=stats, clock=lambda: 1.0)
    for caller in (b"one", b"two"):
        store.put(request_key(b"/a", b"GET", caller), entry(10))
    store.put(request_key(b"/a?q", b"GET", b"one"), entry(10))
    store.invalidate([b"/a"])
    assert len(store) == 1 and stats.invalidations == 2  # /a?q is another target (RFC 9111 §4.4)
    for i in range(5):  # evictions leave no index behind
        store.put(request_key(b"/e%d" % i, b"GET", b"one"), entry(10))
    assert len(store) == 3 and len(store._by_target) == 3
    store.invalidate([b"/e4", b"/nothing"])
    assert len(store) == 2 and len(store._by_target) == 2 and stats.invalidations == 3
