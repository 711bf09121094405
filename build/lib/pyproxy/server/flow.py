"""Flow control: why reading from a transport is paused, and waiting for writes to drain.

Reading may be paused for several independent reasons at once (a full
request-body buffer, a pipelined request waiting its turn, a slow reader on
the other side). Each reason is a bit; reading resumes only when none is set,
so one reason clearing can never resume reading another still needs paused.
"""

from __future__ import annotations

import asyncio
from typing import Optional

BODY_BUFFER_FULL = 1
PIPELINE_WAIT = 2
PEER_SLOW = 4


class ReadGate:
    __slots__ = ("transport", "reasons")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.reasons = 0

    def pause(self, reason: int) -> None:
        if not self.reasons:
            try:
                self.transport.pause_reading()
            except (RuntimeError, AttributeError):  # closing transport
                pass
        self.reasons |= reason

    def resume(self, reason: int) -> None:
        if self.reasons & reason:
            self.reasons &= ~reason
            if not self.reasons and not self.transport.is_closing():
                try:
                    self.transport.resume_reading()
                except (RuntimeError, AttributeError):
                    pass


class WriteGate:
    """Tracks pause_writing/resume_writing and lets a coroutine wait for drain."""

    __slots__ = ("paused", "_waiter", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.paused = False
        self._waiter: Optional[asyncio.Future[None]] = None
        self._loop = loop

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def release_with(self, exc: BaseException) -> None:
        """connection_lost: nobody may wait forever to write to a dead socket."""
        waiter = self._waiter
        self._waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    async def drain(self) -> None:
        if not self.paused:
            return
        waiter = self._waiter
        if waiter is None:
            waiter = self._waiter = self._loop.create_future()
        await waiter
