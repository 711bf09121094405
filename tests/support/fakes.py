"""Fake transports for sans-socket tests of the protocols and the pool."""

from __future__ import annotations

import asyncio
from typing import Any, List, Optional


class FakeTransport(asyncio.Transport):
    def __init__(self, protocol: Optional[asyncio.BaseProtocol] = None) -> None:
        super().__init__()
        self.protocol = protocol
        self.written: List[bytes] = []
        self.closing = False
        self.aborted = False
        self.reading = True

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    @property
    def data(self) -> bytes:
        return b"".join(self.written)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            if self.protocol is not None:
                asyncio.get_event_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return ("127.0.0.1", 50000)
        return default

    def get_write_buffer_size(self) -> int:
        return 0


class FakeClock:
    """A wall clock the test moves by hand, so cache ages need no sleeping."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
