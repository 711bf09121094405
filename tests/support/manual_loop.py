"""An event loop's clock and timers only, advanced by hand: timer logic tested
without sleeping."""

from __future__ import annotations

import heapq
from typing import Callable, List, Tuple


class Handle:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualLoop:
    """time() and call_at() only; advance() runs what is due, in order."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: List[Tuple[float, int, Handle]] = []
        self._seq = 0

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> Handle:
        handle = Handle(when, callback)
        self._seq += 1
        heapq.heappush(self.timers, (when, self._seq, handle))
        return handle

    def live_timers(self) -> int:
        return sum(1 for _, _, h in self.timers if not h.cancelled)

    def advance(self, to: float) -> None:
        while self.timers and self.timers[0][0] <= to:
            when, _, handle = heapq.heappop(self.timers)
            if not handle.cancelled:
                self.now = max(self.now, when)
                handle.callback()
        self.now = to
