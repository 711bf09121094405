"""Upstream reachability, checked in the background and cached; never on a request's path.

Every ``health_interval`` seconds one TCP connection is opened to the upstream
and closed again: "reachable" means the upstream accepts connections (a TLS or
HTTP-level check would make the health endpoint send traffic upstream).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Dict, Optional

from pyproxy.config import Upstream

log = logging.getLogger("pyproxy.health")


class BackgroundLoop:
    """A task run beside the proxy (``_run``), started once and stopped for sure."""

    _task: Optional["asyncio.Task[None]"]
    _stopping: Optional[asyncio.Event]

    def start(self) -> None:
        self._stopping = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(self._stopping))

    async def stop(self) -> None:
        if self._task is not None:
            # Cancelling alone is not enough: when the cancel meets a connect failing at
            # that moment, asyncio.wait_for (3.9-3.11) raises the connect's OSError
            # instead, the cancel is lost, and the loop would go on for ever. The event
            # ends the loop whichever way the check returns.
            assert self._stopping is not None
            self._stopping.set()
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self, stopping: asyncio.Event) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class UpstreamProbe(BackgroundLoop):
    def __init__(self, upstream: Upstream, interval: float, timeout: float) -> None:
        self.upstream = upstream
        self.interval = interval
        self.timeout = min(timeout, interval)
        self.reachable: Optional[bool] = None  # None: not checked yet
        self.error = ""
        self.checked_at = 0.0
        self._task: Optional["asyncio.Task[None]"] = None
        self._stopping: Optional[asyncio.Event] = None

    async def check_once(self) -> None:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(self.upstream.host, self.upstream.port), self.timeout
            )
        except (OSError, asyncio.TimeoutError) as exc:
            if self.reachable is not False:
                log.warning("upstream %s is not reachable: %s", self.upstream.origin, exc or type(exc).__name__)
            self.reachable, self.error = False, str(exc) or type(exc).__name__
        else:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass
            if self.reachable is False:
                log.info("upstream %s is reachable again", self.upstream.origin)
            self.reachable, self.error = True, ""
        self.checked_at = time.time()

    async def _run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            await self.check_once()
            try:
                await asyncio.wait_for(stopping.wait(), self.interval)
            except asyncio.TimeoutError:
                pass

    def state(self) -> Dict[str, Any]:
        return {
            "origin": self.upstream.origin,
            "reachable": self.reachable,
            "checked_seconds_ago": round(time.time() - self.checked_at, 1) if self.checked_at else None,
            "error": self.error or None,
        }
