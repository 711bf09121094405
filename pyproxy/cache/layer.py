"""The cache layer: looks entries up, judges them, serves them, and records new ones.

The policy is in ``policy`` (pure), the bytes in a store; this module holds
the few stateful decisions between them, and the ``X-Cache`` statuses:

- ``HIT``: fresh entry served; ``STALE``: served stale -- within
  stale-while-revalidate (one background refresh runs) or, when the upstream
  failed, within stale-if-error;
- ``MISS``: fetched from the upstream (and stored if storable);
- ``BYPASS``: the request said no-store, or asked for a range no stored response served;
- ``REVALIDATED``: a stale entry the upstream confirmed with a 304 (RFC 9111
  §4.3.4: freshened, its headers updated, its body not sent again);
- a 304 from pyproxy itself answers a client's own conditional request against a
  fresh entry (§4.3.2).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple, Union

from pyproxy.cache.entry import FRESH, STALE_IF_ERROR, STALE_WHILE_REVALIDATE, CachedResponse, strip_framing
from pyproxy.cache.key import variant_key
from pyproxy.cache.policy import Freshness, decide_storage, request_max_age, vary_values
from pyproxy.cache.ranges import UNSATISFIABLE, content_range, range_field, single_byte_range, unsatisfied_range
from pyproxy.cache.store import CacheStats, MemoryStore
from pyproxy.cache.validation import (
    answers_not_modified,
    conditional_headers,
    freshened_headers,
    not_modified_headers,
)
from pyproxy.rules import Rule

if TYPE_CHECKING:  # pragma: no cover
    from pyproxy.config import Settings
    from pyproxy.server.protocol import ClientConnection

log = logging.getLogger("pyproxy.cache")

Header = Tuple[bytes, bytes]

HIT = b"HIT"
MISS = b"MISS"
STALE = b"STALE"
BYPASS = b"BYPASS"
REVALIDATED = b"REVALIDATED"

# A hit whose body is at most this large is joined to its head: one write, one packet.
_JOIN_BODY_BELOW = 16 * 1024


def vary_marker(entry: CachedResponse, now: float) -> CachedResponse:
    """What the request's own key holds for a response that varies: the names, and a
    lifetime as long as the variant's (each new variant renews it)."""
    return CachedResponse(
        0,
        b"",
        [],
        b"",
        stream=False,
        stored_at=now,
        lifetime=max(entry.remaining(now), 1.0),
        initial_age=0.0,
        stale_while_revalidate=0.0,
        stale_if_error=0.0,
        vary_names=entry.vary_names,
        vary_values=(),
    )


class Recording:
    """A response on its way to the store, if the policy lets it in."""

    __slots__ = ("cache", "key", "method", "rule", "request_headers", "max_bytes", "requested_at", "_entry_args")

    def __init__(
        self, cache: "Cache", key: bytes, method: bytes, rule: Optional[Rule], request_headers: Sequence[Header]
    ) -> None:
        self.cache = cache
        self.key = key
        self.method = method
        self.rule = rule
        self.request_headers = request_headers
        self.max_bytes = cache.max_object_bytes
        self.requested_at = cache.clock()  # the response's age includes its delay (§4.2.3)
        self._entry_args: Optional[Tuple[int, bytes, list, Freshness, bool]] = None

    def begin(self, status: int, reason: bytes, headers: Sequence[Header]) -> bool:
        freshness, why = decide_storage(
            method=self.method,
            status=status,
            request_headers=self.request_headers,
            response_headers=headers,
            rule=self.rule,
            now=self.cache.clock(),
            request_time=self.requested_at,
        )
        if freshness is None:
            log.debug("not storing: %s", why)
            return False
        stored = strip_framing(headers)
        if freshness.omit:
            stored = [(n, v) for n, v in stored if n not in freshness.omit]
        self._entry_args = (status, reason, stored, freshness, freshness.stream)
        return True

    def not_modified(self, stale: CachedResponse, headers: Sequence[Header]) -> CachedResponse:
        """A 304 for the conditional request made from ``stale``: the entry with the
        304's fields (§3.2) and the freshness they give, stored again when storable
        (§4.3.4); returned either way, since the 304 confirmed its body."""
        merged = freshened_headers(stale.headers, strip_framing(headers))
        now = self.cache.clock()
        freshness, why = decide_storage(
            method=self.method,
            status=stale.status,
            request_headers=self.request_headers,
            response_headers=merged,
            rule=self.rule,
            now=now,
            request_time=self.requested_at,
        )
        if freshness is not None and freshness.omit:
            merged = [(n, v) for n, v in merged if n not in freshness.omit]
        entry = CachedResponse(
            stale.status,
            stale.reason,
            merged,
            stale.body,
            stream=stale.stream,
            stored_at=now,
            lifetime=freshness.lifetime if freshness is not None else 0.0,
            initial_age=freshness.initial_age if freshness is not None else 0.0,
            stale_while_revalidate=freshness.stale_while_revalidate if freshness is not None else 0.0,
            stale_if_error=freshness.stale_if_error if freshness is not None else 0.0,
            vary_names=stale.vary_names,
            vary_values=stale.vary_values,
        )
        cache = self.cache
        cache.stats.revalidated += 1
        if freshness is None:
            log.debug("revalidated, not stored again: %s", why)
            return entry
        cache.store_entry(self.key, entry)
        return entry

    def too_large(self) -> None:
        self.cache.stats.too_large += 1

    def finish(self, body: bytes) -> None:
        assert self._entry_args is not None
        status, reason, headers, freshness, stream = self._entry_args
        entry = CachedResponse(
            status,
            reason,
            headers,
            body,
            stream=stream,
            stored_at=self.cache.clock(),
            lifetime=freshness.lifetime,
            initial_age=freshness.initial_age,
            stale_while_revalidate=freshness.stale_while_revalidate,
            stale_if_error=freshness.stale_if_error,
            vary_names=freshness.vary,
            vary_values=vary_values(self.request_headers, freshness.vary),
        )
        self.cache.store_entry(self.key, entry)


