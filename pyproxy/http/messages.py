"""Parsed message heads as the rest of pyproxy sees them, whichever parser made them."""

from __future__ import annotations

from typing import List, Tuple

Header = Tuple[bytes, bytes]

# RFC 9110 §9.2.1: the safe methods. Any other (unknown ones included) is unsafe.
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
# RFC 9110 §9.2.2: a request that may be sent again without a second effect.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


class RequestHead:
    """A request head: names lowercased, values stripped (as h11 reports them)."""

    __slots__ = ("method", "target", "headers", "http_version")

    def __init__(self, method: bytes, target: bytes, headers: List[Header], http_version: bytes = b"1.1") -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.http_version = http_version

    def __repr__(self) -> str:  # never the headers: they may carry credentials
        return f"<RequestHead {self.method.decode()} {self.target[:80]!r} HTTP/{self.http_version.decode()}>"


class ResponseHead:
    __slots__ = ("status", "reason", "headers")

    def __init__(self, status: int, reason: bytes, headers: List[Header]) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
