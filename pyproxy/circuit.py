"""A circuit breaker for an optional shared service (Redis, for the cache and the limits).

The service is an optimisation, never a dependency of a request: a failure opens
the circuit for a backoff period (0.5 s doubling to 5 s) during which the
service is not asked at all, so a dead service costs requests nothing but the
first timeout; the first success afterwards closes it again. Each user logs its
own failures (one line when the circuit opens), through ``what`` and ``log``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

BACKOFF_MIN = 0.5
BACKOFF_MAX = 5.0


class Circuit:
    __slots__ = ("service", "log", "_clock", "_down_until", "_backoff", "failures", "on_open")

    def __init__(self, service: str, log: logging.Logger, clock: Callable[[], float], on_open: str) -> None:
        self.service = service  # "redis", in the log lines
        self.log = log
        self._clock = clock  # the loop's time
        self._down_until = 0.0
        self._backoff = BACKOFF_MIN
        self.failures = 0
        self.on_open = on_open  # what skipping the service means, for the log line

    @property
    def available(self) -> bool:
        return self._clock() >= self._down_until

    def failed(self, what: str, exc: BaseException) -> None:
        self.failures += 1
        if self.available:
            self.log.warning(
                "%s %s failed (%s); %s for %.1f s",
                self.service,
                what,
                type(exc).__name__ if isinstance(exc, asyncio.TimeoutError) or not str(exc) else exc,
                self.on_open,
                self._backoff,
            )
            self._down_until = self._clock() + self._backoff
            self._backoff = min(self._backoff * 2, BACKOFF_MAX)

    def succeeded(self) -> None:
        if self._backoff != BACKOFF_MIN:
            self.log.info("%s is answering again", self.service)
        self._backoff = BACKOFF_MIN