class Cache:
    def __init__(self, settings: "Settings", loop: asyncio.AbstractEventLoop, clock=time.time) -> None:  # type: ignore[no-untyped-def]
        self.stats = CacheStats()
        self.clock = clock
        self.max_object_bytes = settings.cache_max_object_bytes
        self.gzip_level = settings.gzip_level
        self.gzip_min_length = settings.gzip_min_length
        # A shared store's entries carry their gzip form, made when stored: entries read
        # from it live for one response, so a form made on a hit would be made every hit.
        self.compress_on_store = settings.gzip and settings.cache_backend != "memory"
        self.rules = settings.cache_rules
        self.store: Union[MemoryStore, "RedisStore"]  # noqa: F821
        if settings.cache_backend == "memory":
            self.store = MemoryStore(settings.cache_max_bytes, settings.cache_max_entries, self.stats, clock)
        else:
            from pyproxy.cache.redis_store import RedisStore

            self.store = RedisStore(settings.cache_backend, settings.cache_redis_timeout, self.stats, clock, loop)

    # --- lookups ---------------------------------------------------------------------

    def lookup_now(self, key: bytes, request_headers: Sequence[Header]) -> Union[CachedResponse, None, str]:
        """The entry (the variant this request selects, §4.1), None, or NEED_AWAIT when
        the store must be awaited (``lookup``)."""
        entry = self.store.get_now(key)
        if type(entry) is CachedResponse and entry.is_vary_marker:
            return self.store.get_now(variant_key(key, vary_values(request_headers, entry.vary_names)))
        return entry

    async def lookup(self, key: bytes, request_headers: Sequence[Header]) -> Optional[CachedResponse]:
        entry = await self.store.get(key)
        if entry is not None and entry.is_vary_marker:
            return await self.store.get(variant_key(key, vary_values(request_headers, entry.vary_names)))
        return entry

    def store_entry(self, key: bytes, entry: CachedResponse) -> None:
        """Store a response: under its key, or, when it varies, under its variant's key
        with the marker under its own."""
        if self.compress_on_store:
            entry.gzipped(self.gzip_level, self.gzip_min_length)  # once, by the writer
        if entry.vary_names:
            if self.store.put(variant_key(key, entry.vary_values), entry):
                self.stats.stores += 1
                self.store.put(key, vary_marker(entry, self.clock()))
        elif self.store.put(key, entry):
            self.stats.stores += 1

    def judge(self, entry: Optional[CachedResponse], request_headers: Sequence[Header]) -> Optional[str]:
        """FRESH, STALE_WHILE_REVALIDATE, STALE_IF_ERROR, or None (unusable) for this request."""
        if entry is None:
            return None
        if entry.vary_names and not entry.matches_vary(vary_values(request_headers, entry.vary_names)):
            return None  # §4.1: stored for a request with other Vary-named values
        now = self.clock()
        state = entry.state(now)
        if state is FRESH:
            max_age = request_max_age(request_headers)
            if max_age is not None and entry.age(now) > max_age:
                return None  # §5.2.1.1: the client wants something younger
            return FRESH
        if state is STALE_WHILE_REVALIDATE or state is STALE_IF_ERROR:
            return state
        return None

    # --- answers ---------------------------------------------------------------------

    def serve(self, client: "ClientConnection", entry: CachedResponse, status: bytes, head_only: bool) -> None:
        """Answer a client from an entry: prebuilt head, one write where it can."""
        if status is HIT:
            self.stats.hits += 1
        elif status is STALE:
            self.stats.stale += 1  # (REVALIDATED is counted where the 304 arrived)
        client.cache_status = status
        age = int(entry.age(self.clock()))
        if client.writes_raw:
            extra = b"".join(b"%s: %s\r\n" % header for header in client.response_decorations())
            gzip_head = None
            wire = entry.wire
            if client.accepts_gzip:
                size = entry.size
                variant = entry.gzipped(self.gzip_level, self.gzip_min_length)
                if entry.size != size:
                    self.store.grew(entry, entry.size - size)  # the byte bound counts the gzip form
                if variant is not None:
                    gzip_head, wire = variant
            head = entry.response_head(status, age, client.closing, extra, gzip_head)
            if head_only or not wire:
                client.send_prebuilt((head,), entry.status, 0)
            elif len(wire) <= _JOIN_BODY_BELOW:
                client.send_prebuilt((head + wire,), entry.status, len(wire))
            else:
                client.send_prebuilt((head, wire), entry.status, len(wire))
            return
        client.start_response(entry.status, entry.reason, entry.client_headers(status, age))
        if not head_only:
            for piece in entry.body_pieces():
                client.send_data(piece)
        client.finish_response()

    def revalidation(
        self, entry: Optional[CachedResponse], request_headers: Sequence[Header]
    ) -> Optional[List[Header]]:
        """The fields that make this request revalidate a stored entry (§4.3.1), or
        None: no validator, another variant, an event stream, or preconditions of the
        client's that do not merge with the entry's (see conditional_headers)."""
        if entry is None or not entry.validatable or entry.stream:
            return None
        if entry.vary_names and not entry.matches_vary(vary_values(request_headers, entry.vary_names)):
            return None
        return conditional_headers(entry.headers, request_headers)

    def answer_conditional(
        self, client: "ClientConnection", entry: CachedResponse, method: bytes, request_headers: Sequence[Header]
    ) -> bool:
        """§4.3.2: a client's conditional request against a fresh entry whose
        precondition fails is answered 304 here; False: serve the entry as usual."""
        if not answers_not_modified(method, request_headers, entry.headers):
            return False
        self.stats.hits += 1
        self.send_not_modified(client, entry, HIT)
        return True

    def send_not_modified(self, client: "ClientConnection", entry: CachedResponse, status: bytes) -> None:
        self.stats.not_modified += 1
        client.cache_status = status
        age = int(entry.age(self.clock()))
        headers = not_modified_headers(entry.headers) + [(b"x-cache", status), (b"age", b"%d" % age)]
        client.start_response(304, b"Not Modified", headers)
        client.finish_response()

    def serve_range(
        self, client: "ClientConnection", entry: CachedResponse, head_only: bool, request_headers: Sequence[Header]
    ) -> bool:
        """RFC 9111 §3.4 / RFC 9110 §14: one byte range of a fresh stored 200, as a 206
        (or a 416 when none of it exists). False: not served here -- several ranges,
        If-Range (its validator is the upstream's to judge), an event stream."""
        value = range_field(request_headers)
        if not value or entry.status != 200 or entry.stream or any(n == b"if-range" for n, _ in request_headers):
            return False
        length = len(entry.body)
        wanted = single_byte_range(value, length)
        if wanted is None:
            return False
        self.stats.hits += 1
        self.stats.ranges += 1
        client.cache_status = HIT
        age = int(entry.age(self.clock()))
        headers = entry.headers + [(b"x-cache", HIT), (b"age", b"%d" % age)]  # framing follows
        if wanted == UNSATISFIABLE:
            headers += [(b"content-range", unsatisfied_range(length)), (b"content-length", b"0")]
            client.start_response(416, b"Range Not Satisfiable", headers)
            client.finish_response()
            return True
        first, last = wanted  # type: ignore[misc]
        headers += [
            (b"content-range", content_range(first, last, length)),
            (b"content-length", b"%d" % (last + 1 - first)),
        ]
        client.start_response(206, b"Partial Content", headers)
        if not head_only:
            client.send_data(entry.body[first : last + 1])
        client.finish_response()
        return True

    def recording(
        self, key: bytes, method: bytes, rule: Optional[Rule], request_headers: Sequence[Header]
    ) -> Recording:
        return Recording(self, key, method, rule, request_headers)

    def invalidate(self, targets: Sequence[bytes]) -> None:
        """RFC 9111 §4.4: an unsafe request was answered without error; what is stored
        for its target (and same-origin Location / Content-Location) goes, for every
        caller -- and, through Redis, in every instance."""
        log.debug("invalidating %r", targets)
        self.store.invalidate(targets)

    # --- operations ------------------------------------------------------------------

    async def purge(self, path: Optional[bytes] = None, prefix: Optional[bytes] = None) -> int:
        """Remove entries: those for one path (any query, method, caller), those whose
        key starts with a prefix (a path prefix), or all when neither is given."""
        removed = await self.store.purge(path=path, prefix=prefix)
        log.info("cache purge (path=%r, prefix=%r): %d entries removed", path, prefix, removed)
        return removed

    async def close(self) -> None:
        await self.store.close()
