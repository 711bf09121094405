"""Token usage read from the responses passing through: pure, fed chunk by chunk.

Shapes read (the ``usage`` objects of):

* OpenAI chat completions, completions and embeddings: ``prompt_tokens``,
  ``completion_tokens``; the Responses API: ``input_tokens``, ``output_tokens``;
* Anthropic Messages: ``input_tokens`` plus ``cache_creation_input_tokens`` and
  ``cache_read_input_tokens`` (all of them are the prompt), ``output_tokens``;
* event streams: OpenAI's final chunk (``choices: []`` with ``usage``, when
  ``stream_options.include_usage`` was asked), the Responses API's
  ``response.completed``, Anthropic's ``message_start`` (input and cache tokens)
  and ``message_delta`` (output tokens, *cumulative*: each one replaces the last,
  never adds).

An event stream is scanned for the bytes ``usage`` only; the events that carry
them are parsed, the rest (every content delta) cost one substring search. A JSON
body is kept up to ``MAX_JSON_BODY`` and, at its end, its last ``usage`` object is
parsed alone (the whole body only if that cannot be isolated); beyond that size
(embeddings of many inputs) only its tail is kept, where every one of these APIs
puts ``usage``.
"""

from __future__ import annotations

from time import perf_counter
from typing import Any, List, Optional, Tuple

from pyproxy._compat import json_loads
from pyproxy.http.sse import events_end

MAX_JSON_BODY = 1024 * 1024
JSON_TAIL = 64 * 1024
# An event longer than this is not read for usage (usage events are a few hundred bytes).
MAX_EVENT = 256 * 1024

_JSON = 1
_SSE = 2


def tokens_of(usage: Any) -> Tuple[Optional[int], Optional[int]]:
    """(input, output) of one ``usage`` object, None where it says nothing."""
    if type(usage) is not dict:
        return None, None
    prompt = usage.get("prompt_tokens")
    if type(prompt) is not int:
        prompt = usage.get("input_tokens")
        if type(prompt) is int:
            for extra in ("cache_creation_input_tokens", "cache_read_input_tokens"):
                more = usage.get(extra)
                if type(more) is int:
                    prompt += more
        else:
            prompt = None
    output = usage.get("completion_tokens")
    if type(output) is not int:
        output = usage.get("output_tokens")
        if type(output) is not int:
            output = None
    return prompt, output


def _usage_in(value: Any) -> Any:
    """The ``usage`` object of a response body or of one stream event."""
    if type(value) is not dict:
        return None
    usage = value.get("usage")
    if usage is not None:
        return usage
    for inner in ("message", "response"):  # Anthropic message_start, Responses API events
        nested = value.get(inner)
        if type(nested) is dict and nested.get("usage") is not None:
            return nested["usage"]
    return None


def usage_member_at(body: bytes, at: int) -> Any:
    """The object of the ``"usage"`` at ``at`` (-1: none), if it is a member's name: a
    ``"usage"`` followed by ``:`` is one, as inside a JSON string its quotes would be
    escaped. The object ends at the first ``}`` that balances the braces; one in a
    string throws the count off, and the parse fails, never misreads."""
    if at < 0:
        return None
    start = body.find(b"{", at + 7)
    if start < 0 or body[at + 7 : start].strip() != b":":  # null, or not a member
        return None
    end = body.find(b"}", start)
    while end >= 0:
        part = body[start : end + 1]
        if part.count(b"{") == part.count(b"}"):
            try:
                return json_loads(part)
            except ValueError:
                return None
        end = body.find(b"}", end + 1)
    return None


