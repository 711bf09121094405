"""The coalescer: one upstream fetch per key, its response fanned out to every subscriber.

A ``Fetch`` stands where a client connection would stand for the upstream
exchange (the handler's retry and failure logic drive it unchanged) and
relays each event to its subscribers as it happens: an SSE stream reaches
every follower live. A subscriber that joins mid-response first gets a replay
of what was relayed so far; the replay buffer is bounded, and once a response
outgrows it the fetch leaves the in-flight table, so later requests make their
own upstream call.

What fetches keep (for late joiners, and for the cache's recording) is bounded
twice: per response (``dedup_replay_bytes``, ``cache_max_object_bytes``) and in
total (``inflight_buffer_bytes``). A response that would take the total past its
bound is relayed without being kept: nobody joins it and it is not stored, but
every subscriber still gets all of it.

Policies (see the README):

- *independence*: a subscriber leaving affects nobody else; only when the
  last one is gone is the fetch cancelled and its upstream connection closed;
- *slow subscribers*: with one subscriber, backpressure works as for any
  request (the upstream is paused). With several, the upstream is paused only
  while all of them are, and a subscriber whose unsent bytes exceed
  ``dedup_max_backlog`` is disconnected, so it cannot slow the others;
- *failures* reach every subscriber alike (the same 5xx, or the same
  truncation) and are never stored.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

from pyproxy.cache.policy import vary_names, vary_values
from pyproxy.cache.validation import answers_not_modified
from pyproxy.errors import ProxyError
from pyproxy.sink import abandon

if TYPE_CHECKING:  # pragma: no cover
    import asyncio

    from pyproxy.cache.entry import CachedResponse
    from pyproxy.cache.layer import Recording
    from pyproxy.server.protocol import ClientConnection

log = logging.getLogger("pyproxy.dedup")

Header = Tuple[bytes, bytes]

X_DEDUP_FOLLOWER = (b"x-dedup", b"follower")
_AGE_ZERO = [(b"age", b"0")]


class DedupStats:
    __slots__ = (
        "leaders",
        "followers",
        "replays",
        "dropped_slow",
        "vary_mismatch",
        "in_flight",
        "retained_bytes",  # kept by all fetches now; at most inflight_buffer_bytes
        "over_budget",  # responses not kept because that total was at its bound
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


class Subscriber:
    """One client's place on a fetch; the client connection's ``exchange``."""

    __slots__ = ("fetch", "client", "extra", "request_headers", "paused", "redispatch")

    def __init__(
        self,
        fetch: "Fetch",
        client: "ClientConnection",
        extra: List[Header],
        request_headers: Sequence[Header],
        redispatch: Optional[Callable[["ClientConnection"], None]],
    ) -> None:
        self.fetch = fetch
        self.client = client
        self.extra = extra  # X-Cache / X-Dedup lines for this client
        self.request_headers = request_headers
        self.paused = client._write_paused
        self.redispatch = redispatch  # for a follower whose Vary values differ

    # --- what the client connection calls (its ResponseSource interface) ---------------

    def client_gone(self) -> None:
        self.fetch.unsubscribe(self)

    def client_paused(self) -> None:
        self.paused = True
        self.fetch.subscriber_paused()

    def client_resumed(self) -> None:
        self.paused = False
        self.fetch.subscriber_resumed()


class Fetch:
    """The sink of one upstream exchange, shared by its subscribers.

    It offers the response side of a client connection (``start_response``,
    ``send_data``, ``flush``, ``finish_response``, ``abort_*``, ``send_error``)
    plus the ``loop``/``task``/``exchange`` slots the handler drives a request with.
    """

    __slots__ = (
        "loop",
        "task",
        "exchange",
        "key",
        "coalescer",
        "subscribers",
        "joinable",
        "background",
        "recording",
        "stale_fallback",
        "_write_paused",
        "response_started",
        "finished",
        "_status",
        "_reason",
        "_headers",
        "_chunks",
        "_buffered",
        "_keep_limit",
        "_diverted",
        "_leader_headers",
        "upstream_ttfb",
        "_age_missing",
        "revalidating",
    )

    def __init__(
        self,
        loop: "asyncio.AbstractEventLoop",
        key: bytes,
        coalescer: "Coalescer",
        *,
        joinable: bool,
        background: bool,
        recording: Optional["Recording"],
        stale_fallback: Optional[Callable[["Fetch"], bool]],
        leader_headers: Sequence[Header],
    ) -> None:
        self.loop = loop
        self.task: Optional["asyncio.Task[None]"] = None
        self.exchange = None  # the upstream Exchange, set by the handler
        self.key = key
        self.coalescer = coalescer
        self.subscribers: List[Subscriber] = []
        self.joinable = joinable
        self.background = background  # a cache refresh: runs on with no subscriber
        self.recording = recording  # the cache wants this response, if storable
        # Called on a failure before any response: serves a stale entry instead (stale-if-error).
        self.stale_fallback = stale_fallback
        self._write_paused = False
        self.response_started = False
        self.finished = False
        self._status = 0
        self._reason = b""
        self._headers: List[Header] = []
        self._chunks: Optional[List[bytes]] = []
        self._buffered = 0
        self._keep_limit = 0  # retained bytes past which _outgrown decides again
        self._diverted = False  # the response was replaced by a stale entry
        self._leader_headers = leader_headers
        self.upstream_ttfb = -1.0  # set by the exchange, passed on to every subscriber
        self._age_missing = True
        # The stale entry this fetch's conditional request was made from (RFC 9111 §4.3.1).
        self.revalidating: Optional["CachedResponse"] = None

    @property
    def gone(self) -> bool:
        """Nobody will read this response any more (the sink interface's question)."""
        return self.finished

    # --- subscribers -------------------------------------------------------------------

    def subscribe(
        self,
        client: "ClientConnection",
        extra: List[Header],
        request_headers: Sequence[Header],
        redispatch: Optional[Callable[["ClientConnection"], None]] = None,
    ) -> Subscriber:
        sub = Subscriber(self, client, extra, request_headers, redispatch)
        self.subscribers.append(sub)
        client.exchange = sub  # type: ignore[assignment]
        for name, value in extra:
            if name == b"x-cache":
                client.cache_status = value
        client.dedup_status = b"follower" if self.subscribers[0] is not sub or self.background else b"leader"
        if self.response_started:
            # A mid-stream joiner: everything so far, then the live rest (a fetch is
            # only joinable while it keeps everything so far).
            self.coalescer.stats.replays += 1
            client.upstream_ttfb = self.upstream_ttfb
            client.start_response(self._status, self._reason, self._headers_for(sub))
            for chunk in self._chunks or ():
                client.send_data(chunk)
            client.flush()
        if not sub.paused and self._write_paused:
            self.subscriber_resumed()
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        try:
            self.subscribers.remove(sub)
        except ValueError:
            return
        if not self.subscribers and not self.background and not self.finished:
            self.cancel()
        elif self._write_paused is False and self.subscribers and all(s.paused for s in self.subscribers):
            self.subscriber_paused()

    def cancel(self) -> None:
        """Nobody wants the response any more: close the upstream so it stops generating."""
        self.finished = True
        self.coalescer.remove(self)
        self._release()
        abandon(self)

    def subscriber_paused(self) -> None:
        if all(s.paused for s in self.subscribers):
            self._write_paused = True
            if self.exchange is not None:
                self.exchange.client_paused()

    def subscriber_resumed(self) -> None:
        if self._write_paused:
            self._write_paused = False
            if self.exchange is not None:
                self.exchange.client_resumed()

    def _headers_for(self, sub: Subscriber) -> List[Header]:
        headers = self._headers
        extra = sub.extra
        if not extra:
            return headers[:]
        if self._age_missing and extra[0][0] == b"x-cache":
            extra = extra + _AGE_ZERO  # through the cache layer: an Age on every response
        if headers and headers[-1][0] == b"content-length":  # stays last, by contract
            return headers[:-1] + extra + headers[-1:]
        return headers + extra

    # --- the response side of a client connection -----------------------------------------

    def note_upstream(self, name: str, attempts: int) -> None:
        """Which upstream answered (the gateway): for each subscriber's access log line."""
        for sub in self.subscribers:
            sub.client.note_upstream(name, attempts)

    def send_interim(self, status: int, reason: bytes, headers: List[Header]) -> None:
        """A 1xx: to the subscribers there now; hints, never stored nor replayed."""
        for sub in self.subscribers:
            sub.client.send_interim(status, reason, headers)

    def start_response(self, status: int, reason: bytes, headers: List[Header]) -> None:
        self.response_started = True
        if status == 304 and self.revalidating is not None and self.recording is not None:
            self._not_modified(headers)
            return
        if status >= 500 and self.stale_fallback is not None and self.stale_fallback(self):
            self._diverted = True  # RFC 5861 §4: a stale entry instead of the 5xx
            self.joinable = False
            self.recording = None
            self.coalescer.remove(self)
            self._release()
            return
        upstream_x_cache = False
        self._age_missing = True
        for name, _ in headers:
            if name == b"x-cache":
                upstream_x_cache = True
            elif name == b"age":
                self._age_missing = False
        if upstream_x_cache:  # ours replaces the upstream's
            headers = [(n, v) for n, v in headers if n != b"x-cache"]
        self._status, self._reason, self._headers = status, reason, headers
        recording = self.recording
        if recording is not None and not recording.begin(status, reason, headers):
            self.recording = None
        declared = int(headers[-1][1]) if headers and headers[-1][0] == b"content-length" else 0
        self._outgrown(declared)
        leader_headers = self._leader_headers
        if any(sub.request_headers is not leader_headers for sub in self.subscribers):
            self._check_vary(headers)
        ttfb = self.upstream_ttfb
        for sub in self.subscribers:
            sub.client.upstream_ttfb = ttfb
            sub.client.start_response(status, reason, self._headers_for(sub))

    def _not_modified(self, headers: List[Header]) -> None:
        """§4.3.4: the stale entry is confirmed -- freshened and stored, and served to
        every subscriber from its stored body; the 304 itself reaches nobody."""
        from pyproxy.cache.layer import REVALIDATED

        recording = self.recording
        assert recording is not None and self.revalidating is not None
        entry = recording.not_modified(self.revalidating, headers)
        self._diverted = True
        self.joinable = False
        self.recording = None
        self.coalescer.remove(self)
        self._release()
        cache = recording.cache
        for sub in self.take_subscribers():
            # A client that sent its own validators (merged into the request) gets
            # the 304 its precondition earns (§4.3.2); everyone else the body.
            if answers_not_modified(b"GET", sub.request_headers, entry.headers):
                cache.send_not_modified(sub.client, entry, REVALIDATED)
            else:
                cache.serve(sub.client, entry, REVALIDATED, False)

    def send_data(self, data: bytes) -> None:
        if self._diverted:
            return
        chunks = self._chunks
        if chunks is not None:
            size = len(data)
            self._buffered += size
            chunks.append(data)
            stats = self.coalescer.stats
            stats.retained_bytes += size
            if self._buffered > self._keep_limit or stats.retained_bytes > self.coalescer.retained_limit:
                self._outgrown()
        for sub in self.subscribers:
            sub.client.send_data(data)

    def flush(self) -> None:
        subscribers = self.subscribers
        for sub in subscribers:
            sub.client.flush()
        if len(subscribers) > 1:
            limit = self.coalescer.max_backlog
            for sub in [s for s in subscribers if s.client.write_backlog() > limit]:
                self.coalescer.stats.dropped_slow += 1
                log.info("disconnecting a coalesced client more than %d bytes behind", limit)
                self.subscribers.remove(sub)
                sub.client.abort_now()
            if self._write_paused and not all(s.paused for s in self.subscribers):
                self.subscriber_resumed()

    def finish_response(self) -> None:
        self.finished = True
        self.coalescer.remove(self)
        self.exchange = None
        self.task = None
        if self._diverted:
            return
        recording = self.recording
        if recording is not None and self._chunks is not None:
            recording.finish(b"".join(self._chunks))
        self._release()
        for sub in self.take_subscribers():
            sub.client.finish_response()

    def abort_truncated(self) -> None:
        self._end_badly()
        for sub in self.take_subscribers():
            sub.client.abort_truncated()

    def abort_now(self) -> None:
        self._end_badly()
        for sub in self.take_subscribers():
            sub.client.abort_now()

    def send_error(self, exc: ProxyError) -> None:
        """The fetch failed: before any response, a stale entry may stand in (stale-if-error)."""
        self._end_badly()
        if not self.response_started and self.stale_fallback is not None and self.stale_fallback(self):
            return
        for sub in self.take_subscribers():
            sub.client.send_error(exc)

    def _end_badly(self) -> None:
        self.finished = True
        self.recording = None  # failures are never stored
        self.coalescer.remove(self)
        self._release()
        self.exchange = None
        self.task = None

    def take_subscribers(self) -> List[Subscriber]:
        subs, self.subscribers = self.subscribers, []
        return subs

    # --- bounded retention --------------------------------------------------------------

    def _outgrown(self, size: int = 0) -> None:
        """Retained (or declared) bytes passed a limit: drop whoever needed less.
        Afterwards ``_keep_limit`` is the next limit, and nothing is kept when
        neither the cache nor late joiners can use it any more, or when keeping it
        would take what all fetches keep past ``inflight_buffer_bytes``."""
        coalescer = self.coalescer
        size = max(size, self._buffered)
        recording = self.recording
        if recording is not None and size > recording.max_bytes:
            recording.too_large()
            self.recording = recording = None
        if self.joinable and size > coalescer.replay_bytes:
            self.joinable = False
            coalescer.remove(self)  # later requests fetch on their own
        if (recording is not None or self.joinable) and (
            coalescer.stats.retained_bytes + size - self._buffered > coalescer.retained_limit
        ):
            coalescer.stats.over_budget += 1
            self.recording = recording = None
            if self.joinable:
                self.joinable = False
                coalescer.remove(self)
        limits = [recording.max_bytes] if recording is not None else []
        if self.joinable:
            limits.append(coalescer.replay_bytes)
        if limits:
            self._keep_limit = min(limits)
        else:
            self._release()

    def _release(self) -> None:
        """Keep nothing more, and give back what was kept."""
        if self._chunks is not None:
            self.coalescer.stats.retained_bytes -= self._buffered
            self._buffered = 0
            self._chunks = None

    def _check_vary(self, headers: List[Header]) -> None:
        """§4.1 of RFC 9111 applied to followers: one whose Vary-named request fields
        differ from the leader's gets a fetch of its own instead of this response."""
        names = vary_names(headers)
        if names == ():
            return
        leader_values = vary_values(self._leader_headers, names) if names is not None else None
        for sub in list(self.subscribers):
            if sub.request_headers is self._leader_headers:
                continue
            if names is None or vary_values(sub.request_headers, names) != leader_values:
                if sub.redispatch is None:
                    continue
                self.coalescer.stats.vary_mismatch += 1
                self.subscribers.remove(sub)
                sub.client.exchange = None
                sub.redispatch(sub.client)


class Coalescer:
    """The table of fetches in flight that a request may join, by key."""

    def __init__(self, replay_bytes: int, max_backlog: int, retained_limit: int = 64 * 1024 * 1024) -> None:
        self.replay_bytes = replay_bytes
        self.max_backlog = max_backlog
        self.retained_limit = retained_limit  # what all fetches may keep together
        self.stats = DedupStats()
        self._in_flight: Dict[bytes, Fetch] = {}

    def __len__(self) -> int:
        return len(self._in_flight)

    def get(self, key: bytes) -> Optional[Fetch]:
        return self._in_flight.get(key)

    def add(self, fetch: Fetch) -> None:
        self._in_flight[fetch.key] = fetch
        self.stats.in_flight = len(self._in_flight)

    def remove(self, fetch: Fetch) -> None:
        if self._in_flight.get(fetch.key) is fetch:
            del self._in_flight[fetch.key]
            self.stats.in_flight = len(self._in_flight)
