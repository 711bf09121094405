"""Admission (``[auth] mode = "keys"``): who is asking, may they, and how much they used.

The handler asks ``authenticate`` with the request head (401 here), then
``admit`` once the public model is known (403 and 429 here); the answer is an
``Admitted`` the client connection holds until its request ends, however it
ends -- ``done`` runs from the connection's one end-of-request hook, so an
in-flight slot cannot leak on a cancelled stream, an upstream error, a timeout
or a coalesced follower leaving.

The decisions are the pure ``keys`` and ``limits`` functions; this module holds
their state (the key table, reloaded when the file changes or on SIGHUP; the
limiter's buckets), the usage totals and the metrics of this process.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from pyproxy.errors import Forbidden, RateLimited, Unauthorized
from pyproxy.gateway import limits as gcra
from pyproxy.gateway.keys import ClientKey, KeysError, KeyTable, Limits, load_keys, presented_key
from pyproxy.gateway.shared_limits import ScopeSet, SharedLimits, SharedRefusal, SharedTicket
from pyproxy.gateway.usage import UsageMeter
from pyproxy.metrics import Histogram

if TYPE_CHECKING:  # pragma: no cover
    import asyncio

    from pyproxy.gateway.config import AuthConfig

log = logging.getLogger("pyproxy.keys")

Header = Tuple[bytes, bytes]

# How often each process looks at the keys file's mtime: a removed or disabled key
# stops working within this (the issue asks for 5 s; a stat a second costs nothing).
RELOAD_CHECK_SECONDS = 1.0
MAX_SCOPE_MEMO = 4096  # (key, model) pairs whose buckets admission keeps at hand
OTHER = "other"
# Answers that cost the upstream no generation: they spend no tokens of a key.
FROM_CACHE = frozenset({b"HIT", b"STALE", b"REVALIDATED"})  # the metrics label of a model that is not configured

# OpenTelemetry GenAI semantic conventions, the histograms' explicit bucket boundaries.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class Admitted:
    """One admitted request: its key, its hold on the limits, its usage meter."""

    __slots__ = ("key", "model", "label", "ticket", "meter", "limit_headers", "started")

    def __init__(
        self,
        key: ClientKey,
        model: Optional[str],
        label: str,
        ticket: "gcra.Ticket | SharedTicket | None",
        headers: List[Header],
    ) -> None:
        self.key = key
        self.model = model  # the public model name, or None (a route without one)
        self.label = label  # its metrics label: the configured name (or glob), else "other"
        self.ticket = ticket  # None: the key has no limits; a SharedTicket: decided by Redis
        self.meter: Optional[UsageMeter] = None  # set when the response head is a 2xx JSON/event stream
        self.limit_headers = headers  # x-ratelimit-*, added to the response head
        self.started = time.perf_counter()

    def on_head(self, status: int, headers: List[Header]) -> Optional[UsageMeter]:
        """The response head is going out: add the rate-limit fields (before a trailing
        Content-Length, which stays last by contract); the meter to feed, if any."""
        extra = self.limit_headers
        if extra:
            if headers and headers[-1][0] == b"content-length":
                headers[-1:-1] = extra
            else:
                headers += extra
        meter = UsageMeter()
        if meter.start(status, headers):
            self.meter = meter
            return meter
        return None


class _UsageRow:
    """What one (key, tenant, model) triple's requests add to: found once, then plain
    additions (the totals per key and per tenant are summed from these when asked)."""

    __slots__ = ("requests", "input", "output", "estimated", "hist_in", "hist_out")

    def __init__(self) -> None:
        self.requests = 0
        self.input = 0
        self.output = 0
        self.estimated = 0  # requests whose usage was not reported: their estimate stood
        self.hist_in: Optional[Histogram] = None  # made at the first reported usage
        self.hist_out: Optional[Histogram] = None


class UsageStats:
    """This process's usage: per key and tenant (admin /usage), and the metrics."""

    def __init__(self) -> None:
        self.rate_limited: Dict[Tuple[str, str, str], int] = {}  # (key, reason, proxy|upstream)
        self.unknown = 0  # responses that reported no usage: their estimate stands
        self.token_usage: Dict[Tuple[str, str], Histogram] = {}  # (model, type)
        self.ttft: Dict[str, Histogram] = {}
        self.tpot: Dict[str, Histogram] = {}
        self._rows: Dict[Tuple[str, str, str], _UsageRow] = {}  # (key, tenant, model label)

    @property
    def tokens(self) -> Dict[Tuple[str, str, str], int]:
        """(key, model, input|output) -> tokens, as the metrics label them."""
        out: Dict[Tuple[str, str, str], int] = {}
        for (key, _, model), row in self._rows.items():
            for kind, n in (("input", row.input), ("output", row.output)):
                out[(key, model, kind)] = out.get((key, model, kind), 0) + n
        return out

    def totals(self, by: int) -> Dict[str, Dict[str, int]]:
        """Requests and tokens per key (``by`` 0) or per tenant (1)."""
        out: Dict[str, Dict[str, int]] = {}
        for names, row in self._rows.items():
            entry = out.get(names[by])
            if entry is None:
                entry = out[names[by]] = {"requests": 0, "input_tokens": 0, "output_tokens": 0, "estimated": 0}
            entry["requests"] += row.requests
            entry["input_tokens"] += row.input
            entry["output_tokens"] += row.output
            entry["estimated"] += row.estimated
        return out

    def _histogram(self, model: str, kind: str) -> Histogram:
        hist = self.token_usage.get((model, kind))
        if hist is None:
            hist = self.token_usage[(model, kind)] = Histogram(TOKEN_BUCKETS)
        return hist

    def count(self, key: ClientKey, model: str, used_in: int, used_out: int, reported: bool) -> None:
        names = (key.name, key.tenant, model)
        row = self._rows.get(names)
        if row is None:
            row = self._rows[names] = _UsageRow()
        row.requests += 1
        row.input += used_in
        row.output += used_out
        if reported:
            hist = row.hist_in
            if hist is None:
                hist = row.hist_in = self._histogram(model, "input")
                row.hist_out = self._histogram(model, "output")
            hist.observe(used_in)
            row.hist_out.observe(used_out)  # type: ignore[union-attr]
        else:
            row.estimated += 1

    def timing(self, model: str, ttft: float, per_token: Optional[float]) -> None:
        hist = self.ttft.get(model)
        if hist is None:
            hist = self.ttft[model] = Histogram(TTFT_BUCKETS)
        hist.observe(ttft)
        if per_token is not None:
            hist = self.tpot.get(model)
            if hist is None:
                hist = self.tpot[model] = Histogram(TPOT_BUCKETS)
            hist.observe(per_token)

    def refused(self, key: str, reason: str, source: str) -> None:
        label = (key, reason, source)
        self.rate_limited[label] = self.rate_limited.get(label, 0) + 1

    def snapshot(self) -> Dict[str, Any]:
        return {
            "tokens": [[list(k), v] for k, v in self.tokens.items()],
            "rate_limited": [[list(k), v] for k, v in self.rate_limited.items()],
            "unknown": self.unknown,
            "token_usage": [[list(k), h.snapshot()] for k, h in self.token_usage.items()],
            "ttft": [[[k], h.snapshot()] for k, h in self.ttft.items()],
            "tpot": [[[k], h.snapshot()] for k, h in self.tpot.items()],
            "per_key": self.totals(0),
            "per_tenant": self.totals(1),
        }