class UsageMeter:
    """Reads one response's usage. ``start`` with its head, ``feed`` every body
    chunk, ``finish`` at its end; then ``input``/``output`` (None: not reported)."""

    __slots__ = ("kind", "input", "output", "first_at", "_parts", "_size", "_tail", "_overflow")

    def __init__(self) -> None:
        self.kind = 0  # 0: not read (an error, an encoded body, another type)
        self.input: Optional[int] = None
        self.output: Optional[int] = None
        self.first_at = 0.0  # perf_counter of the first body byte (time to first token)
        self._parts: List[bytes] = []
        self._size = 0
        self._tail = b""  # an event stream: the bytes after the last event boundary
        self._overflow = False

    @property
    def streamed(self) -> bool:
        return self.kind == _SSE

    @property
    def reported(self) -> bool:
        return self.input is not None or self.output is not None

    def start(self, status: int, headers: List[Tuple[bytes, bytes]]) -> bool:
        """Whether this response is read at all (a 2xx JSON or event stream, not
        content-encoded)."""
        if not 200 <= status < 300:
            return False
        content_type = b""
        for name, value in headers:
            if name == b"content-type":
                content_type = value.lower()
            elif name == b"content-encoding" and value.lower() != b"identity":
                return False
        if content_type.startswith(b"text/event-stream"):
            self.kind = _SSE
        elif b"json" in content_type:
            self.kind = _JSON
        return self.kind != 0

    def feed(self, data: bytes) -> None:
        if not self.first_at and data:
            self.first_at = perf_counter()
        if self.kind == _SSE:
            self._feed_events(data)
        elif self.kind == _JSON:
            self._size += len(data)
            self._parts.append(data)
            if self._size > MAX_JSON_BODY + JSON_TAIL:  # keep the tail only
                joined = b"".join(self._parts)
                self._parts = [joined[-JSON_TAIL:]]
                self._size = JSON_TAIL
                self._overflow = True

    def finish(self) -> None:
        if self.kind == _SSE:
            if self._tail:
                self._read_events(self._tail)
                self._tail = b""
        elif self.kind == _JSON and self._parts:
            body = b"".join(self._parts)
            self._parts = []
            at = body.rfind(b'"usage"')
            if at < 0:  # /v1/models and the like: no parse for nothing
                return
            # The usage object alone, parsed (every one of these APIs puts it last):
            # a tenth of the body. If it cannot be isolated or says nothing (a "usage"
            # member of something else), the whole body is read as before.
            if self._take(usage_member_at(body, at)):
                return
            if self._overflow:
                self._read_tail(body)
            else:
                try:
                    value = json_loads(body)
                except ValueError:
                    return
                self._take(_usage_in(value))

    # --- event streams ---------------------------------------------------------------------

    def _feed_events(self, data: bytes) -> None:
        tail = self._tail
        if tail:
            data = tail + data
        end = events_end(data)
        if end < 0:  # no boundary yet: the event goes on
            self._tail = data if len(data) <= MAX_EVENT else b""
            return
        self._tail = data[end:] if len(data) - end <= MAX_EVENT else b""
        if b"usage" in data:
            self._read_events(data[:end])

    def _read_events(self, events: bytes) -> None:
        for event in events.replace(b"\r\n", b"\n").split(b"\n\n"):
            if b"usage" not in event:
                continue
            lines = [line[5:] for line in event.split(b"\n") if line.startswith(b"data:")]
            if not lines:
                continue
            payload = b"\n".join(line[1:] if line.startswith(b" ") else line for line in lines)
            try:
                value = json_loads(payload)
            except ValueError:
                continue
            self._take(_usage_in(value))

    # --- JSON ------------------------------------------------------------------------------

    def _read_tail(self, tail: bytes) -> None:
        """The ``usage`` object of a body too large to keep: the last one in its tail,
        taken by matching braces outside strings."""
        at = tail.rfind(b'"usage"')
        if at < 0:
            return
        start = tail.find(b"{", at)
        if start < 0:
            return
        depth = 0
        in_string = escaped = False
        for i in range(start, len(tail)):
            c = tail[i]
            if in_string:
                if escaped:
                    escaped = False
                elif c == 0x5C:  # backslash
                    escaped = True
                elif c == 0x22:
                    in_string = False
            elif c == 0x22:
                in_string = True
            elif c == 0x7B:
                depth += 1
            elif c == 0x7D:
                depth -= 1
                if depth == 0:
                    try:
                        self._take(json_loads(tail[start : i + 1]))
                    except ValueError:
                        pass
                    return

    def _take(self, usage: Any) -> bool:
        """Whether ``usage`` said anything."""
        prompt, output = tokens_of(usage)
        # Set, never add: Anthropic's message_delta counts are cumulative, and a
        # stream's usage chunk is the whole request's.
        if prompt is not None and (prompt or self.input is None):
            self.input = prompt
        if output is not None:
            self.output = output
        return prompt is not None or output is not None
