"""``early_head_after``: a streaming request answered ``200 text/event-stream`` by
pyproxy itself when its upstream is slow to answer.

Load balancers with 30-60 s idle timeouts (AWS ALB, GCP, Cloudflare, nginx's
``proxy_read_timeout``) cut a request that has seen no response byte for that
long -- which a long prefill on a large model easily is. With
``early_head_after = S`` on a model or route, a request with ``"stream": true``
whose upstream has not sent its head after S seconds gets pyproxy's own head,
then ``: ping`` comments (``--sse-keepalive``, or every S seconds when that is
off) until the upstream answers. What it gives up, and the README says so:

* the real status code: once the 200 is out, an upstream failure can only be
  told inside the stream, as one ``data: {"error": {...}}`` event in OpenAI's
  shape (the ``openai`` clients raise it as an ``APIError``), then the end of
  the stream;
* the upstream's response headers (its rate-limit and request-id fields).

Failover is not lost: pings are not upstream bytes, so a retryable failure
before the upstream's head still goes to the next deployment as usual.

``EarlyHeadSink`` is one more response sink between the gateway and the
client connection; the pure part (whether a request gets one, the error event)
is in the functions below.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

from pyproxy._compat import json_dumps, json_loads

if TYPE_CHECKING:  # pragma: no cover
    import asyncio

    from pyproxy.errors import ProxyError
    from pyproxy.gateway.models import Target
    from pyproxy.server.protocol import ClientConnection

log = logging.getLogger("pyproxy.gateway")

Header = Tuple[bytes, bytes]

EARLY_HEADERS: Tuple[Header, ...] = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-pyproxy-early-head", b"1"),
)
# An upstream's error body is read up to this much, to relay its message.
MAX_ERROR_BODY = 64 * 1024

# The sink's states.
WAITING = 0  # nothing sent to the client yet: everything passes through
EARLY = 1  # pyproxy's head is out; the upstream has not answered
STREAMING = 2  # relaying the body of the upstream's 2xx event stream (its head dropped)
PASSTHROUGH = 3  # the upstream answered before the early head: relayed as it is
ERROR_BODY = 4  # the upstream answered non-2xx after the early head: reading its error
DONE = 5


def early_head_after(target: "Target", value: Any) -> Optional[float]:
    """The seconds after which this request gets an early head, or None: only a
    request with ``"stream": true`` on a model or route that sets it."""
    spec = target.spec
    if spec is None or spec.early_head_after is None:
        return None
    if type(value) is not dict or value.get("stream") is not True:
        return None
    return spec.early_head_after


def error_event(error: Any) -> bytes:
    """One SSE event carrying ``{"error": ...}`` (what OpenAI sends mid-stream)."""
    return b"data: " + json_dumps({"error": error}) + b"\n\n"


def upstream_error_event(status: int, body: bytes, truncated: bool) -> bytes:
    """The event for an upstream's non-2xx answer: its own ``error`` object when it
    sent one in OpenAI's shape, else one naming the status."""
    if not truncated:
        try:
            parsed = json_loads(body)
        except ValueError:
            parsed = None
        if type(parsed) is dict and type(parsed.get("error")) is dict:
            return error_event(parsed["error"])
    return error_event(
        {
            "message": f"the upstream answered {status} after pyproxy had started the stream",
            "type": "upstream_error",
            "param": None,
            "code": status,
        }
    )


def not_a_stream_event(content_type: bytes) -> bytes:
    shown = content_type.decode("latin-1")[:100] or "no content type"
    return error_event(
        {
            "message": f"the upstream answered the streaming request with {shown}, not an event stream",
            "type": "upstream_error",
            "param": None,
            "code": 502,
        }
    )


def proxy_error_event(exc: "ProxyError") -> bytes:
    return error_event({"message": exc.message, "type": exc.error_type, "param": None, "code": exc.code or exc.status})


