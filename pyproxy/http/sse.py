"""Server-Sent Events as a proxy sees them: where an event ends, and the keep-alive.

Sans-I/O: the client connection asks these functions whether a keep-alive
comment may be written now, and writes it itself.

The grammar is the WHATWG HTML standard's (§9.2.6, "Interpreting an event
stream"): lines end in CRLF, LF or CR; a blank line dispatches the event that
the lines before it built; a line that begins with ``:`` is a comment, which
every conforming client ignores -- the standard itself suggests one "every 15
seconds or so" against proxies that drop idle connections, which is what
``--sse-keepalive`` writes. A comment is only ever written *between* events:
inside one it would still be ignored by a conforming parser, but a client that
splits the stream on blank lines by hand (many do) would see it glued to the
half-received event.
"""

from __future__ import annotations

from typing import List, Tuple

PING = b": ping\n"
# What the stream "ends with" before its first byte: nothing is in progress.
STREAM_START = b"\n\n"
TAIL_BYTES = 3  # enough to tell every blank-line ending apart (``\n\r\n``)


def is_event_stream(headers: List[Tuple[bytes, bytes]]) -> bool:
    """Whether a response's Content-Type is ``text/event-stream`` (parameters allowed,
    case-insensitive as media types are: RFC 9110 §8.3.1)."""
    for name, value in headers:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"text/event-stream"
    return False


def events_end(data: bytes) -> int:
    """Where the last complete event of ``data`` ends (after its blank line, LF or CRLF
    framed: the WHATWG event-stream format), or -1 when none has ended yet."""
    cut = data.rfind(b"\n\n")
    cut_crlf = data.rfind(b"\r\n\r\n")
    return max(cut + 2 if cut >= 0 else -1, cut_crlf + 4 if cut_crlf >= 0 else -1)


def stream_tail(tail: bytes, data: bytes) -> bytes:
    """The last TAIL_BYTES bytes of the stream once ``data`` follows ``tail``."""
    if len(data) >= TAIL_BYTES:
        return data[-TAIL_BYTES:]
    return (tail + data)[-TAIL_BYTES:]


def at_event_boundary(tail: bytes) -> bool:
    """The stream so far ends between two events: its last line is blank.

    Only an LF settles it. A stream ending in CR may be halfway through a CRLF,
    so a comment written there could split the terminator in two (one blank
    line more, as the parser sees it); the next LF, or the next event, decides.
    """
    return tail.endswith(b"\n\n") or tail.endswith(b"\r\r\n") or tail.endswith(b"\n\r\n")


def keepalive_due(now: float, last_write: float, every: float, tail: bytes) -> Tuple[bool, float]:
    """Whether a keep-alive comment is written now, and when to look again.

    ``last_write``: when the stream last carried anything (upstream data or a
    comment); ``every``: the seconds of silence a comment answers. Mid-event the
    comment waits: the rest of the event, or another ``every``, comes first.
    """
    due = last_write + every
    if now < due:
        return False, due
    if not at_event_boundary(tail):
        return False, now + every
    return True, now + every
