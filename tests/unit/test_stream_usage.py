"""stream_usage = "inject", its pure halves: the request's stream_options added with
every other byte kept, and the usage taken out of the answer's event stream, split
at any byte."""

from __future__ import annotations

import json
from typing import List

import pytest

from pyproxy.gateway.stream_usage import (
    UsageChunkStrip,
    inject_include_usage,
    top_level_value_span,
    wants_injection,
)

CHAT = b"/v1/chat/completions"


@pytest.mark.parametrize(
    "path, value, expected",
    [
        (CHAT, {"model": "m", "stream": True}, True),
        (CHAT + b"?x=1", {"model": "m", "stream": True}, True),
        (b"/v1/completions", {"model": "m", "stream": True}, True),
        (CHAT, {"model": "m", "stream": True, "stream_options": {"include_usage": False}}, True),
        (CHAT, {"model": "m", "stream": True, "stream_options": None}, True),
        (CHAT, {"model": "m", "stream": True, "stream_options": {"include_usage": True}}, False),
        (CHAT, {"model": "m"}, False),
        (CHAT, {"model": "m", "stream": "true"}, False),
        (b"/v1/embeddings", {"model": "m", "stream": True}, False),
        (b"/v1/responses", {"model": "m", "stream": True}, False),
        (CHAT, [1, 2], False),
    ],
)
def test_which_requests_are_injected(path: bytes, value: object, expected: bool) -> None:
    assert wants_injection(path, value) is expected


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "m", "stream": true}',
        b'{"model":"m","stream":true,"messages":[{"role":"user","content":"} \\"stream_options\\": {"}]}\n',
        b'  {"stream": true, "model": "m"}  \r\n',
        b'{"model": "m", "stream": true, "stream_options": {"include_usage": false, "x": [1, {"y": 2}]}, "n": 1}',
        b'{"model": "m", "stream_options": null, "stream": true}',
        b'{"model": "m", "stream": true, "meta": {"stream_options": 5}, "stream_options" : {}}',
        b'{"model": "m", "stream": true, "stream_\\u006fptions": {"include_usage": false}}',
    ],
)
def test_injection_changes_stream_options_only(body: bytes) -> None:
    value = json.loads(body)
    out = inject_include_usage(body, value)
    sent = json.loads(out)
    assert sent["stream_options"]["include_usage"] is True
    expected = dict(value)
    expected["stream_options"] = dict(value.get("stream_options") or {}, include_usage=True)
    assert sent == expected
    # Every byte outside the stream_options member is the client's.
    span = top_level_value_span(body, "stream_options")
    if span is None:
        assert out.startswith(body.rstrip()[:-1]) and out.endswith(body[len(body.rstrip()) - 1 :])
    else:
        assert out.startswith(body[: span[0]]) and out.endswith(body[span[1] :])


def test_value_span_of_a_top_level_member_only() -> None:
    body = b'{"a": {"b": 1}, "b" : [1, "x"] , "c": null}'
    assert body[slice(*top_level_value_span(body, "b"))] == b'[1, "x"]'  # type: ignore[misc]
    assert body[slice(*top_level_value_span(body, "c"))] == b"null"  # type: ignore[misc]
    assert body[slice(*top_level_value_span(body, "a"))] == b'{"b": 1}'  # type: ignore[misc]
    assert top_level_value_span(body, "d") is None


def openai_stream(include_usage: bool, spaced: bool = False) -> bytes:
    """What an OpenAI-compatible API streams, with and without include_usage (the
    null usage member in every chunk, and the extra chunk before [DONE])."""
    separators = (", ", ": ") if spaced else (",", ":")
    out = []
    for i, word in enumerate(["Hel", "lo", ' \\"usage\\": null, ', "!"]):
        chunk = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": word}}]}
        if include_usage:
            chunk["usage"] = None
        if i == 0 and include_usage:  # the member first, for the other pattern
            chunk = {"usage": None, **{k: v for k, v in chunk.items() if k != "usage"}}
        out.append(b"data: " + json.dumps(chunk, separators=separators).encode() + b"\n\n")
    if include_usage:
        usage = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
        final = {"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": usage}
        out.append(b"data: " + json.dumps(final, separators=separators).encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


@pytest.mark.parametrize("spaced", [False, True])
@pytest.mark.parametrize("step", [1, 3, 7, 64, 100000])
def test_the_stream_comes_out_as_without_include_usage(spaced: bool, step: int) -> None:
    taken: List[bytes] = []
    strip = UsageChunkStrip(taken.append)
    sent = openai_stream(True, spaced)
    out = b"".join(strip.feed(sent[i : i + step]) for i in range(0, len(sent), step)) + strip.finish()
    assert out == openai_stream(False, spaced)
    assert len(taken) == 1 and json.loads(taken[0][6:])["usage"]["total_tokens"] == 13


def test_events_are_held_only_until_they_end_and_crlf_streams_too() -> None:
    strip = UsageChunkStrip(lambda event: None)
    assert strip.feed(b'data: {"choices":[{"delta":{}}],') == b""
    assert strip.feed(b'"usage":null}\r\n\r\ndata: {"x"') == b'data: {"choices":[{"delta":{}}]}\r\n\r\n'
    assert strip.feed(b":1}\r\n\r\n") == b'data: {"x":1}\r\n\r\n'
    assert strip.finish() == b""


def test_an_event_too_long_to_be_ours_passes_unread() -> None:
    strip = UsageChunkStrip(lambda event: None)
    big = b"data: " + b"x" * (300 * 1024)
    assert strip.feed(big) == big
    assert strip.feed(b"\n\n") == b"\n\n"
