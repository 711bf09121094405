"""The proxy's lifecycle: listen, track client connections, drain and stop."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Callable, Optional, Set

from pyproxy._compat import is_uvloop
from pyproxy.cache.layer import Cache
from pyproxy.config import Settings
from pyproxy.dedup import Coalescer
from pyproxy.handler import Handler
from pyproxy.server.protocol import BufferedClientConnection, ClientConnection
from pyproxy.upstream.pool import ConnectionPool

log = logging.getLogger("pyproxy")


class Proxy:
    def __init__(
        self,
        settings: Settings,
        loop: Optional[asyncio.AbstractEventLoop] = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock`` is the wall clock cache ages are measured by (tests pass a fake one)."""
        if settings.upstream is None:
            raise ValueError("settings.upstream is required")
        self.settings = settings
        self.loop = loop or asyncio.get_event_loop()
        self.pool = ConnectionPool(settings.upstream, settings, self.loop)
        self.cache: Optional[Cache] = Cache(settings, self.loop, clock) if settings.cache_enabled else None
        self.coalescer = Coalescer(settings.dedup_replay_bytes, settings.dedup_max_backlog)
        self.handler = Handler(settings, self.pool, self.cache, self.coalescer)
        self.connections: Set[ClientConnection] = set()
        self.draining = False
        self.stats_client_errors = 0
        self._server: Optional[asyncio.AbstractServer] = None
        # stdlib loop: read into a reused buffer (see ReusedBufferReads)
        self._protocol = ClientConnection if is_uvloop(self.loop) else BufferedClientConnection
        self._all_closed: Optional[asyncio.Event] = None

    async def start(self, sock: Optional[socket.socket] = None) -> None:
        if sock is not None:
            self._server = await self.loop.create_server(lambda: self._protocol(self), sock=sock, backlog=2048)
        else:
            host, port = self.settings.listen
            self._server = await self.loop.create_server(
                lambda: self._protocol(self), host, port, reuse_address=True, backlog=2048
            )

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return self._server.sockets[0].getsockname()[1]

    def connection_opened(self, conn: ClientConnection) -> None:
        self.connections.add(conn)

    def connection_closed(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()

    async def stop(self, drain_timeout: Optional[float] = None) -> None:
        """Stop accepting, let in-flight requests finish (up to the drain timeout), close."""
        if drain_timeout is None:
            drain_timeout = self.settings.drain_timeout
        self.draining = True
        if self._server is not None:
            self._server.close()
        # Logged only once the listening socket is closed: whoever reads this
        # line may rely on new connections being refused.
        log.info(
            "shutting down: stopped accepting; draining %d connection(s), up to %g s",
            len(self.connections),
            drain_timeout,
        )
        self._all_closed = asyncio.Event()
        for conn in list(self.connections):
            conn.begin_drain()
        if self.connections:
            try:
                await asyncio.wait_for(self._all_closed.wait(), drain_timeout)
            except asyncio.TimeoutError:
                log.warning("drain timeout: closing %d connection(s) with requests in flight", len(self.connections))
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        self.pool.close()
        if self.cache is not None:
            await self.cache.close()
        if self._server is not None:
            await self._server.wait_closed()
        # Let the transports' connection_lost callbacks run before the loop ends.
        await asyncio.sleep(0)
