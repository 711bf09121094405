"""A stored response, ready to be written: its head is serialized once, when stored.

A hit costs one small join (the head, the X-Cache and Age lines) and one write.
Event streams keep their event boundaries: each SSE event is replayed as its
own chunk, as the upstream sent it.
"""

from __future__ import annotations

import re
import struct
from typing import List, Optional, Sequence, Tuple, Union

from pyproxy._compat import json_dumps, json_loads
from pyproxy.cache.validation import has_validator
from pyproxy.http.compression import gzip_headers, gzip_whole, should_compress
from pyproxy.http.fastpath import LAST_CHUNK, chunk_pieces, serialize_response_head

Header = Tuple[bytes, bytes]

FRESH = "fresh"
STALE_WHILE_REVALIDATE = "swr"  # may be served while one refresh runs (RFC 5861 §3)
STALE_IF_ERROR = "sie"  # may be served only if the upstream fails (RFC 5861 §4)
EXPIRED = "expired"

_MAGIC = b"PPC1"
_LEN = struct.Struct(">I")
# An SSE event ends at a blank line (WHATWG HTML §9.2.6); any of the three line endings.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
# Per-entry bookkeeping counted against the memory bound besides the bytes themselves.
ENTRY_OVERHEAD = 256
# Seconds a stale entry with a validator is kept past its last window, for a
# conditional request to make it fresh again (its body not sent twice).
VALIDATION_KEEP = 600.0


def split_events(body: bytes) -> List[bytes]:
    events, start = [], 0
    for match in _EVENT_END.finditer(body):
        events.append(body[start : match.end()])
        start = match.end()
    if start < len(body):
        events.append(body[start:])
    return events


