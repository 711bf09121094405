"""``stream_usage = "inject"``: usage for streamed chat requests that did not ask for it.

OpenAI-compatible APIs report a stream's token usage only when the request says
``"stream_options": {"include_usage": true}``; without it, usage accounting has
nothing but the estimate. For an upstream configured with ``stream_usage =
"inject"`` (off by default: some providers reject ``stream_options``), a streamed
chat or completions request that lacks it is sent with it, and the answer is
given back to the client as it would have been without it:

* the extra chunk (``"choices": []`` with ``usage``) is taken out of the stream,
  its usage read for the key's accounting;
* the ``"usage": null`` member every other chunk then carries is taken out too
  (OpenAI documents it: "All other chunks will also include a usage field, but
  with a null value").

Pure: the request side rewrites bytes (only the ``stream_options`` member changes,
every other byte reaches the upstream as the client sent it); the response side is
a filter fed chunk by chunk. Events without the bytes ``"usage"`` pass untouched
at the cost of one substring search, and an event is held only until its end (a
client cannot use half an event anyway).
"""

from __future__ import annotations

import re
from typing import Any, Callable, List

from pyproxy._compat import json_dumps, json_loads
from pyproxy.gateway.models import top_level_value_span
from pyproxy.http.sse import events_end

# The APIs whose streams take stream_options.include_usage (OpenAI's chat
# completions and legacy completions; the Responses API reports usage always).
STREAMED_USAGE_PATHS = (b"/v1/chat/completions", b"/v1/completions")
INCLUDE_USAGE = b'"stream_options":{"include_usage":true}'
# An event longer than this is passed on as it is, unread (usage events are small).
MAX_EVENT = 256 * 1024

_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n")
# The "usage": null member of a chunk, with the comma that joins it to its neighbour.
# A key is a bare quoted token: inside a JSON string every quote is escaped, so the
# pattern cannot match text a model generated.
_NULL_AFTER = re.compile(rb',\s*"usage"\s*:\s*null(?=\s*[,}])')
_NULL_BEFORE = re.compile(rb'"usage"\s*:\s*null\s*,\s*')
_COMPACT_NULL = b',"usage":null'  # (followed by , or }: a key's value ends there)


def wants_injection(path: bytes, value: Any) -> bool:
    """Whether this request is a stream that would not report its usage: a chat (or
    completions) request with ``"stream": true`` and no ``include_usage: true``."""
    if type(value) is not dict or value.get("stream") is not True:
        return False
    cut = path.find(b"?")
    if (path if cut < 0 else path[:cut]) not in STREAMED_USAGE_PATHS:
        return False
    options = value.get("stream_options")
    return not (type(options) is dict and options.get("include_usage") is True)


def inject_include_usage(body: bytes, value: Any) -> bytes:
    """The body with ``stream_options.include_usage = true``; only that member
    changes. ``value``: the body parsed (a dict; see wants_injection)."""
    options = value.get("stream_options")
    span = top_level_value_span(body, "stream_options") if "stream_options" in value else None
    if span is not None:
        merged = dict(options) if type(options) is dict else {}
        merged["include_usage"] = True
        start, end = span
        return b"".join((body[:start], json_dumps(merged), body[end:]))
    end = body.rstrip().rfind(b"}")  # the top-level object's end (the body parses)
    return b"".join((body[:end], b"," if value else b"", INCLUDE_USAGE, body[end:]))


class UsageChunkStrip:
    """Takes the injected usage out of one event stream, chunk by chunk: ``feed``
    returns what the client gets now, ``finish`` what is left at the end. The usage
    event goes to ``on_usage`` (the key's usage meter) instead."""

    __slots__ = ("on_usage", "_tail")

    def __init__(self, on_usage: Callable[[bytes], None]) -> None:
        self.on_usage = on_usage
        self._tail = b""

    def feed(self, data: bytes) -> bytes:
        tail = self._tail
        if tail:
            data = tail + data
        end = events_end(data)
        if end < 0:  # no event has ended yet
            if len(data) > MAX_EVENT:  # not one of ours: pass it on unread
                self._tail = b""
                return data
            self._tail = data
            return b""
        self._tail = data[end:]
        if len(self._tail) > MAX_EVENT:
            end = len(data)
            self._tail = b""
        events = data[:end]
        if b'"usage"' not in events:
            return events
        return self._strip(events)

    def finish(self) -> bytes:
        tail, self._tail = self._tail, b""
        if b'"usage"' in tail:
            return self._strip(tail)
        return tail

    def _strip(self, events: bytes) -> bytes:
        out: List[bytes] = []
        start = 0
        for boundary in _BOUNDARY.finditer(events):
            self._one(events[start : boundary.end()], out)
            start = boundary.end()
        if start < len(events):
            self._one(events[start:], out)
        return b"".join(out)

    def _one(self, event: bytes, out: List[bytes]) -> None:
        if b'"usage"' not in event:
            out.append(event)
            return
        # Every chunk but the last says "usage": null: taken out by pattern, no parse
        # (OpenAI's compact form first, as a plain substring).
        if _COMPACT_NULL in event:
            out.append(event.replace(_COMPACT_NULL, b"", 1))
            return
        stripped, found = _NULL_AFTER.subn(b"", event, count=1)
        if not found:
            stripped, found = _NULL_BEFORE.subn(b"", event, count=1)
        if found:
            out.append(stripped)
        elif _is_usage_chunk(event):
            self.on_usage(event)
        else:
            out.append(event)


def _is_usage_chunk(event: bytes) -> bool:
    """OpenAI's extra chunk: ``"choices": []`` and a ``usage`` object."""
    lines = [line[5:] for line in event.replace(b"\r\n", b"\n").split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return False
    payload = b"\n".join(line[1:] if line.startswith(b" ") else line for line in lines)
    try:
        value = json_loads(payload)
    except ValueError:
        return False
    return type(value) is dict and value.get("choices") == [] and type(value.get("usage")) is dict