class Admission:
    def __init__(
        self,
        auth: "AuthConfig",
        loop: "asyncio.AbstractEventLoop",
        clock: Callable[[], float] = time.monotonic,
        processes: int = 1,
    ) -> None:
        self.auth = auth
        self.loop = loop
        self.table: KeyTable = auth.table
        self.limiter = gcra.Limiter()
        self.clock = clock  # the limits' clock (monotonic; a fake one in tests)
        self.wall = time.time  # for keys' expires
        self.stats = UsageStats()
        self.reloads = 0
        self.reload_errors = 0
        self._file_id = self._stat()
        self._timer: Optional["asyncio.TimerHandle"] = None
        # (key name, public model) -> (its buckets, any counts tokens): admission's
        # lookups done once (names are unique in a table; a reload clears it).
        self._scopes: Dict[Tuple[str, Optional[str]], Scopes] = {}
        # limits_backend = "redis://...": the counters every instance shares. While Redis
        # cannot answer, this process enforces its share of each limit alone: the
        # configured share of the instance, divided among its --workers processes.
        self.shared: Optional[SharedLimits] = None
        self.local_share = 1.0
        if auth.limits_backend != "memory":
            self.shared = SharedLimits(auth.limits_backend, auth.limits_redis_timeout, loop)
            self.local_share = auth.limits_local_share / max(1, processes)
        self._shares: Dict[Limits, Limits] = {}

    # --- the keys file ---------------------------------------------------------------------

    def start(self) -> None:
        self._timer = self.loop.call_later(RELOAD_CHECK_SECONDS, self._check_file)
        if self.shared is not None:
            self.shared.start()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.shared is not None:
            self.shared.close()

    def _stat(self) -> Optional[Tuple[int, int, int]]:
        try:
            st = os.stat(self.auth.keys_file)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _check_file(self) -> None:
        self._timer = self.loop.call_later(RELOAD_CHECK_SECONDS, self._check_file)
        file_id = self._stat()
        if file_id != self._file_id:
            self._file_id = file_id
            self.reload("changed on disk")

    def reload(self, why: str = "SIGHUP") -> bool:
        """Read the keys file again; on any error keep the keys in force (one log line)."""
        try:
            table = load_keys(self.auth.keys_file)
        except KeysError as exc:
            self.reload_errors += 1
            log.error("keys file not reloaded (%s), the previous keys stay in force: %s", why, exc)
            return False
        self.table = table
        self._scopes.clear()  # new limits, and buckets pruned below
        self._shares.clear()
        self.reloads += 1
        live = [f"k:{name}" for name in table.names] + [f"t:{name}" for name in table.tenants]
        live += [
            scope for scope in self.limiter.buckets if scope.startswith("m:") and scope.split(":")[1] in table.names
        ]
        self.limiter.prune(live)
        # The pid: with --workers, every worker reloads and says so.
        log.info("keys file reloaded (%s) in process %d: %d keys", why, os.getpid(), len(table.by_digest))
        return True

    # --- admission -------------------------------------------------------------------------

    def authenticate(self, headers: List[Header]) -> ClientKey:
        presented = presented_key(headers)
        if presented is None:
            raise Unauthorized(
                "missing API key: send it as Authorization: Bearer <key> (or x-api-key, or api-key)",
                code="missing_api_key",
            )
        key = self.table.lookup(presented)
        if key is None:
            raise Unauthorized("invalid API key", code="invalid_api_key")
        if key.disabled:
            raise Unauthorized(f"the API key {key.name!r} is disabled", code="invalid_api_key")
        if key.expires is not None and self.wall() >= key.expires:
            raise Unauthorized(f"the API key {key.name!r} has expired", code="invalid_api_key")
        return key

    def admit(
        self,
        key: ClientKey,
        model: Optional[str],
        label: str,
        body_bytes: int,
        value: Any,
        then: Optional[Callable[[Any], None]] = None,
    ) -> Optional[Admitted]:
        """The admission (raises 403/429); or -- with the Redis backend answering and a
        ``then`` to call -- None, and ``then`` gets the Admitted or the RateLimited a
        round trip later. ``then`` owns the Admitted: it must reach ``done``."""
        if model is not None and not key.allows(model):
            raise Forbidden(f"the API key {key.name!r} may not use the model {model!r}", code="model_not_allowed")
        scopes = self._scopes.get((key.name, model))
        if scopes is None:
            scopes = self._scopes_of(key, model)
        buckets, counts_tokens, shared_scopes = scopes
        if not buckets:
            return Admitted(key, model, label, None, [])
        cost = 0
        if counts_tokens:
            cost = gcra.estimate_tokens(body_bytes, value, self.auth.tpm_reserve_max)
        shared = self.shared
        if then is not None and shared is not None and shared.available:
            shared.admit(
                shared_scopes,  # type: ignore[arg-type]
                cost,
                lambda decision: then(self._shared_outcome(decision, key, model, label, buckets, cost)),
            )
            return None
        return self._admit_local(key, model, label, buckets, cost)

    def _shared_outcome(
        self,
        decision: Any,
        key: ClientKey,
        model: Optional[str],
        label: str,
        buckets: List[gcra.Bucket],
        cost: int,
    ) -> "Admitted | RateLimited":
        try:
            if decision is None:  # Redis failed just now: this process decides, at its share
                return self._admit_local(key, model, label, buckets, cost)
            if type(decision) is SharedRefusal:
                self.stats.refused(key.name, decision.reason, "proxy")
                return RateLimited(
                    _refusal_message(key, decision),
                    decision.retry_after,
                    limit_headers(decision.bucket, 0.0),
                    tokens=decision.reason == gcra.TOKENS,
                )
            return Admitted(key, model, label, decision, limit_headers(decision.state, 0.0))
        except RateLimited as exc:
            return exc

    def _admit_local(
        self, key: ClientKey, model: Optional[str], label: str, buckets: List[gcra.Bucket], cost: int
    ) -> Admitted:
        now = self.clock()
        decision = gcra.admit(buckets, cost, now)
        if type(decision) is gcra.Refusal:
            self.stats.refused(key.name, decision.reason, "proxy")
            headers = limit_headers(decision.bucket, now)
            raise RateLimited(
                _refusal_message(key, decision), decision.retry_after, headers, tokens=decision.reason == gcra.TOKENS
            )
        return Admitted(key, model, label, decision, limit_headers(buckets[0], now))  # type: ignore[arg-type]

    def done(self, admitted: Admitted, status: int, cache_status: bytes, dedup_status: bytes) -> Dict[str, Any]:
        """The request ended: free its slot, settle its tokens, count its usage.
        Returns the access log's fields."""
        ticket = admitted.ticket
        shared_ticket = type(ticket) is SharedTicket
        if ticket is not None and not shared_ticket:
            gcra.release(ticket)  # type: ignore[arg-type]
        meter = admitted.meter
        if meter is not None:
            meter.finish()
        reported = meter is not None and meter.reported
        free = cache_status in FROM_CACHE or dedup_status == b"follower"  # no upstream tokens spent
        key = admitted.key
        model = admitted.label
        used_in = used_out = 0
        if reported:
            used_in = meter.input or 0  # type: ignore[union-attr]
            used_out = meter.output or 0  # type: ignore[union-attr]
        if status == 429:  # the upstream's own (pyproxy's are answered before admission)
            self.stats.refused(key.name, "upstream", "upstream")
        used = 0
        if ticket is not None and ticket.reserved:
            used = 0 if free else (used_in + used_out if reported else ticket.reserved)
            if not shared_ticket:
                gcra.reconcile(ticket, used, self.clock())  # type: ignore[arg-type]
        if self.shared is not None:  # the lease, the reconcile and the usage, in Redis
            shared = ticket if shared_ticket else None
            estimated = not free and not reported
            self.shared.end(shared, used, key.name, key.tenant, used_in, used_out, estimated)  # type: ignore[arg-type]
        if not free:
            if not reported and 200 <= status < 300:
                self.stats.unknown += 1
            self.stats.count(key, model, used_in, used_out, reported)
            if reported and meter.first_at:  # type: ignore[union-attr]
                first = meter.first_at - admitted.started  # type: ignore[union-attr]
                rest = time.perf_counter() - meter.first_at  # type: ignore[union-attr]
                # Time per output token means something for a stream only: a JSON body
                # arrives all at once.
                streamed = meter.streamed and used_out > 1  # type: ignore[union-attr]
                self.stats.timing(model, first, rest / (used_out - 1) if streamed else None)
        return {
            "key": key.name,
            "tenant": key.tenant,
            "model": admitted.model,
            "input_tokens": used_in if reported else None,
            "output_tokens": used_out if reported else None,
            "usage": "cached" if free else ("reported" if reported else "estimated"),
        }

    def _scopes_of(self, key: ClientKey, model: Optional[str]) -> "Scopes":
        """The buckets a request of ``key`` on ``model`` is admitted by, whether any
        counts tokens, and the (scope, limits) Redis decides on with the shared
        backend; kept per (key, model) until the keys file is reloaded."""
        named: List[Tuple[str, Limits]] = []
        if key.limits.any:
            named.append((f"k:{key.name}", key.limits))
        tenant_limits = self.table.tenants.get(key.tenant)
        if tenant_limits is not None and tenant_limits.any:
            named.append((f"t:{key.tenant}", tenant_limits))
        on_model = key.limits_on(model)
        if on_model is not None and on_model[1].any:
            named.append((f"m:{key.name}:{on_model[0]}", on_model[1]))
        # With the shared backend, this process's own buckets are the fallback, at its share.
        local = self._share_of if self.shared is not None else _whole
        buckets = [self.limiter.bucket(scope, local(limits)) for scope, limits in named]
        shared = ScopeSet(named) if self.shared is not None else None
        scopes = (buckets, any(limits.tpm is not None for _, limits in named), shared)
        # Bounded: the model is the client's string (a key allowed every model may send
        # any); past the cap the memo starts over rather than grow.
        if len(self._scopes) >= MAX_SCOPE_MEMO:
            self._scopes.clear()
        self._scopes[(key.name, model)] = scopes
        return scopes

    def _share_of(self, limits: Limits) -> Limits:
        """``limits`` scaled to this process's share (each cap at least 1)."""
        scaled = self._shares.get(limits)
        if scaled is None:
            share = self.local_share

            def part(cap: Optional[int]) -> Optional[int]:
                return None if cap is None else max(1, int(cap * share))

            scaled = self._shares[limits] = Limits(part(limits.rpm), part(limits.tpm), part(limits.max_parallel))
        return scaled

    def snapshot(self) -> Dict[str, Any]:
        """The metrics' and admin /usage's numbers (the supervisor sums its workers')."""
        return dict(self.stats.snapshot(), in_flight=self.limiter.in_flight())