class CachedResponse:
    __slots__ = (
        "status",
        "reason",
        "headers",
        "body",
        "stream",
        "stored_at",
        "lifetime",
        "initial_age",
        "stale_while_revalidate",
        "stale_if_error",
        "vary_names",
        "vary_values",
        "_head",
        "_framing",
        "_gzipped",
        "wire",
        "size",
        "store_key",
        "validatable",
    )

    def __init__(
        self,
        status: int,
        reason: bytes,
        headers: List[Header],
        body: bytes,
        *,
        stream: bool,
        stored_at: float,
        lifetime: float,
        initial_age: float,
        stale_while_revalidate: float,
        stale_if_error: float,
        vary_names: Tuple[bytes, ...],
        vary_values: Tuple[bytes, ...],
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers  # as sent to clients, without framing fields
        self.body = body
        self.stream = stream  # an event stream: replayed chunked, one chunk per event
        self.stored_at = stored_at  # wall clock: entries may be shared between machines
        self.lifetime = lifetime
        self.initial_age = initial_age
        self.stale_while_revalidate = stale_while_revalidate
        self.stale_if_error = stale_if_error
        self.vary_names = vary_names
        self.vary_values = vary_values
        if stream:
            framing = (b"transfer-encoding", b"chunked")
            pieces: List[bytes] = []
            for event in split_events(body):
                pieces += chunk_pieces(event)
            pieces.append(LAST_CHUNK)
            self.wire = b"".join(pieces)
        else:
            framing = (b"content-length", b"%d" % len(body))
            self.wire = body
        self._framing = framing
        self._head: Optional[bytes] = None  # serialized on the first hit: many entries never get one
        # (head, body) for gzip clients, or False: not compressible; decided on first use.
        self._gzipped: Union[Tuple[bytes, bytes], bool, None] = None
        head_size = 16 + len(reason) + sum(len(n) + len(v) + 4 for n, v in headers) + 40
        self.size = head_size + len(self.wire) + len(body) * stream + ENTRY_OVERHEAD
        self.store_key: Optional[bytes] = None  # set by a memory store holding this entry
        # With an ETag or Last-Modified, a stale entry is still worth its body: a 304
        # makes it fresh again without the upstream sending it (RFC 9111 §4.3).
        self.validatable = has_validator(headers)

    # --- age and state (RFC 9111 §4.2.3, §4.2; RFC 5861) --------------------------------

    def age(self, now: float) -> float:
        return self.initial_age + max(0.0, now - self.stored_at)

    def state(self, now: float) -> str:
        age = self.age(now)
        if age < self.lifetime:
            return FRESH
        stale_for = age - self.lifetime
        if stale_for < self.stale_while_revalidate:
            return STALE_WHILE_REVALIDATE
        if stale_for < self.stale_if_error:
            return STALE_IF_ERROR
        return EXPIRED

    def usable_if_error(self, now: float) -> bool:
        """RFC 5861 §4: within stale-if-error (or still fresh)."""
        return self.age(now) - self.lifetime < max(self.stale_if_error, 0.0)

    def remaining(self, now: float) -> float:
        """Seconds until the entry is of no use at all: fresh, in a stale window, or
        (with a validator) kept VALIDATION_KEEP longer to be revalidated."""
        windows = max(self.stale_while_revalidate, self.stale_if_error)
        if self.validatable:
            windows += VALIDATION_KEEP
        return self.lifetime + windows - self.age(now)

    @property
    def is_vary_marker(self) -> bool:
        """Not a response: what a key holds for one that varies (see layer.vary_marker)."""
        return self.status == 0

    def matches_vary(self, request_values: Tuple[bytes, ...]) -> bool:
        return self.vary_values == request_values

    # --- writing -----------------------------------------------------------------------

    def response_head(
        self, cache_status: bytes, age: int, close: bool, extra: bytes = b"", head: Optional[bytes] = None
    ) -> bytes:
        """The head of a response from this entry; ``extra``: whole header lines to add;
        ``head``: another representation's (the gzip variant's)."""
        if head is None:
            head = self._head
            if head is None:
                # Without the last CRLF and the blank line: X-Cache, Age (and Connection) follow.
                head = self._head = serialize_response_head(self.status, self.reason, self.headers + [self._framing])[
                    :-4
                ]
        tail = b"connection: close\r\n\r\n" if close else b"\r\n"
        return b"%s\r\nx-cache: %s\r\nage: %d\r\n%s%s" % (head, cache_status, age, extra, tail)

    def gzipped(self, level: int, min_length: int) -> Optional[Tuple[bytes, bytes]]:
        """The gzip representation (head without its end, body), or None when this
        response is not one to compress; decided and made once, on the first gzip
        client's hit. Its bytes are added to ``size`` (the caller tells the store, so
        the store's byte bound counts it): at most the body again, typically a fifth."""
        variant = self._gzipped
        if variant is None:
            if self.stream or len(self.body) < min_length or not should_compress(self.status, self.headers, 0):
                variant = self._gzipped = False
            else:
                variant = self._set_gzipped(gzip_whole(self.body, level))
        return variant or None

    def _set_gzipped(self, body: bytes) -> Tuple[bytes, bytes]:
        headers = gzip_headers(self.headers) + [(b"content-length", b"%d" % len(body))]
        head = serialize_response_head(self.status, self.reason, headers)[:-4]
        variant = self._gzipped = (head, body)
        self.size += len(head) + len(body)
        return variant

    def client_headers(self, cache_status: bytes, age: int) -> List[Header]:
        """For an h11-mode client: the headers, framing last as start_response expects."""
        headers = self.headers + [(b"x-cache", cache_status), (b"age", b"%d" % age)]
        if not self.stream:
            headers.append((b"content-length", b"%d" % len(self.body)))
        return headers

    def body_pieces(self) -> List[bytes]:
        """The body as the h11 path sends it: one piece per event for a stream."""
        return split_events(self.body) if self.stream else [self.body]

    # --- storage format (the Redis backend) -------------------------------------------

    def to_bytes(self) -> bytes:
        """The wire form for a shared store: magic, meta length, JSON meta, body, and
        the gzip body when it was made (so a shared entry is compressed once, by its
        writer, not on every hit of every reader)."""
        variant = self._gzipped
        gzip_body = variant[1] if isinstance(variant, tuple) else b""
        meta = json_dumps(
            {
                "status": self.status,
                "reason": self.reason.decode("latin-1"),
                "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in self.headers],
                "stream": self.stream,
                "stored_at": self.stored_at,
                "lifetime": self.lifetime,
                "initial_age": self.initial_age,
                "swr": self.stale_while_revalidate,
                "sie": self.stale_if_error,
                "vary_names": [n.decode("latin-1") for n in self.vary_names],
                "vary_values": [v.decode("latin-1") for v in self.vary_values],
                "gzip": len(gzip_body),
            }
        )
        return b"".join((_MAGIC, _LEN.pack(len(meta)), meta, self.body, gzip_body))

    @classmethod
    def from_bytes(cls, data: bytes) -> Optional["CachedResponse"]:
        """None for anything that is not an entry this version wrote."""
        if not data.startswith(_MAGIC) or len(data) < 8:
            return None
        (meta_len,) = _LEN.unpack_from(data, 4)
        try:
            meta = json_loads(data[8 : 8 + meta_len])
            gzip_length = int(meta.get("gzip", 0))
            body_end = len(data) - gzip_length
            if gzip_length < 0 or body_end < 8 + meta_len:
                return None
            entry = cls(
                int(meta["status"]),
                meta["reason"].encode("latin-1"),
                [(n.encode("latin-1"), v.encode("latin-1")) for n, v in meta["headers"]],
                data[8 + meta_len : body_end],
                stream=bool(meta["stream"]),
                stored_at=float(meta["stored_at"]),
                lifetime=float(meta["lifetime"]),
                initial_age=float(meta["initial_age"]),
                stale_while_revalidate=float(meta["swr"]),
                stale_if_error=float(meta["sie"]),
                vary_names=tuple(n.encode("latin-1") for n in meta["vary_names"]),
                vary_values=tuple(v.encode("latin-1") for v in meta["vary_values"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        if gzip_length:
            entry._set_gzipped(data[body_end:])
        return entry


def strip_framing(headers: Sequence[Header]) -> List[Header]:
    """Client headers minus the framing pyproxy recomputes, Age and X-Cache (set per hit)."""
    return [(n, v) for n, v in headers if n not in _NOT_STORED]


_NOT_STORED = frozenset({b"content-length", b"transfer-encoding", b"age", b"x-cache"})
