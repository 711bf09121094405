"""The request body on its way from the client to the upstream.

The client protocol feeds chunks in as h11 yields them; the handler reads them
out and writes them upstream. The buffer between the two is bounded: above
HIGH_WATER the client socket stops being read (a slow upstream slows the
client), below LOW_WATER it is read again.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Callable, Deque, List, Optional

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


class RequestBody:
    __slots__ = (
        "_loop",
        "_chunks",
        "_buffered",
        "received",
        "complete",
        "_error",
        "_waiter",
        "_on_full",
        "_on_drained",
        "started",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_full: Callable[[], None],
        on_drained: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._chunks: Deque[bytes] = deque()
        self._buffered = 0
        self.received = 0
        self.complete = False
        self._error: Optional[BaseException] = None
        self._waiter: Optional[asyncio.Future[None]] = None
        self._on_full = on_full
        self._on_drained = on_drained
        self.started = False  # the first body event (data, end or error) arrived

    # --- producer side (client protocol) ------------------------------------------

    def feed(self, data: bytes) -> None:
        self.started = True
        self.received += len(data)
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER:
            self._on_full()
        self._wake()

    def feed_eof(self) -> None:
        self.started = True
        self.complete = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        """The body can never complete (bad chunk, too large, client gone)."""
        self.started = True
        if self._error is None:
            self._error = exc
        self._wake()

    def interrupt(self, exc: BaseException) -> None:
        """Wake a reader blocked on the body with ``exc`` without failing the body."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._waiter = None
            waiter.set_exception(exc)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # --- consumer side (handler) ----------------------------------------------------

    async def _wait(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            if self._waiter is waiter:
                self._waiter = None

    async def wait_started(self) -> None:
        """Wait for the first body event, so a body malformed from its first byte
        is rejected before anything is sent upstream."""
        while not self.started:
            await self._wait()
        if self._error is not None:
            raise self._error

    @property
    def error(self) -> Optional[BaseException]:
        return self._error

    def take_buffered(self) -> List[bytes]:
        """Everything buffered now, without waiting (the body may be complete)."""
        if self._error is not None:
            raise self._error
        chunks = list(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        self._on_drained()
        return chunks

    async def read(self) -> Optional[List[bytes]]:
        """Every chunk buffered so far (at least one), or None at the end of the body."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self.complete:
                return None
            await self._wait()
        if self._error is not None:
            raise self._error
        chunks = list(self._chunks)
        self._chunks.clear()
        was_full = self._buffered > LOW_WATER
        self._buffered = 0
        if was_full:
            self._on_drained()
        return chunks
