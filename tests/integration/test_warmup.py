"""The JIT warm-up: loopback traffic of its own through a throwaway proxy, then nothing left."""

from __future__ import annotations

import asyncio

from pyproxy._compat import IS_PYPY
from pyproxy.config import WARMUP_AUTO, ConfigError, _warmup
from pyproxy.warmup import CLIENTS, warm_up


async def test_relays_whole_rounds_and_leaves_nothing_running() -> None:
    before = asyncio.all_tasks()
    rounds, ok = await warm_up(0.05)
    assert rounds >= 1
    assert ok == rounds * CLIENTS * 3  # a GET, a JSON POST and an event stream per connection, all 200
    assert asyncio.all_tasks() == before  # the test's own (and its harness's), nothing of the warm-up


def test_auto_warms_pypy_only_and_bounds_are_checked() -> None:
    assert _warmup("auto") == WARMUP_AUTO == (2.0 if IS_PYPY else 0.0)
    assert _warmup("off") == _warmup("0") == _warmup("0.0") == 0.0 and _warmup("1.5") == 1.5
    for bad in ("61", "-1", "soon"):
        try:
            _warmup(bad)
        except ConfigError:
            continue
        raise AssertionError(f"--warmup {bad} accepted")