Scopes = Tuple[List[gcra.Bucket], bool, Optional[ScopeSet]]


def _whole(limits: Limits) -> Limits:
    return limits


_REQUESTS_FIELDS = (b"x-ratelimit-limit-requests", b"x-ratelimit-remaining-requests", b"x-ratelimit-reset-requests")
_TOKENS_FIELDS = (b"x-ratelimit-limit-tokens", b"x-ratelimit-remaining-tokens", b"x-ratelimit-reset-tokens")


def limit_headers(bucket: gcra.Bucket, now: float) -> List[Header]:
    """OpenAI's x-ratelimit-* fields of one scope (RFC-less, as OpenAI sends them). Runs
    on every admitted request: integers only, no call per field."""
    limits = bucket.limits
    out: List[Header] = []
    for cap, tat, names in (
        (limits.rpm, bucket.tat_requests, _REQUESTS_FIELDS),
        (limits.tpm, bucket.tat_tokens, _TOKENS_FIELDS),
    ):
        if cap is None:
            continue
        ahead = tat - now
        if ahead > 0:
            out += [
                (names[0], b"%d" % cap),
                (names[1], b"%d" % gcra.left_of(cap, ahead)),
                (names[2], gcra.duration_bytes(ahead)),
            ]
        else:  # idle: the whole cap, now
            capped = b"%d" % cap
            out += [(names[0], capped), (names[1], capped), (names[2], b"0ms")]
    return out


def _refusal_message(key: ClientKey, refusal: "gcra.Refusal | SharedRefusal") -> str:
    scope = refusal.scope
    if scope.startswith("t:"):
        whose = f"the tenant {key.tenant!r}"
    elif scope.startswith("m:"):
        whose = f"the API key {key.name!r} on this model"
    else:
        whose = f"the API key {key.name!r}"
    limits = refusal.bucket.limits
    if refusal.reason == gcra.CONCURRENCY:
        what = f"{limits.max_parallel} requests in flight"
    elif refusal.reason == gcra.REQUESTS:
        what = f"{limits.rpm} requests per minute"
    else:
        what = f"{limits.tpm} tokens per minute"
    return f"rate limit reached for {whose}: {what}; retry after {refusal.retry_after:.3g} s"
