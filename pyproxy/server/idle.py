"""Deadlines that need no precision, of many connections, on one timer.

A keep-alive connection waiting for its next request must be closed after
--client-timeout, and a busy one looked at again that often, but closing it a
fraction of a second late harms nobody. One event-loop timer per connection costs
about 600 bytes on uvloop (the TimerHandle, its libuv timer, the bound method and
its arguments): a quarter of an idle connection's memory. So these deadlines are
kept in slots of ``tick`` seconds (a coarse timing wheel, as nginx's and HAProxy's
idle timers are a tree, not one OS timer each) under one loop timer, and a
connection costs a set entry. Deadlines that need precision -- a request head or
body that must arrive in time, an event stream's keep-alive ping -- keep a timer
of their own (see ClientConnection._check_deadlines).

A deadline is never met early: a slot fires once all of it is past, so at most
one tick late.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Protocol, Set

if TYPE_CHECKING:  # pragma: no cover
    import asyncio


class Swept(Protocol):
    sweep_slot: Optional[int]  # its slot in the sweeper, None: none

    def swept(self) -> None: ...


MAX_TICK = 1.0  # seconds


def tick_for(timeout: float) -> float:
    """A tick short enough for ``timeout``: at most a quarter of it late, and a second."""
    return min(MAX_TICK, timeout / 4)


class IdleSweeper:
    def __init__(self, loop: "asyncio.AbstractEventLoop", tick: float) -> None:
        self.loop = loop
        self.tick = tick
        self.slots: Dict[int, Set[Swept]] = {}  # slot n: due once n * tick has passed
        self._timer: Optional["asyncio.TimerHandle"] = None
        self._armed = 0  # the slot the timer fires for

    def __len__(self) -> int:
        return sum(len(s) for s in self.slots.values())

    def at(self, when: float, item: Swept) -> None:
        """Call ``item.swept()`` at loop time ``when``, or up to one tick later; a
        deadline set before is replaced."""
        slot = int(when / self.tick) + 1
        old = item.sweep_slot
        if old == slot:
            return
        if old is not None:
            self._drop(item, old)
        members = self.slots.get(slot)
        if members is None:
            members = self.slots[slot] = set()
        members.add(item)
        item.sweep_slot = slot
        if self._timer is None or slot < self._armed:
            self._arm(slot)

    def forget(self, item: Swept) -> None:
        slot = item.sweep_slot
        if slot is not None:
            item.sweep_slot = None
            self._drop(item, slot)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for members in self.slots.values():
            for item in members:
                item.sweep_slot = None
        self.slots.clear()

    def _drop(self, item: Swept, slot: int) -> None:
        members = self.slots.get(slot)
        if members is not None:
            members.discard(item)
            if not members:
                del self.slots[slot]

    def _arm(self, slot: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed = slot
        self._timer = self.loop.call_at(slot * self.tick, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        now = int(self.loop.time() / self.tick)
        for slot in sorted(s for s in self.slots if s <= now):
            for item in self.slots.pop(slot):
                item.sweep_slot = None
                item.swept()  # it may set a new deadline (a later slot)
        if self.slots:
            self._arm(max(min(self.slots), now + 1))
