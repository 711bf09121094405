"""Heap release after a burst of connections: when it is due, and that it returns memory."""

from __future__ import annotations

import ctypes
import platform
from typing import List

from pyproxy.server.heap import HeapReleaser, find_malloc_trim, release_due
from tests.support.manual_loop import ManualLoop


def test_due_after_a_burst_once_it_is_over() -> None:
    assert not release_due(999, 0, burst=1000)  # no burst yet
    assert not release_due(5000, 2000, burst=1000)  # the burst goes on
    assert not release_due(50_000, 100, burst=1000)  # steady churn of a tenth of a burst a second
    assert release_due(5000, 99, burst=1000)  # under a tenth of a burst in the last interval
    assert release_due(1000, 0, burst=1000)


def test_steady_churn_never_releases_and_a_quiet_process_releases_once() -> None:
    loop = ManualLoop()
    trims: List[int] = []
    heap = HeapReleaser(loop, trim=lambda: trims.append(0) or True, interval=1.0, burst=1000)  # type: ignore[arg-type]
    heap.start()
    for second in range(1, 31):  # 600 connections a second, for 30 s: steady load, no burst ending
        heap.churn += 600
        loop.advance(float(second))
    assert trims == []
    loop.advance(31.0)  # the load stops: the first quiet second releases
    assert trims == [0]
    for second in range(32, 60):  # and nothing more while nothing happens
        loop.advance(float(second))
    assert trims == [0]
    heap.churn += 10_000  # a burst of 10,000 within one second (say, all clients closing)
    loop.advance(60.0)
    assert trims == [0]  # still under way when looked at
    loop.advance(61.0)
    assert trims == [0, 0] and heap.releases == 2
    for second in range(62, 102):  # a trickle of 50 a second: a release per 1,000 of them
        heap.churn += 50
        loop.advance(float(second))
    assert trims == [0] * 4
    heap.stop()
    assert loop.live_timers() == 0


def test_where_there_is_no_malloc_trim_nothing_is_called() -> None:
    loop = ManualLoop()
    heap = HeapReleaser(loop, trim=lambda: False, interval=1.0, burst=1)  # type: ignore[arg-type]  # musl, macOS
    heap.start()
    heap.churn += 5
    loop.advance(2.0)
    assert heap.releases == 0


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def test_malloc_trim_gives_free_pages_below_live_chunks_back() -> None:
    trim = find_malloc_trim()
    if platform.libc_ver()[0] != "glibc":
        assert trim is None
        return
    assert trim is not None
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(4000) for _ in range(20_000)]  # 80 MB of small chunks, below mmap's threshold
    for block in blocks:
        ctypes.memset(block, 1, 4000)  # resident
    kept = blocks[::64]  # a live chunk every 256 KB: free() alone cannot shrink the heap
    for i, block in enumerate(blocks):
        if i % 64:
            libc.free(block)
    before = _rss()
    trim(0)
    after = _rss()
    for block in kept:
        libc.free(block)
    assert before - after > 40 * 2**20, (before, after)
