"""The idle sweeper: deadlines without precision on one timer, never early."""

from __future__ import annotations

from typing import List, Optional

from pyproxy.server.idle import IdleSweeper, tick_for
from tests.support.manual_loop import ManualLoop


class Conn:
    def __init__(self, sweeper: IdleSweeper, loop: ManualLoop, again: Optional[float] = None) -> None:
        self.sweep_slot: Optional[int] = None
        self.fired: List[float] = []
        self.sweeper, self.loop, self.again = sweeper, loop, again

    def swept(self) -> None:
        self.fired.append(self.loop.now)
        if self.again is not None:  # as a connection still in use sets its next deadline
            self.sweeper.at(self.loop.now + self.again, self)


def test_deadlines_fire_never_early_and_at_most_one_tick_late() -> None:
    loop = ManualLoop()
    sweeper = IdleSweeper(loop, 0.5)  # type: ignore[arg-type]
    conns = [Conn(sweeper, loop) for _ in range(50)]
    deadlines = [1.0 + i * 0.173 for i in range(50)]
    for conn, when in zip(conns, deadlines):
        sweeper.at(when, conn)
    assert loop.live_timers() == 1  # one timer for all of them
    t = 0.0
    while t < 20:
        t += 0.01
        loop.advance(t)
    for conn, when in zip(conns, deadlines):
        assert len(conn.fired) == 1
        assert when <= conn.fired[0] <= when + 0.5 + 1e-9
    assert not sweeper.slots and loop.live_timers() == 0


def test_a_new_deadline_replaces_the_old_and_forget_drops_it() -> None:
    loop = ManualLoop()
    sweeper = IdleSweeper(loop, 0.25)  # type: ignore[arg-type]
    later, gone, earlier = Conn(sweeper, loop), Conn(sweeper, loop), Conn(sweeper, loop)
    sweeper.at(1.0, later)
    sweeper.at(5.0, later)  # it was active again: the later deadline stands alone
    sweeper.at(3.0, gone)
    sweeper.forget(gone)
    sweeper.at(9.0, earlier)
    sweeper.at(0.5, earlier)  # moved earlier: the timer is moved too
    loop.advance(0.8)
    assert earlier.fired and not later.fired
    loop.advance(4.9)
    assert not later.fired
    loop.advance(5.3)
    assert later.fired and not gone.fired and len(sweeper) == 0


def test_an_item_setting_its_next_deadline_from_its_sweep_keeps_one_entry() -> None:
    loop = ManualLoop()
    sweeper = IdleSweeper(loop, 0.1)  # type: ignore[arg-type]
    busy = Conn(sweeper, loop, again=1.0)
    sweeper.at(1.0, busy)
    loop.advance(10.05)
    assert len(busy.fired) >= 8  # about every second
    gaps = [b - a for a, b in zip(busy.fired, busy.fired[1:])]
    assert all(1.0 <= g <= 1.1 + 1e-9 for g in gaps)
    assert len(sweeper) == 1 and loop.live_timers() == 1
    sweeper.close()
    assert busy.sweep_slot is None and loop.live_timers() == 0


def test_the_tick_suits_the_timeout() -> None:
    assert tick_for(60.0) == 1.0
    assert tick_for(0.3) == 0.075
