"""Validation as pure functions (RFC 9111 §4.3, RFC 9110 §13): the conditional
request a cache sends for a stale entry, what a 304 changes in the stored
response, and whether a client's own conditional request is answered 304 from
a fresh entry. No I/O, no clock: the cache layer and the coalesced fetch act on
what these say.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from pyproxy.http.dates import parse_http_date

Header = Tuple[bytes, bytes]

# RFC 9110 §13.1: the preconditions. A request carrying any of its own is not
# one pyproxy adds validators to (it passes through as the client wrote it).
CONDITIONAL_FIELDS = frozenset(
    {b"if-none-match", b"if-modified-since", b"if-match", b"if-unmodified-since", b"if-range"}
)

# RFC 9111 §3.2: fields a 304 does not replace in the stored response -- framing
# (the stored body is what it describes) and the hop's own.
_NOT_UPDATED = frozenset(
    {b"content-length", b"transfer-encoding", b"content-encoding", b"connection", b"keep-alive", b"x-cache", b"age"}
)
# RFC 9110 §15.4.5: what a 304 carries of what a 200 would have sent.
_NOT_MODIFIED_FIELDS = (b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary")


def _first(headers: Sequence[Header], name: bytes) -> Optional[bytes]:
    for n, v in headers:
        if n == name:
            return v
    return None


def has_validator(headers: Sequence[Header]) -> bool:
    return any(n == b"etag" or n == b"last-modified" for n, _ in headers)


def has_conditionals(request_headers: Sequence[Header]) -> bool:
    return any(n in CONDITIONAL_FIELDS for n, _ in request_headers)


# The client's own preconditions that pyproxy never merges with: they ask for
# something else than "send it unless I have it" (a 412, or a range).
_NOT_MERGED = frozenset({b"if-match", b"if-unmodified-since", b"if-range"})


def conditional_headers(stored: Sequence[Header], request_headers: Sequence[Header] = ()) -> Optional[List[Header]]:
    """§4.3.1: the fields that make a request validate the stored response -- its
    entity tag in If-None-Match, its Last-Modified in If-Modified-Since -- merged
    with the client's own: None when they cannot be merged so that a 304 tells
    about the stored response (then the request goes as the client wrote it).

    A client's If-None-Match is kept when one of its tags is the stored one (its
    304 then validates both); a client's If-Modified-Since only beside a stored
    entity tag (which the upstream evaluates instead, RFC 9110 §13.2.2)."""
    if any(n in _NOT_MERGED for n, _ in request_headers):
        return None
    etag = _first(stored, b"etag")
    last_modified = _first(stored, b"last-modified")
    client_tags = _first(request_headers, b"if-none-match")
    client_since = _first(request_headers, b"if-modified-since")
    out: List[Header] = []
    if client_tags is not None:
        if etag is None or client_tags.strip() == b"*" or not weak_match(client_tags, etag):
            return None
        return out  # the client's list names the stored tag: nothing to add
    if etag is not None:
        out.append((b"if-none-match", etag))
    elif client_since is not None:
        return None  # two dates: a 304 for the client's would not vouch for the stored one
    if last_modified is not None and client_since is None:
        out.append((b"if-modified-since", last_modified))
    return out


def freshened_headers(stored: Sequence[Header], not_modified: Sequence[Header]) -> List[Header]:
    """§3.2 and §4.3.4: the stored response's fields, each one the 304 carries
    replaced by the 304's (all its values), the framing fields excepted."""
    replacing = {n for n, _ in not_modified if n not in _NOT_UPDATED}
    merged = [(n, v) for n, v in stored if n not in replacing]
    merged += [(n, v) for n, v in not_modified if n in replacing]
    return merged


def _opaque(tag: bytes) -> bytes:
    tag = tag.strip()
    return tag[2:] if tag[:2] == b"W/" else tag


def weak_match(tags: bytes, etag: bytes) -> bool:
    """RFC 9110 §13.1.2: If-None-Match uses the weak comparison -- W/"x" matches "x"
    (so the weak tag pyproxy gives a gzip form still matches the stored strong one).
    ``tags`` is the field value: "*" or a list."""
    if tags.strip() == b"*":
        return True
    wanted = _opaque(etag)
    return any(_opaque(tag) == wanted for tag in _split_tags(tags))


def _split_tags(value: bytes) -> List[bytes]:
    """A list of entity tags; commas inside the quotes belong to the tag (§8.8.3)."""
    tags: List[bytes] = []
    current = bytearray()
    quoted = False
    for byte in value:
        if byte == 0x22:  # "
            quoted = not quoted
        if byte == 0x2C and not quoted:  # ,
            tags.append(bytes(current))
            current = bytearray()
        else:
            current.append(byte)
    tags.append(bytes(current))
    return [t.strip() for t in tags if t.strip()]


def answers_not_modified(method: bytes, request_headers: Sequence[Header], stored: Sequence[Header]) -> bool:
    """§4.3.2: a client's conditional GET or HEAD against a fresh stored response is
    answered 304 when its precondition fails. If-None-Match decides when present
    (RFC 9110 §13.2.2, step 3); else If-Modified-Since against Last-Modified."""
    if method not in (b"GET", b"HEAD"):
        return False
    if_none_match = _first(request_headers, b"if-none-match")
    if if_none_match is not None:
        etag = _first(stored, b"etag")
        return etag is not None and weak_match(if_none_match, etag)
    if_modified_since = _first(request_headers, b"if-modified-since")
    if if_modified_since is None:
        return False
    since = parse_http_date(if_modified_since)
    # §4.3.2: without a Last-Modified, the stored response's Date stands in for it.
    modified = _first(stored, b"last-modified")
    if modified is None:
        modified = _first(stored, b"date")
    when = parse_http_date(modified) if modified is not None else None
    return since is not None and when is not None and when <= since


def not_modified_headers(stored: Sequence[Header]) -> List[Header]:
    """RFC 9110 §15.4.5: the fields a 304 sends (those a 200 would have)."""
    return [(n, v) for n, v in stored if n in _NOT_MODIFIED_FIELDS]
