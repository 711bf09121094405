"""The fast path: parse and write the common HTTP/1.1 message shapes without h11.

h11 stays the parser of record. These functions accept only a strict subset
of what h11 accepts -- HTTP/1.1, CRLF line endings, a single Host, framing by
one plain Content-Length or none, no Transfer-Encoding, Expect or Upgrade --
and for that subset return exactly the fields h11 would (method, target,
version, lowercased names, values stripped of OWS). Anything else returns
``FALLBACK`` and the caller hands the same bytes to h11, which then decides.
``tests/unit/test_fastpath_differential.py`` proves the equivalence on a
corpus and on generated inputs.

The grammar below is h11's (``h11/_abnf.py``, RFC 9110 §5.5, RFC 9112 §3, §4),
copied so it can be matched over a whole header block at once; a unit test
checks the copies still equal h11's own.
"""

from __future__ import annotations

import re
from typing import List, Optional, Tuple, Union

Header = Tuple[bytes, bytes]

# --- grammar, as in h11/_abnf.py -------------------------------------------------
OWS = rb"[ \t]*"
TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
VCHAR = rb"[\x21-\x7e]"
VCHAR_OR_OBS_TEXT = rb"[^\x00\s]"
FIELD_CONTENT = VCHAR_OR_OBS_TEXT + rb"+(?:[ \t]+" + VCHAR_OR_OBS_TEXT + rb"+)*"
FIELD_VALUE = rb"(?:" + FIELD_CONTENT + rb")?"
REASON_PHRASE = rb"(?:[ \t]|" + VCHAR_OR_OBS_TEXT + rb")*"

# The same header grammar as byte-class checks, cheaper than a regex on both
# interpreters: a field name is a non-empty token; a field value, once its
# surrounding OWS is stripped, is field-content -- any bytes but NUL and the
# whitespace other than SP/HTAB that \s names in a bytes pattern.
_TOKEN_CHARS = b"-!#$%&'*+.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_NOT_IN_VALUE = b"\x00\n\x0b\x0c\r"
_REQUEST_LINE = re.compile(rb"(" + TOKEN + rb") (" + VCHAR + rb"+) HTTP/1\.1\r\n")
_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([0-9]{3})(?: (" + REASON_PHRASE + rb"))?\r\n")

FALLBACK = "fallback"  # not for the fast path: give these bytes to h11
NEED_MORE = "need-more"  # no complete head yet

_OWS_CHARS = b" \t"
_MAX_LENGTH_DIGITS = 18


