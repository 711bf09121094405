"""The response sink: what a layer writes a response to.

A client connection is one; a coalesced fetch (which fans the response out to
its subscribers) is another; the gateway's attempts write to either. Layers
below the client side -- the cache, the coalescer, the gateway -- know only
this interface, never ``server/protocol.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional, Tuple

if TYPE_CHECKING:  # pragma: no cover
    import asyncio
    from typing import Protocol

    from pyproxy.errors import ProxyError

    Header = Tuple[bytes, bytes]

    class ResponseSink(Protocol):
        loop: asyncio.AbstractEventLoop
        exchange: Any  # what feeds this sink now (told client_gone when the sink goes away)
        task: Optional["asyncio.Task[None]"]  # the request's task, if it has one

        @property
        def gone(self) -> bool:
            """Nobody will read this response any more."""

        def send_interim(self, status: int, reason: bytes, headers: List[Header]) -> None:
            """A 1xx before the final response (RFC 9110 §15.2)."""

        def start_response(self, status: int, reason: bytes, headers: List[Header]) -> None: ...

        def send_data(self, data: bytes) -> None: ...

        def flush(self) -> None: ...

        def finish_response(self) -> None: ...

        def abort_truncated(self) -> None:
            """The upstream broke off: the response must look truncated."""

        def abort_now(self) -> None:
            """Close at once (a client that stopped reading)."""

        def send_error(self, exc: ProxyError) -> None:
            """Answer with pyproxy's own error response (nothing was sent yet)."""

        def note_upstream(self, name: str, attempts: int) -> None:
            """Which gateway upstream answered, after how many attempts (access log)."""


class ClientGone(Exception):
    """The client disconnected; nobody is left to answer."""


def abandon(owner: Any) -> None:
    """Nobody will read this response: tell the upstream side (it closes the
    connection, so an LLM stops generating) and cancel the request's task.
    ``owner``: a client connection, or a coalesced fetch."""
    exchange = owner.exchange
    owner.exchange = None
    if exchange is not None:
        exchange.client_gone()
    task = owner.task
    owner.task = None
    if task is not None and not task.done():
        task.cancel()
