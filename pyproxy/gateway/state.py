"""What the gateway knows about one upstream: load, latency, failures, ejection, cooling.

Plain data, changed by the outlier and balancer functions and by the relay's
callbacks; read by the admin ``/upstreams`` answer and the metrics.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Deque, Dict, Optional, Tuple


class UpstreamState:
    __slots__ = (
        "name",
        "max_connections",
        "in_flight",
        "ewma",
        "ewma_at",
        "failures",
        "ejected_until",
        "times_ejected",
        "cooling_until",
        "recent_errors",
        "requests",
        "attempts",
        "successes",
        "ejections",
        "checked_ok",
    )

    def __init__(self, name: str, max_connections: int) -> None:
        self.name = name
        self.max_connections = max_connections
        self.in_flight = 0  # attempts sent to it and not finished
        self.ewma = 0.0  # peak-EWMA of the time to first byte, seconds (0: nothing seen yet)
        self.ewma_at = 0.0  # when ewma was last updated (the decay is by elapsed time)
        self.failures = 0  # consecutive failures (connect errors, 5xx, timeouts, resets)
        self.ejected_until = 0.0
        self.times_ejected = 0  # the next ejection lasts this many times the base, plus one
        self.cooling_until = 0.0  # after a 429: its Retry-After
        self.recent_errors: Deque[Tuple[float, str]] = deque(maxlen=10)
        # counters for the metrics: by status, by attempt outcome
        self.requests: Dict[str, int] = {}
        self.attempts: Dict[str, int] = {}
        self.successes = 0  # attempts whose outcome was "success": an int on the hot path
        self.ejections = 0
        self.checked_ok: Optional[bool] = None  # the active check's last verdict

    def ejected(self, now: float) -> bool:
        return self.ejected_until > now

    def cooling(self, now: float) -> bool:
        return self.cooling_until > now

    def full(self) -> bool:
        return self.in_flight >= self.max_connections

    def up(self, now: float) -> bool:
        return not self.ejected(now) and self.checked_ok is not False

    def count(self, table: Dict[str, int], label: str) -> None:
        table[label] = table.get(label, 0) + 1

    def attempt_counts(self) -> Dict[str, int]:
        """Attempts by outcome (the metrics' ``outcome`` label)."""
        counts = dict(self.attempts)
        if self.successes:
            counts["success"] = counts.get("success", 0) + self.successes
        return counts

    def describe(self, now: float, wall_offset: float) -> Dict[str, Any]:
        """The admin view. ``wall_offset`` turns the monotonic times into epoch seconds."""
        if self.ejected(now):
            state: Dict[str, Any] = {"state": "ejected", "until": round(self.ejected_until + wall_offset, 3)}
        elif self.cooling(now):
            state = {"state": "cooling", "until": round(self.cooling_until + wall_offset, 3)}
        else:
            state = {"state": "up" if self.checked_ok is not False else "failing_check"}
        state.update(
            {
                "in_flight": self.in_flight,
                "latency_ewma_ms": round(self.ewma * 1000, 3),
                "consecutive_failures": self.failures,
                "times_ejected": self.ejections,
                "recent_errors": [{"at": round(t + wall_offset, 3), "error": e} for t, e in self.recent_errors],
            }
        )
        return state