class FastRequest:
    """A request head the fast path accepted; fields exactly as h11 reports them."""

    __slots__ = ("method", "target", "headers", "content_length", "keep_alive", "head_length")

    def __init__(
        self,
        method: bytes,
        target: bytes,
        headers: List[Header],
        content_length: int,
        keep_alive: bool,
        head_length: int,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.content_length = content_length
        self.keep_alive = keep_alive
        self.head_length = head_length


class FastResponse:
    __slots__ = ("status", "reason", "headers", "content_length", "keep_alive", "head_length")

    def __init__(
        self,
        status: int,
        reason: bytes,
        headers: List[Header],
        content_length: int,
        keep_alive: bool,
        head_length: int,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content_length = content_length
        self.keep_alive = keep_alive
        self.head_length = head_length


def _split_head(buf: bytes) -> Union[int, str]:
    """Index just past the blank line ending the head, or NEED_MORE / FALLBACK."""
    end = buf.find(b"\r\n\r\n")
    if end == -1:
        # A bare LF could end the head for h11 (it accepts "\n" line ends).
        return FALLBACK if b"\n\n" in buf or b"\n\r\n" in buf else NEED_MORE
    end += 4
    if buf.count(b"\n", 0, end) != buf.count(b"\r\n", 0, end):
        return FALLBACK  # bare LF somewhere: h11 splits lines differently
    return end


def _parse_fields(block: bytes) -> Optional[Tuple[List[Header], int, int, bool, bool]]:
    """Header lines -> (headers, content_length or -1, host count, close?, special?)

    ``special`` marks fields the fast path leaves to h11: Transfer-Encoding,
    Expect, Upgrade, or a Content-Length it cannot read at a glance.
    """
    headers: List[Header] = []
    content_length = -1
    hosts = 0
    close = False
    special = False
    if not block:
        return headers, content_length, hosts, close, special
    for line in block.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon or not name or name.translate(None, _TOKEN_CHARS):
            return None
        value = value.strip(_OWS_CHARS)
        if len(value.translate(None, _NOT_IN_VALUE)) != len(value):
            return None
        name = name.lower()
        headers.append((name, value))
        if name == b"content-length":
            if content_length != -1 or not value.isdigit() or len(value) > _MAX_LENGTH_DIGITS:
                special = True
            else:
                content_length = int(value)
        elif name == b"host":
            hosts += 1
        elif name == b"connection":
            for token in value.split(b","):
                if token.strip(_OWS_CHARS).lower() == b"close":
                    close = True
        elif name == b"transfer-encoding" or name == b"expect" or name == b"upgrade":
            special = True
    return headers, content_length, hosts, close, special


def parse_request_head(buf: bytes) -> Union[FastRequest, str]:
    end = _split_head(buf)
    if type(end) is str:
        return end  # type: ignore[return-value]
    line_end = buf.find(b"\r\n") + 2
    match = _REQUEST_LINE.fullmatch(buf, 0, line_end)
    if match is None:
        return FALLBACK
    method = match.group(1)
    if method == b"CONNECT":
        return FALLBACK
    fields = _parse_fields(buf[line_end : end - 4])  # type: ignore[operator]
    if fields is None:
        return FALLBACK
    headers, content_length, hosts, close, special = fields
    if special or hosts != 1:
        return FALLBACK
    return FastRequest(method, match.group(2), headers, max(content_length, 0), not close, end)  # type: ignore[arg-type]


def parse_response_head(buf: bytes, request_method: bytes) -> Union[FastResponse, str]:
    """Only responses whose body is exactly Content-Length bytes take this path."""
    if request_method == b"HEAD":
        return FALLBACK
    end = _split_head(buf)
    if type(end) is str:
        return end  # type: ignore[return-value]
    line_end = buf.find(b"\r\n") + 2
    match = _STATUS_LINE.fullmatch(buf, 0, line_end)
    if match is None:
        return FALLBACK
    status = int(match.group(1))
    if status < 200 or status == 204 or status == 304:
        return FALLBACK  # 1xx interim, and responses that never have a body
    fields = _parse_fields(buf[line_end : end - 4])  # type: ignore[operator]
    if fields is None:
        return FALLBACK
    headers, content_length, _, close, special = fields
    if special or content_length < 0:
        return FALLBACK
    return FastResponse(status, match.group(2) or b"", headers, content_length, not close, end)  # type: ignore[arg-type]


# --- writing ---------------------------------------------------------------------

_CRLF = b"\r\n"
_SEP = b": "
LAST_CHUNK = b"0\r\n\r\n"


def serialize_request_head(method: bytes, target: bytes, headers: List[Header]) -> bytes:
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        parts += (name, _SEP, value, _CRLF)
    parts.append(_CRLF)
    return b"".join(parts)


_STATUS_LINES = {}


def serialize_response_head(status: int, reason: bytes, headers: List[Header]) -> bytes:
    line = _STATUS_LINES.get((status, reason))
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
        if len(_STATUS_LINES) < 1024:
            _STATUS_LINES[(status, reason)] = line
    parts = [line]
    for name, value in headers:
        parts += (name, _SEP, value, _CRLF)
    parts.append(_CRLF)
    return b"".join(parts)


def chunk_pieces(data: bytes) -> List[bytes]:
    """One chunk of chunked transfer coding (RFC 9112 §7.1), data not copied."""
    return [b"%x\r\n" % len(data), data, _CRLF]
