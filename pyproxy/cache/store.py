"""Where entries live: an in-process LRU bounded by bytes and by entries.

Every store has the same interface, so the cache layer never knows which it
has: ``get_now`` answers at once when it can (memory) and returns
``NEED_AWAIT`` when it cannot (Redis), ``get`` is the awaitable form, ``put``
never blocks, ``grew`` accounts for bytes an entry made after it was stored (its
gzip form), ``purge`` removes by path, by key prefix, or everything, and
``invalidate`` removes what is stored for given targets (RFC 9111 §4.4).

Keys begin with the request target, so a purge by path or prefix needs no index;
invalidation, which runs after every unsafe request, keeps one per target.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Optional, Sequence, Set, Union

from pyproxy.cache.entry import CachedResponse
from pyproxy.cache.key import VARIANT_SEPARATOR

NEED_AWAIT = "need-await"
# RFC 9111 §4.1: the variants kept per key (of a response that Varies); past it, the
# least recently used goes.
MAX_VARIANTS = 4


class CacheStats:
    """Counters the metrics endpoint reads; plain ints, updated without locks (one loop)."""

    __slots__ = (
        "hits",
        "misses",
        "stale",
        "bypass",
        "stores",
        "evictions",
        "too_large",
        "errors",
        "invalidations",
        "revalidated",
        "not_modified",
        "ranges",
        "refreshes",
        "stale_if_error",
        "entries",
        "bytes_stored",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


def key_path(key: bytes) -> bytes:
    """The path part of a key (before the query and the key's other fields)."""
    target = key_target(key)
    query = target.find(b"?")
    return target if query < 0 else target[:query]


def key_target(key: bytes) -> bytes:
    """The origin-form target a key was made for (path and query; see request_key)."""
    end = key.find(b"\x00")
    return key if end < 0 else key[:end]


def purge_matches(key: bytes, path: Optional[bytes], prefix: Optional[bytes]) -> bool:
    if path is not None:
        return key_path(key) == path
    if prefix is not None:
        return key.startswith(prefix)
    return True


class MemoryStore:
    """LRU by recency of use; bounded by total bytes and by entry count.

    An entry larger than ``max_object_bytes`` is never stored. Entries past
    every stale window are dropped when looked up; the byte bound evicts the
    rest, so nothing here grows with traffic beyond the bounds.
    """

    synchronous = True

    def __init__(self, max_bytes: int, max_entries: int, stats: CacheStats, clock) -> None:  # type: ignore[no-untyped-def]
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.stats = stats
        self._clock = clock
        self._entries: "OrderedDict[bytes, CachedResponse]" = OrderedDict()
        self._bytes = 0
        # The keys stored for each target (every caller, method and body): what an
        # unsafe request's answer invalidates (RFC 9111 §4.4), found without a scan.
        self._by_target: Dict[bytes, Set[bytes]] = {}
        # Per key with variants: its variant keys, least recently used first.
        self._variants: Dict[bytes, "OrderedDict[bytes, None]"] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def get_now(self, key: bytes) -> Union[CachedResponse, None, str]:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.remaining(self._clock()) <= 0:
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        if VARIANT_SEPARATOR in key:
            primary = key[: key.find(VARIANT_SEPARATOR)]
            variants = self._variants.get(primary)
            if variants is not None and key in variants:
                variants.move_to_end(key)
        return entry

    async def get(self, key: bytes) -> Optional[CachedResponse]:
        return self.get_now(key)  # type: ignore[return-value]

    def put(self, key: bytes, entry: CachedResponse) -> bool:
        size = entry.size + len(key)
        if size > self.max_bytes:
            self.stats.too_large += 1
            return False
        if key in self._entries:
            self._remove(key)
        entries = self._entries
        while entries and (self._bytes + size > self.max_bytes or len(entries) >= self.max_entries):
            self._evict_oldest()
        entries[key] = entry
        entry.store_key = key
        target = key_target(key)
        keys = self._by_target.get(target)
        if keys is None:
            keys = self._by_target[target] = set()
        keys.add(key)
        if VARIANT_SEPARATOR in key:
            primary = key[: key.find(VARIANT_SEPARATOR)]
            variants = self._variants.get(primary)
            if variants is None:
                variants = self._variants[primary] = OrderedDict()
            variants[key] = None
            while len(variants) > MAX_VARIANTS:
                oldest = next(iter(variants))
                self._remove(oldest)  # unindexes it from variants too
        self._bytes += size
        self._update_gauges()
        return True

    def grew(self, entry: CachedResponse, delta: int) -> None:
        """``entry`` holds ``delta`` more bytes than when it was stored (its gzip form was
        made on a hit): count them, and evict least recently used entries, this one
        included if it is the oldest, until the byte bound holds again."""
        key = entry.store_key
        if key is None or self._entries.get(key) is not entry:
            return  # no longer stored here: its bytes go when the last response using it ends
        self._bytes += delta
        while self._entries and self._bytes > self.max_bytes:
            self._evict_oldest()
        self._update_gauges()

    def _evict_oldest(self) -> None:
        old_key, old = self._entries.popitem(last=False)
        self._bytes -= old.size + len(old_key)
        self._unindex(old_key)
        self.stats.evictions += 1

    def _unindex(self, key: bytes) -> None:
        if VARIANT_SEPARATOR in key:
            primary = key[: key.find(VARIANT_SEPARATOR)]
            variants = self._variants.get(primary)
            if variants is not None:
                variants.pop(key, None)
                if not variants:
                    del self._variants[primary]
        target = key_target(key)
        keys = self._by_target.get(target)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_target[target]

    def invalidate(self, targets: Sequence[bytes]) -> None:
        """RFC 9111 §4.4: drop what is stored for these targets, under every caller."""
        for target in targets:
            for key in list(self._by_target.get(target, ())):
                self._remove(key)
                self.stats.invalidations += 1

    async def purge(self, path: Optional[bytes] = None, prefix: Optional[bytes] = None) -> int:
        doomed = [k for k in self._entries if purge_matches(k, path, prefix)]
        for key in doomed:
            self._remove(key)
        return len(doomed)

    async def close(self) -> None:
        self._entries.clear()
        self._by_target.clear()
        self._variants.clear()
        self._bytes = 0
        self._update_gauges()

    def _remove(self, key: bytes) -> None:
        old = self._entries.pop(key)
        self._bytes -= old.size + len(key)
        self._unindex(key)
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.stats.entries = len(self._entries)
        self.stats.bytes_stored = self._bytes