class EarlyHeadSink:
    """A response sink in front of one client connection (see the module docstring).
    Until the early head goes out it passes everything through unchanged."""

    __slots__ = ("client", "every", "state", "status", "_timer", "_error", "_error_size", "_not_stream", "gateway")

    def __init__(self, client: "ClientConnection", after: float, every: float, gateway: Any) -> None:
        self.client = client
        self.every = every  # the pings' interval once the early head is out
        self.gateway = gateway  # counts early heads
        self.state = WAITING
        self.status = 0
        self._error: List[bytes] = []
        self._error_size = 0
        self._not_stream: Optional[bytes] = None  # a 2xx that is no event stream: its content type
        self._timer: Optional[asyncio.TimerHandle] = client.loop.call_later(after, self._send_early_head)

    # --- what the gateway and its exchanges read and set, the client's own ---------------

    @property
    def loop(self) -> "asyncio.AbstractEventLoop":
        return self.client.loop

    @property
    def exchange(self) -> Any:
        return self.client.exchange

    @exchange.setter
    def exchange(self, value: Any) -> None:
        self.client.exchange = value  # the client tells it of pauses and of leaving

    @property
    def task(self) -> Any:
        return self.client.task

    @task.setter
    def task(self, value: Any) -> None:
        self.client.task = value

    @property
    def gone(self) -> bool:
        return self.client.closed

    @property
    def _write_paused(self) -> bool:
        return self.client._write_paused

    @property
    def upstream_ttfb(self) -> float:
        return self.client.upstream_ttfb

    @upstream_ttfb.setter
    def upstream_ttfb(self, value: float) -> None:
        self.client.upstream_ttfb = value

    def note_upstream(self, name: str, attempts: int) -> None:
        self.client.note_upstream(name, attempts)

    # --- the early head ----------------------------------------------------------------

    def _send_early_head(self) -> None:
        self._timer = None
        client = self.client
        if self.state != WAITING or client.closed or client.response_started:
            return
        self.state = EARLY
        self.gateway.early_heads += 1
        client.start_response(200, b"OK", list(EARLY_HEADERS))
        client.ping_every(self.every)
        client.flush()

    def _cancel(self) -> None:
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()

    def _end_with(self, event: bytes) -> None:
        self.state = DONE
        client = self.client
        client.send_data(event)
        client.finish_response()

    # --- the sink interface ------------------------------------------------------------------

    def send_interim(self, status: int, reason: bytes, headers: List[Header]) -> None:
        if self.state == WAITING:
            self.client.send_interim(status, reason, headers)
        # after the early head a 1xx has nowhere to go: the final head is out

    def start_response(self, status: int, reason: bytes, headers: List[Header]) -> None:
        if self.state == WAITING:
            self._cancel()
            self.state = PASSTHROUGH
            self.client.start_response(status, reason, headers)
            return
        self.status = status
        if not 200 <= status < 300:
            self.state = ERROR_BODY
            log.warning("a stream answered early by pyproxy failed: the upstream answered %d", status)
            return
        content_type = b""
        for name, value in headers:
            if name == b"content-type":
                content_type = value
        if content_type.split(b";", 1)[0].strip().lower() != b"text/event-stream":
            self._not_stream = content_type
            self.state = ERROR_BODY
            log.warning("a stream answered early by pyproxy got no event stream from the upstream")
            return
        self.state = STREAMING  # the upstream's head is dropped: pyproxy's went out already

    def send_data(self, data: bytes) -> None:
        state = self.state
        if state == STREAMING or state == PASSTHROUGH:
            self.client.send_data(data)
        elif state == ERROR_BODY and self._error_size <= MAX_ERROR_BODY:
            self._error.append(data)
            self._error_size += len(data)

    def flush(self) -> None:
        self.client.flush()

    def finish_response(self) -> None:
        state = self.state
        if state == ERROR_BODY:
            self._end_with(self._error_event())
            return
        self.state = DONE
        self._cancel()
        self.client.finish_response()

    def _error_event(self) -> bytes:
        if self._not_stream is not None:
            return not_a_stream_event(self._not_stream)
        return upstream_error_event(self.status, b"".join(self._error), self._error_size > MAX_ERROR_BODY)

    def abort_truncated(self) -> None:
        state = self.state
        if state == ERROR_BODY:
            self._end_with(self._error_event())  # its error body broke off: the status says enough
            return
        self.state = DONE
        self._cancel()
        self.client.abort_truncated()  # a stream the upstream broke off looks broken off

    def abort_now(self) -> None:
        self.state = DONE
        self._cancel()
        self.client.abort_now()

    def send_error(self, exc: "ProxyError") -> None:
        if self.state == WAITING:
            self.state = DONE
            self._cancel()
            self.client.send_error(exc)
            return
        if self.state == EARLY:
            self._end_with(proxy_error_event(exc))
            return
        self.state = DONE
        self.client.send_error(exc)  # mid-body: the client truncates
