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
# field-content and field-value are not matched as regexes here: _parse_fields
# checks the same grammar with byte classes. They stay, spelled as h11 spells
# them, so the tripwire test notices if h11's grammar moves.
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
    """A response head the fast path accepted. ``content_length`` is -1 for a
    chunked body (then decoded by ``ChunkedDecoder``)."""

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


def _parse_fields(block: bytes) -> Optional[Tuple[List[Header], int, int, bool, bool, int]]:
    """Header lines -> (headers, content_length or -1, host count, close?, special?, chunked)

    ``special`` marks fields the fast path leaves to h11: Expect, Upgrade, a
    Content-Length it cannot read at a glance, a Transfer-Encoding other than
    exactly ``chunked``. ``chunked`` counts the Transfer-Encoding fields that are.
    """
    headers: List[Header] = []
    content_length = -1
    hosts = 0
    close = False
    special = False
    chunked = 0
    if not block:
        return headers, content_length, hosts, close, special, chunked
    for line in block.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon or not name or name.translate(None, _TOKEN_CHARS):
            return None
        value = value.strip(_OWS_CHARS)
        if len(value.translate(None, _NOT_IN_VALUE)) != len(value):
            return None
        name = name.lower()
        if name == b"transfer-encoding":
            value = value.lower()  # as h11 normalizes it
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
        elif name == b"transfer-encoding":
            if value == b"chunked":
                chunked += 1
            else:
                special = True
        elif name == b"expect" or name == b"upgrade":
            special = True
    return headers, content_length, hosts, close, special, chunked


_COMMON_METHODS = {m: m for m in (b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"PATCH", b"OPTIONS")}


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
    method = _COMMON_METHODS.get(method, method)  # one shared object, not one per request
    fields = _parse_fields(buf[line_end : end - 4])  # type: ignore[operator]
    if fields is None:
        return FALLBACK
    headers, content_length, hosts, close, special, chunked = fields
    if special or chunked or hosts != 1:
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
    headers, content_length, _, close, special, chunked = fields
    if special:
        return FALLBACK
    if chunked:
        # exactly one "Transfer-Encoding: chunked" and no Content-Length
        if chunked > 1 or content_length >= 0:
            return FALLBACK
        content_length = -1
    elif content_length < 0:
        return FALLBACK  # close-delimited: h11
    return FastResponse(status, match.group(2) or b"", headers, content_length, not close, end)  # type: ignore[arg-type]


# --- chunked bodies (RFC 9112 §7.1), decoded as h11's ChunkedReader does ---------------

_CHUNK_HEADER = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;.*)?[ \t]*")
_MAX_CHUNK_LINE = 16 * 1024  # h11's default max_incomplete_event_size

_CHUNK_SIZE = 0  # reading a chunk-size line
_CHUNK_DATA = 1  # inside chunk data
_CHUNK_CRLF = 2  # the CRLF after chunk data
_CHUNK_TRAILER = 3  # after the last chunk: trailer fields up to an empty line
_CHUNK_END = 4


class ChunkError(ValueError):
    """The chunked body is malformed (h11 would raise RemoteProtocolError)."""


class ChunkedDecoder:
    """Incremental decoder: ``feed(bytes) -> [data, ...]``; ``done`` once the body ended.

    Accepts and rejects exactly what h11 does (chunk-size up to 20 hex digits,
    extensions ignored, trailing OWS tolerated, CRLF required after data);
    trailers, rare in practice, are checked by h11 itself. ``extra`` holds
    any bytes after the end of the body.
    """

    __slots__ = ("_state", "_left", "_pending", "_crlf_seen", "done", "extra")

    def __init__(self) -> None:
        self._state = _CHUNK_SIZE
        self._left = 0
        self._pending = b""
        self._crlf_seen = 0
        self.done = False
        self.extra = b""

    def feed(self, data: bytes) -> List[bytes]:
        out: List[bytes] = []
        if self._pending:
            data = self._pending + data
            self._pending = b""
        pos = 0
        size = len(data)
        while pos < size:
            state = self._state
            if state == _CHUNK_DATA:
                take = min(self._left, size - pos)
                out.append(data[pos : pos + take] if (pos or take != size) else data)
                pos += take
                self._left -= take
                if not self._left:
                    self._state = _CHUNK_CRLF
            elif state == _CHUNK_CRLF:
                # byte by byte, as h11 compares what it has against b"\r\n"
                expected = b"\r\n"[self._crlf_seen :]
                got = data[pos : pos + len(expected)]
                if got != expected[: len(got)]:
                    raise ChunkError(f"malformed chunk footer: {got!r}")
                pos += len(got)
                self._crlf_seen += len(got)
                if self._crlf_seen == 2:
                    self._crlf_seen = 0
                    self._state = _CHUNK_SIZE
            elif state == _CHUNK_SIZE:
                end = data.find(b"\r\n", pos)
                if end == -1:
                    if size - pos > _MAX_CHUNK_LINE:
                        raise ChunkError("chunk header too long")
                    self._pending = data[pos:]
                    return out
                match = _CHUNK_HEADER.fullmatch(data, pos, end)
                if match is None:
                    raise ChunkError(f"illegal chunk header: {data[pos : end + 2][:80]!r}")
                pos = end + 2
                self._left = int(match.group(1), 16)
                self._state = _CHUNK_DATA if self._left else _CHUNK_TRAILER
            elif state == _CHUNK_TRAILER:
                rest = data[pos:]
                end = _trailer_end(rest)
                if end is None:
                    if len(rest) > _MAX_CHUNK_LINE:
                        raise ChunkError("trailer section too long")
                    self._pending = rest
                    return out
                self._state = _CHUNK_END
                self.done = True
                self.extra = rest[end:]
                return out
            else:  # _CHUNK_END: anything more is not part of this message
                self.extra = data[pos:]
                return out
        return out


def _trailer_end(rest: bytes) -> Optional[int]:
    """Where the trailer section ends in ``rest`` (None: need more), validated by h11."""
    if rest[:2] == b"\r\n":
        return 2
    if rest[:1] == b"\n":
        return 1
    # Non-empty trailers: let h11 find the end and judge every field.
    import h11

    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n" + rest)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return None
            if type(event) is h11.EndOfMessage:
                return len(rest) - len(conn.trailing_data[0])
    except h11.RemoteProtocolError as exc:
        raise ChunkError(f"malformed trailer: {exc}") from None


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
