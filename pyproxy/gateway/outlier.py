"""Outlier detection, cooling after a 429, the retry budget and which failures are retried.

Pure functions of state and a clock reading, in the shape of Envoy's outlier
detection (consecutive failures eject for base x times ejected, capped; never
more than a share of a cluster ejected at once) and retry budget (retries at
most a fraction of the requests in flight).
"""

from __future__ import annotations

from typing import FrozenSet, Optional, Sequence

from pyproxy.gateway.state import UpstreamState
from pyproxy.http.dates import parse_http_date

CONSECUTIVE_FAILURES = 5
EJECTION_BASE = 30.0  # seconds, times the number of ejections so far
EJECTION_MAX = 300.0
# A 429 without a usable Retry-After cools its deployment this long.
DEFAULT_COOLDOWN = 5.0
MAX_COOLDOWN = 300.0
# Retries in flight may be at most this share of the requests in flight (Envoy's
# retry budget, budget_percent 20 %), but a few are always allowed (its
# min_retry_concurrency), so that a quiet gateway can still fail over.
RETRY_BUDGET = 0.2
MIN_RETRY_CONCURRENCY = 3

# Failure kinds, as attempts end.
CONNECT = "connect"  # refused, DNS, TLS, connect timeout, pool wait: nothing was sent
UNSENT = "unsent"  # a pooled connection died before the request was written
STATUS = "status"  # the upstream answered with a retryable status
TIMEOUT = "timeout"  # read timeout before the response head, request sent
RESET = "reset"  # connection lost after the request was written, before the head

# RFC 6585 §4 429, RFC 9110 §15.6.3-5 502/503/504, and 529 (Anthropic's "overloaded").
RETRY_STATUSES = frozenset({429, 502, 503, 504, 529})
OPT_IN_STATUSES = frozenset({500})


def retryable(kind: str, status: int, retry_on: FrozenSet[str]) -> bool:
    """May this failure, before any response byte reached the client, go to another
    deployment? Connect failures always; 429/502/503/504/529 always; a 500, a read
    timeout or a reset after the request was written only when the model opts in --
    the upstream may still be generating (and billing) the first attempt."""
    if kind == CONNECT or kind == UNSENT:
        return True
    if kind == STATUS:
        return status in RETRY_STATUSES or (status in OPT_IN_STATUSES and "500" in retry_on)
    if kind == TIMEOUT:
        return "timeout" in retry_on
    if kind == RESET:
        return "reset" in retry_on
    return False


def counts_as_failure(kind: str, status: int) -> bool:
    """For ejection: connect errors, resets, timeouts and 5xx. Never a 4xx (the
    client's fault, or a 429: the upstream is up and says so)."""
    if kind == STATUS:
        return status >= 500
    return True


def budget_allows(requests_in_flight: int, retries_in_flight: int) -> bool:
    return retries_in_flight < max(MIN_RETRY_CONCURRENCY, RETRY_BUDGET * requests_in_flight)


def record_success(state: UpstreamState) -> None:
    state.failures = 0


def may_eject(state: UpstreamState, groups: Sequence[Sequence[UpstreamState]], now: float) -> bool:
    """Ejecting ``state`` must leave at least half of every group it belongs to (each
    model's deployments, and all upstreams) not ejected."""
    for group in groups:
        if state not in group:
            continue
        ejected = sum(1 for s in group if s.ejected(now)) + 1
        if ejected * 2 > len(group):
            return False
    return True


def record_failure(
    state: UpstreamState, groups: Sequence[Sequence[UpstreamState]], now: float, error: str
) -> Optional[float]:
    """Count a failure; returns the ejection's length when this one ejects the upstream."""
    state.failures += 1
    state.recent_errors.append((now, error))
    if state.failures < CONSECUTIVE_FAILURES or state.ejected(now):
        return None
    if not may_eject(state, groups, now):
        return None
    state.times_ejected += 1
    length = min(EJECTION_BASE * state.times_ejected, EJECTION_MAX)
    state.ejected_until = now + length
    state.failures = 0
    state.ejections += 1
    return length


def end_ejection(state: UpstreamState) -> bool:
    """The active check passed: an ejected upstream comes back early. True if it was out."""
    was = state.ejected_until > 0.0
    state.ejected_until = 0.0
    state.failures = 0
    return was


def cool_down(state: UpstreamState, now: float, retry_after: Optional[float]) -> float:
    """A 429: the deployment gets nothing until its Retry-After (default 5 s)."""
    seconds = DEFAULT_COOLDOWN if retry_after is None else min(max(retry_after, 0.0), MAX_COOLDOWN)
    state.cooling_until = max(state.cooling_until, now + seconds)
    return seconds


def parse_retry_after(value: Optional[bytes], wall_now: float) -> Optional[float]:
    """RFC 9110 §10.2.3: delay-seconds or an HTTP-date; None if absent or invalid."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(int(text))
    when = parse_http_date(text, wall_now)
    if when is None:
        return None
    return max(0.0, when - wall_now)
