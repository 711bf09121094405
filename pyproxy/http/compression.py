"""gzip for clients that accept it: which responses, which headers, and a streaming compressor.

A response is compressed when the client sent ``Accept-Encoding`` with gzip
(RFC 9110 §12.5.3), the upstream did not encode it already, its type is
textual (JSON, text, XML, JavaScript), it is not an event stream (each SSE
event must reach the client as sent), it is not marked ``no-transform``
(RFC 9111 §5.2.2.6), and its Content-Length, if declared, is at least the
configured minimum. The compressor is flushed at the end of every upstream
read, so a streamed response stays live.
"""

from __future__ import annotations

import zlib
from typing import List, Sequence, Tuple

Header = Tuple[bytes, bytes]

_TEXTUAL_TYPES = frozenset(
    {
        b"application/json",
        b"application/javascript",
        b"application/x-javascript",
        b"application/xml",
        b"application/x-ndjson",
        b"application/graphql-response+json",
        b"image/svg+xml",
    }
)
_NEVER_STATUSES = frozenset({204, 206, 304})


def accepts_gzip(request_headers: Sequence[Header]) -> bool:
    """RFC 9110 §12.5.3: gzip (or ``*``) listed with a q-value above zero."""
    for name, value in request_headers:
        if name == b"accept-encoding":
            for item in value.lower().split(b","):
                coding, _, params = item.strip().partition(b";")
                if coding.strip() in (b"gzip", b"x-gzip", b"*"):
                    q = params.strip()
                    if q.startswith(b"q="):
                        try:
                            if float(q[2:]) <= 0:
                                continue
                        except ValueError:
                            continue
                    return True
    return False


def is_compressible_type(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    if media == b"text/event-stream":
        return False
    return media.startswith(b"text/") or media in _TEXTUAL_TYPES or media.endswith((b"+json", b"+xml"))


def should_compress(status: int, headers: Sequence[Header], min_length: int) -> bool:
    if status < 200 or status in _NEVER_STATUSES:
        return False
    compressible = False
    for name, value in headers:
        if name == b"content-type":
            compressible = is_compressible_type(value)
        elif name == b"content-encoding":
            return False  # already encoded by the upstream
        elif name == b"content-length":
            if int(value) < min_length:
                return False
        elif name == b"cache-control" and b"no-transform" in value.lower():
            return False
    return compressible


def gzip_headers(headers: Sequence[Header]) -> List[Header]:
    """The headers of the compressed response: no Content-Length (the length is
    unknown until the end), Content-Encoding, Vary extended, a strong ETag made weak
    (the bytes differ from the identity representation's)."""
    out: List[Header] = []
    vary_done = False
    for name, value in headers:
        if name == b"content-length":
            continue
        if name == b"etag" and not value.startswith(b"W/"):
            value = b"W/" + value
        elif name == b"vary":
            if b"accept-encoding" not in value.lower() and value.strip() != b"*":
                value = value + b", Accept-Encoding"
            vary_done = True
        out.append((name, value))
    out.append((b"content-encoding", b"gzip"))
    if not vary_done:
        out.append((b"vary", b"Accept-Encoding"))
    return out


class GzipStream:
    """One response's compressor (gzip container: wbits 31)."""

    __slots__ = ("_z",)

    def __init__(self, level: int) -> None:
        self._z = zlib.compressobj(level, zlib.DEFLATED, 31)

    def compress(self, data: bytes) -> bytes:
        return self._z.compress(data)

    def flush(self) -> bytes:
        """What was compressed so far, decodable now (Z_SYNC_FLUSH)."""
        return self._z.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._z.flush(zlib.Z_FINISH)


def gzip_whole(data: bytes, level: int) -> bytes:
    z = zlib.compressobj(level, zlib.DEFLATED, 31)
    return z.compress(data) + z.flush(zlib.Z_FINISH)
