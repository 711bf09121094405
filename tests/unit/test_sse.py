"""The SSE keep-alive's decisions and the early head's error events, without sockets."""

from __future__ import annotations

import json

import pytest

from pyproxy.config import ConfigError, build_settings
from pyproxy.errors import UpstreamTimeout
from pyproxy.gateway.config import Deployment, ModelSpec
from pyproxy.gateway.early_head import (
    early_head_after,
    not_a_stream_event,
    proxy_error_event,
    upstream_error_event,
)
from pyproxy.gateway.models import Target
from pyproxy.http.sse import STREAM_START, at_event_boundary, is_event_stream, keepalive_due, stream_tail


@pytest.mark.parametrize(
    "stream, between",
    [
        (b"", True),  # before the first event
        (b"data: a\n\n", True),
        (b"data: a\r\n\r\n", True),
        (b"data: a\r\r\n", True),  # CR ends the data line, CRLF the blank one
        (b"data: a\n\r\n", True),
        (b"data: a\r\n\n", True),
        (b"data: a\n", False),  # a line, no blank line yet
        (b"data: a", False),
        (b"data: a\r\n", False),
        (b"data: a\n\r", False),  # the CR may be half of a CRLF: wait for the LF
        (b"data: a\r\r", False),
        (b": ping\n", False),  # only after a blank line is a stream between events
    ],
)
def test_event_boundary(stream: bytes, between: bool) -> None:
    tail = STREAM_START
    # Fed one byte at a time and whole: the tail must not depend on how chunks fall.
    for i in range(len(stream)):
        tail = stream_tail(tail, stream[i : i + 1])
    assert at_event_boundary(tail) is between
    assert at_event_boundary(stream_tail(STREAM_START, stream)) is between


def test_keepalive_due_waits_for_silence_and_for_the_end_of_an_event() -> None:
    assert keepalive_due(10.0, 0.0, 15.0, b"\n\n") == (False, 15.0)
    assert keepalive_due(15.0, 0.0, 15.0, b"\n\n") == (True, 30.0)
    # Mid-event: no ping, look again one interval later.
    assert keepalive_due(15.0, 0.0, 15.0, b"a\n") == (False, 30.0)


@pytest.mark.parametrize(
    "value, stream",
    [
        (b"text/event-stream", True),
        (b"Text/Event-Stream; charset=utf-8", True),
        (b"text/plain", False),
        (b"application/json", False),
    ],
)
def test_is_event_stream(value: bytes, stream: bool) -> None:
    assert is_event_stream([(b"x-a", b"1"), (b"content-type", value)]) is stream
    assert is_event_stream([]) is False


def _target(after: object) -> Target:
    spec = ModelSpec("m", (Deployment("u"),), early_head_after=after)  # type: ignore[arg-type]
    return Target(spec.deployments, "m", spec)


def test_early_head_only_for_stream_true_where_configured() -> None:
    assert early_head_after(_target(2.0), {"model": "m", "stream": True}) == 2.0
    assert early_head_after(_target(2.0), {"model": "m", "stream": False}) is None
    assert early_head_after(_target(2.0), {"model": "m", "stream": "true"}) is None  # not JSON true
    assert early_head_after(_target(2.0), {"model": "m"}) is None
    assert early_head_after(_target(2.0), None) is None
    assert early_head_after(_target(None), {"model": "m", "stream": True}) is None
    assert early_head_after(Target((Deployment("u"),), None, None), {"stream": True}) is None


def _payload(event: bytes) -> object:
    assert event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n\n") == 1
    return json.loads(event[len(b"data: ") : -2])


def test_error_events_in_openai_shape() -> None:
    own = {"message": "too long", "type": "invalid_request_error", "param": None, "code": "context_length_exceeded"}
    assert _payload(upstream_error_event(400, json.dumps({"error": own}).encode(), False)) == {"error": own}
    for body, truncated in ((b"<html>bad gateway</html>", False), (b'{"error": "a string"}', False), (b"{", True)):
        payload = _payload(upstream_error_event(502, body, truncated))
        assert payload["error"]["code"] == 502 and "502" in payload["error"]["message"]  # type: ignore[index]
    payload = _payload(proxy_error_event(UpstreamTimeout("upstream sent nothing for 300 s")))
    assert payload == {
        "error": {"message": "upstream sent nothing for 300 s", "type": UpstreamTimeout.error_type, "param": None,
                  "code": UpstreamTimeout.status}
    }  # fmt: skip
    assert "application/json" in _payload(not_a_stream_event(b"application/json"))["error"]["message"]  # type: ignore[index]


@pytest.mark.parametrize("value, expected", [("15", 15.0), ("0.5", 0.5), ("off", None), ("OFF", None)])
def test_sse_keepalive_option(value: str, expected: object) -> None:
    settings = build_settings({"upstream": "http://127.0.0.1:1", "sse_keepalive": value}, {})
    assert settings.sse_keepalive == expected
    assert build_settings({"upstream": "http://127.0.0.1:1"}, {}).sse_keepalive == 15.0


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan"])
def test_sse_keepalive_bad_values(value: str) -> None:
    with pytest.raises(ConfigError, match="sse"):
        build_settings({"upstream": "http://127.0.0.1:1", "sse_keepalive": value}, {})
