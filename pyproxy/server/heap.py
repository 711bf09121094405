"""Give freed heap memory back to the OS once a burst of connections has passed.

What a burst of connections leaves behind is mostly freed memory the allocator keeps:
glibc returns a heap's top to the OS on free, but not free pages below a live chunk,
so after 10,000 connections were opened (each with its transient read buffers,
futures and handshake objects, on PyPy its GC's large objects too) the process's
resident memory stays at the burst's peak for as long as it lives. Measured on a
bare asyncio server under PyPy: 5.3 KiB of resident memory per idle connection
after the burst, 3.7 KiB once ``malloc_trim(0)`` had handed back the free pages
(PyPy's GC itself holds about 1 KiB per connection live). Envoy's ``shrink_heap``
overload action does the same with tcmalloc.

So once a second a :class:`HeapReleaser` looks at how many connections opened and
closed: after at least ``burst`` of them since the last release, on the first
second that is quiet (under a tenth of ``burst`` opened or closed), it calls glibc's
``malloc_trim(0)`` -- a few milliseconds on a heap of 100 MiB, paid once per burst,
never under steady load (100 connections a second or more never go quiet) nor on
an idle process.
Where the C library has no ``malloc_trim`` (musl, macOS) it does nothing.

The decision is :func:`release_due`, a pure function; the releaser only counts and acts.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:  # pragma: no cover
    import asyncio

log = logging.getLogger("pyproxy")

BURST = 1000  # connections opened or closed since the last release
INTERVAL = 1.0  # seconds between looks


def release_due(since_release: int, last_interval: int, burst: int = BURST) -> bool:
    """After at least ``burst`` connections opened or closed since the last release,
    the first interval in which under a tenth of ``burst`` did (the burst is over).
    Churn of a tenth of ``burst`` a second or more never releases: the memory is
    in use again at once; a trickle releases at most every ``burst`` connections."""
    return since_release >= burst and last_interval * 10 < burst


def find_malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError, ImportError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


_malloc_trim: Optional[Callable[[int], int]] = None
_looked_up = False


def trim_heap() -> bool:
    """``malloc_trim(0)``: the heap's free pages back to the OS; False where there is
    no such call. ctypes is loaded at the first call, not at start-up."""
    global _malloc_trim, _looked_up
    if not _looked_up:
        _looked_up = True
        _malloc_trim = find_malloc_trim()
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


class HeapReleaser:
    def __init__(
        self,
        loop: "asyncio.AbstractEventLoop",
        trim: Callable[[], bool] = trim_heap,
        interval: float = INTERVAL,
        burst: int = BURST,
    ) -> None:
        self.loop = loop
        self.interval = interval
        self.burst = burst
        self.churn = 0  # connections opened or closed: the protocol's one cost is this increment
        self.releases = 0
        self._trim = trim
        self._seen = 0  # churn at the last look
        self._released_at = 0  # churn at the last release
        self._timer: Optional["asyncio.TimerHandle"] = None

    @property
    def started(self) -> bool:
        return self._timer is not None

    def start(self) -> None:
        if self._timer is None:
            self._timer = self.loop.call_at(self.loop.time() + self.interval, self._look)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _look(self) -> None:
        self._timer = self.loop.call_at(self.loop.time() + self.interval, self._look)
        churn = self.churn
        last_interval = churn - self._seen
        self._seen = churn
        if release_due(churn - self._released_at, last_interval, self.burst):
            self._released_at = churn
            self.release()

    def release(self) -> None:
        started = time.perf_counter()
        if not self._trim():
            return
        self.releases += 1
        log.debug("heap: free memory returned to the OS in %.1f ms", (time.perf_counter() - started) * 1000)
