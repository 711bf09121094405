"""Byte ranges served from a stored full response (RFC 9111 §3.4, RFC 9110 §14).

Pure: from a ``Range`` field value and the stored body's length, which bytes a
206 carries -- or that none can (416), or that pyproxy leaves the request to the
upstream (several ranges, another unit, anything it does not parse).
"""

from __future__ import annotations

import re
from typing import Optional, Tuple, Union

UNSATISFIABLE = "unsatisfiable"  # RFC 9110 §15.5.17: 416, Content-Range: bytes */length

# One byte range: first-last, first- or -suffix (§14.1.2); the unit is case-insensitive.
_ONE_RANGE = re.compile(rb"[ \t]*[bB][yY][tT][eE][sS][ \t]*=[ \t]*([0-9]*)-([0-9]*)[ \t]*")


def single_byte_range(value: bytes, length: int) -> Union[Tuple[int, int], str, None]:
    """(first, last) inclusive; UNSATISFIABLE; or None: not one byte range served here."""
    match = _ONE_RANGE.fullmatch(value)
    if match is None:
        return None
    first_text, last_text = match.groups()
    if not first_text:
        if not last_text:
            return None
        suffix = int(last_text)  # the last N bytes
        if suffix == 0:
            return UNSATISFIABLE
        return (max(0, length - suffix), length - 1) if length else UNSATISFIABLE
    first = int(first_text)
    last = int(last_text) if last_text else length - 1
    if last_text and last < first:
        return None  # invalid (§14.1.1): the field is ignored, the whole response is due
    if first >= length:
        return UNSATISFIABLE
    return first, min(last, length - 1)


def content_range(first: int, last: int, length: int) -> bytes:
    return b"bytes %d-%d/%d" % (first, last, length)


def unsatisfied_range(length: int) -> bytes:
    return b"bytes */%d" % length


def range_field(headers: "list") -> Optional[bytes]:  # type: ignore[type-arg]
    """The Range field's value: None without one, or with several (not served here)."""
    found: Optional[bytes] = None
    for name, value in headers:
        if name == b"range":
            if found is not None:
                return b""
            found = value
    return found
