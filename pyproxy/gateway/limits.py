"""Rate limits on requests, tokens and concurrency: pure functions of state and a clock.

Requests per minute and tokens per minute are GCRA (the generic cell rate
algorithm, ITU-T I.371; what Redis-cell and Stripe's limiters use): a scope
keeps one number, its *theoretical arrival time* ``tat``. Each request moves it
forward by its cost times the emission interval (60 s / limit); a request is
admitted while ``tat`` stays within one minute of now. That is a sliding
window, exact and smooth: a full minute's worth may come at once, and then
one more every 60/rpm seconds, never a fixed window's double burst at the
minute's edge.

Tokens are not known until the response ends, so admission *reserves* an
estimate and ``reconcile`` moves the scope's ``tat`` by the difference to the
real usage -- back (a refund) or forward (a charge, which may push the scope
over its limit: later requests wait until it has drained).

An admission checks every scope of the request (key, tenant, key on model)
first and changes any of them only if all admit it (decide, then act), so a
request refused by its tenant costs its key nothing.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

from pyproxy.gateway.keys import Limits

WINDOW = 60.0  # seconds: the "per minute" of rpm and tpm

REQUESTS = "requests"
TOKENS = "tokens"
CONCURRENCY = "concurrency"


class Bucket:
    """The state of one scope, and its caps as admission reads them (set with
    ``limits``: the emission intervals divided out once, not per request)."""

    __slots__ = ("scope", "limits", "tat_requests", "tat_tokens", "in_flight", "request_step", "token_step", "parallel")

    def __init__(self, scope: str, limits: Limits) -> None:
        self.scope = scope
        self.tat_requests = 0.0
        self.tat_tokens = 0.0
        self.in_flight = 0
        self.set_limits(limits)

    def set_limits(self, limits: Limits) -> None:
        self.limits = limits
        self.request_step = _interval(limits.rpm) if limits.rpm is not None else 0.0  # 0.0: uncapped
        self.token_step = _interval(limits.tpm) if limits.tpm is not None else 0.0
        self.parallel = limits.max_parallel  # None: uncapped


class Refusal:
    """Why a request was not admitted, and when it may be."""

    __slots__ = ("scope", "reason", "retry_after", "bucket")

    def __init__(self, scope: str, reason: str, retry_after: float, bucket: Bucket) -> None:
        self.scope = scope
        self.reason = reason  # REQUESTS, TOKENS or CONCURRENCY
        self.retry_after = retry_after  # seconds
        self.bucket = bucket


class Ticket:
    """An admitted request's hold on its scopes: one in-flight slot (where counted)
    and its token reservation, given back by ``release`` and ``reconcile``."""

    __slots__ = ("buckets", "reserved", "released", "settled")

    def __init__(self, buckets: Sequence[Bucket], reserved: int) -> None:
        self.buckets = buckets
        self.reserved = reserved
        self.released = False
        self.settled = False


def _interval(limit: int) -> float:
    return WINDOW / limit


def admit(buckets: Sequence[Bucket], cost: int, now: float) -> "Ticket | Refusal":
    """Decide over every scope, then act on all of them or none. (One function, the
    check and the act written out: it runs on every admitted request, and a call
    costs more than these lines on CPython.)"""
    for bucket in buckets:
        parallel = bucket.parallel
        if parallel is not None and bucket.in_flight >= parallel:
            # When a slot frees is not known; a second is the usual answer (OpenAI's too).
            return Refusal(bucket.scope, CONCURRENCY, 1.0, bucket)
        step = bucket.request_step
        if step:
            tat = bucket.tat_requests
            ahead = (tat if tat > now else now) + step - now
            if ahead > WINDOW + 1e-9:
                return Refusal(bucket.scope, REQUESTS, ahead - WINDOW, bucket)
        step = bucket.token_step
        if step and cost:
            # A reservation larger than the whole minute's budget would never pass: it
            # is admitted once the scope is idle, and its real usage charged afterwards.
            tpm: int = bucket.limits.tpm  # type: ignore[assignment]
            tat = bucket.tat_tokens
            ahead = (tat if tat > now else now) + (cost if cost < tpm else tpm) * step - now
            if ahead > WINDOW + 1e-9:
                return Refusal(bucket.scope, TOKENS, ahead - WINDOW, bucket)
    for bucket in buckets:
        if bucket.parallel is not None:
            bucket.in_flight += 1
        step = bucket.request_step
        if step:
            tat = bucket.tat_requests
            bucket.tat_requests = (tat if tat > now else now) + step
        step = bucket.token_step
        if step and cost:
            tpm = bucket.limits.tpm  # type: ignore[assignment]
            tat = bucket.tat_tokens
            bucket.tat_tokens = (tat if tat > now else now) + (cost if cost < tpm else tpm) * step
    return Ticket(buckets, cost)


def release(ticket: Ticket) -> None:
    """The request ended, however it ended: its in-flight slots are free. Idempotent."""
    if ticket.released:
        return
    ticket.released = True
    for bucket in ticket.buckets:
        if bucket.parallel is not None and bucket.in_flight > 0:
            bucket.in_flight -= 1


def reconcile(ticket: Ticket, used: int, now: float) -> None:
    """Replace the token reservation by the real usage: refund or charge the
    difference. Once per ticket."""
    if ticket.settled:
        return
    ticket.settled = True
    for bucket in ticket.buckets:
        step = bucket.token_step
        if not step:
            continue
        reserved = min(ticket.reserved, bucket.limits.tpm)  # type: ignore[type-var]
        delta = (used - reserved) * step
        # A refund never gives back more than the time still ahead: tokens spent
        # before the bucket had drained are not returned twice.
        bucket.tat_tokens = max(bucket.tat_tokens + delta, now) if delta < 0 else bucket.tat_tokens + delta


def remaining(bucket: Bucket, now: float) -> Tuple[Optional[int], Optional[int]]:
    """(requests, tokens) the scope would admit now, None where uncapped."""
    limits = bucket.limits
    requests = None if limits.rpm is None else left_of(limits.rpm, bucket.tat_requests - now)
    tokens = None if limits.tpm is None else left_of(limits.tpm, bucket.tat_tokens - now)
    return requests, tokens


def left_of(cap: int, ahead: float) -> int:
    """What a cap admits now when its scope's tat is ``ahead`` seconds ahead of now:
    (WINDOW - ahead) / interval, floored (int() truncates, which floors what is
    positive; what is not ends at 0 either way)."""
    if ahead <= 0:
        return cap
    left = int((WINDOW - ahead) * cap / WINDOW + 1e-9)
    return 0 if left < 0 else (cap if left > cap else left)


def duration_bytes(seconds: float) -> bytes:
    """OpenAI's reset format: ``1s``, ``6m0s``, ``20ms``; formatted from integers (float
    formatting costs a microsecond, and this runs on every admitted request)."""
    if seconds < 1:
        ms = int(seconds * 1000)
        if ms < seconds * 1000:
            ms += 1  # ceil: never say it resets before it does
        return b"%dms" % (ms if ms > 0 else 0)
    if seconds < 60:
        whole, frac = divmod(int(round(seconds * 1000)), 1000)
        if not frac:
            return b"%ds" % whole
        return (b"%d.%03d" % (whole, frac)).rstrip(b"0") + b"s"
    total = int(seconds)
    if total < seconds:
        total += 1
    minutes, rest = divmod(total, 60)
    return b"%dm%ds" % (minutes, rest)


def estimate_tokens(body_bytes: int, value: object, cap: int) -> int:
    """The tokens a request reserves at admission: its prompt bytes / 4 (about four
    bytes a token for English text in the BPE tokenizers), plus the completion it
    asks for at most (``max_tokens`` / ``max_completion_tokens`` /
    ``max_output_tokens``), capped by ``cap`` (tpm_reserve_max)."""
    estimate = body_bytes // 4
    if type(value) is dict:
        for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
            asked = value.get(name)
            if type(asked) is int and asked > 0:
                estimate += asked
                break
    return max(1, min(estimate, cap))


class Limiter:
    """The buckets of one process, by scope. Bounded: scopes are configured keys,
    tenants and (key, model glob) pairs; a reload drops the ones gone and idle."""

    def __init__(self) -> None:
        self.buckets: Dict[str, Bucket] = {}

    def bucket(self, scope: str, limits: Limits) -> Bucket:
        bucket = self.buckets.get(scope)
        if bucket is None:
            bucket = self.buckets[scope] = Bucket(scope, limits)
        elif bucket.limits is not limits:
            bucket.set_limits(limits)  # edited in the keys file: the new caps, the state kept
        return bucket

    def prune(self, live: Sequence[str]) -> None:
        keep = set(live)
        for scope in [s for s, b in self.buckets.items() if s not in keep and b.in_flight == 0]:
            del self.buckets[scope]

    def in_flight(self) -> Dict[str, int]:
        return {scope: b.in_flight for scope, b in self.buckets.items() if b.limits.max_parallel is not None}
