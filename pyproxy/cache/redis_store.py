"""The shared store: entries in Redis, so every pyproxy process and machine sees one cache.

Redis is an optimisation, never a dependency of a request: every operation
has a short deadline (``cache_redis_timeout``); a failure counts an error,
answers as a miss, and opens a circuit for a backoff period (0.5 s doubling
to 5 s) during which Redis is not asked at all, so a dead Redis costs
requests nothing. The first success closes the circuit again. Writes are
fire-and-forget, bounded in number; beyond the bound they are dropped.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, List, Optional, Sequence, Set, Union

from pyproxy.cache.entry import CachedResponse
from pyproxy.cache.key import VARIANT_SEPARATOR
from pyproxy.cache.store import MAX_VARIANTS, NEED_AWAIT, CacheStats, key_target, purge_matches
from pyproxy.circuit import Circuit

log = logging.getLogger("pyproxy.cache")

NAMESPACE = b"pyproxy:c:"
MAX_PENDING_WRITES = 64
_GLOB_SPECIAL = frozenset(b"*?[]\\")


# Per target, a set of the keys stored for it (every caller, method, body): what an
# unsafe request's answer invalidates (RFC 9111 §4.4), in every instance at once.
INDEX = b"pyproxy:t:"
# Stored with the entry, in one round trip. The index lives as long as its longest
# entry; past INDEX_PRUNE_ABOVE members, a sample of members whose entries expired
# is dropped on each write, so a busy target's index stays near its live entries.
INDEX_PRUNE_ABOVE = 1024
_PUT_SCRIPT = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SADD', KEYS[2], KEYS[1])
if redis.call('SCARD', KEYS[2]) > tonumber(ARGV[3]) then
  for _, k in ipairs(redis.call('SRANDMEMBER', KEYS[2], 64)) do
    if redis.call('EXISTS', k) == 0 then redis.call('SREM', KEYS[2], k) end
  end
end
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
if KEYS[3] then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[3], tonumber(t[1]) * 1000000 + tonumber(t[2]), KEYS[1])
  local extra = redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[4])
  if extra > 0 then
    local popped = redis.call('ZPOPMIN', KEYS[3], extra)  -- member, score, member, ...
    for i = 1, #popped, 2 do redis.call('UNLINK', popped[i]) end
  end
  if redis.call('PTTL', KEYS[3]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[3], ARGV[2]) end
end
"""
# Per key whose responses Vary, a sorted set of its variants' keys by when each was
# stored (Redis TIME): past MAX_VARIANTS the earliest stored go, so one key cannot
# fill Redis with variants (RFC 9111 §4.1). Stored order, not use order: bumping on
# every hit would make each read a write.
VARIANTS = b"pyproxy:v:"
# The entries of each index named, and the index; their number.
_INVALIDATE_SCRIPT = """
local removed = 0
for _, index in ipairs(KEYS) do
  for _, k in ipairs(redis.call('SMEMBERS', index)) do removed = removed + redis.call('UNLINK', k) end
  redis.call('UNLINK', index)
end
return removed
"""


def glob_escape(data: bytes) -> bytes:
    return bytes(b for c in data for b in ((0x5C, c) if c in _GLOB_SPECIAL else (c,)))


class RedisStore:
    synchronous = False

    def __init__(self, url: str, timeout: float, stats: CacheStats, clock, loop: asyncio.AbstractEventLoop) -> None:  # type: ignore[no-untyped-def]
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = url
        self.timeout = timeout
        self.stats = stats
        self._clock = clock
        self._loop = loop
        self._client: Any = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # our own deadline and circuit decide, not retries
            max_connections=256,
        )
        self.circuit = Circuit("redis", log, loop.time, "cache reads and writes skip redis")
        self._writes: Set["asyncio.Task[None]"] = set()
        self._put_script = self._client.register_script(_PUT_SCRIPT)
        self._invalidate_script = self._client.register_script(_INVALIDATE_SCRIPT)

    # --- the circuit ---------------------------------------------------------------------

    @property
    def available(self) -> bool:
        return self.circuit.available

    def _failed(self, what: str, exc: BaseException) -> None:
        self.stats.errors += 1
        self.circuit.failed(what, exc)

    def _succeeded(self) -> None:
        self.circuit.succeeded()

    # --- the store interface ------------------------------------------------------------

    def get_now(self, key: bytes) -> Union[CachedResponse, None, str]:
        return NEED_AWAIT if self.available else None

    async def get(self, key: bytes) -> Optional[CachedResponse]:
        if not self.available:
            return None
        try:
            data = await asyncio.wait_for(self._client.get(NAMESPACE + key), self.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure of Redis is a miss, never the request's failure
            self._failed("read", exc)
            return None
        self._succeeded()
        if data is None:
            return None
        entry = CachedResponse.from_bytes(data)
        if entry is None or entry.remaining(self._clock()) <= 0:
            return None
        return entry

    def put(self, key: bytes, entry: CachedResponse) -> bool:
        if not self.available or len(self._writes) >= MAX_PENDING_WRITES:
            return False
        ttl_ms = max(1000, int(entry.remaining(self._clock()) * 1000))
        task = self._loop.create_task(self._put(key, entry.to_bytes(), ttl_ms))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return True

    def grew(self, entry: CachedResponse, delta: int) -> None:
        """Entries read from Redis belong to one response and are freed with it."""

    async def _put(self, key: bytes, value: bytes, ttl_ms: int) -> None:
        keys = [NAMESPACE + key, INDEX + key_target(key)]
        cut = key.find(VARIANT_SEPARATOR)
        if cut >= 0:
            keys.append(VARIANTS + key[:cut])
        args = [value, ttl_ms, INDEX_PRUNE_ABOVE, MAX_VARIANTS]
        try:
            await asyncio.wait_for(self._put_script(keys, args), self.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed("write", exc)
        else:
            self._succeeded()

    def invalidate(self, targets: Sequence[bytes]) -> None:
        """RFC 9111 §4.4, for every instance sharing this Redis: in the background, like
        writes. Not bounded by the circuit: a write that cannot be undone later is the
        one invalidation that must be tried (its failure is counted and logged)."""
        task = self._loop.create_task(self._invalidate([INDEX + t for t in targets]))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _invalidate(self, indexes: List[bytes]) -> None:
        try:
            removed = await asyncio.wait_for(self._invalidate_script(indexes, []), self.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed("invalidation", exc)
        else:
            self._succeeded()
            self.stats.invalidations += int(removed)

    async def purge(self, path: Optional[bytes] = None, prefix: Optional[bytes] = None) -> int:
        """SCAN for the namespace (and path) prefix, delete in batches. Errors propagate:
        an operator asking for a purge must learn that it failed."""
        start = path if path is not None else (prefix or b"")
        pattern = NAMESPACE + glob_escape(start) + b"*"
        removed = 0
        batch = []
        async for full_key in self._client.scan_iter(match=pattern, count=1000):
            if purge_matches(full_key[len(NAMESPACE) :], path, prefix):
                batch.append(full_key)
            if len(batch) >= 500:
                removed += await self._client.unlink(*batch)
                batch = []
        if batch:
            removed += await self._client.unlink(*batch)
        return removed

    async def close(self) -> None:
        for task in list(self._writes):
            task.cancel()
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        try:
            await self._client.aclose() if hasattr(self._client, "aclose") else await self._client.close()
        except Exception:  # pragma: no cover - closing a broken client
            pass
