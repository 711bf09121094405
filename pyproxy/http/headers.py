"""The single home of header logic: hop-by-hop removal, framing, forwarding headers.

Header names arrive lowercased from h11, so every comparison here is on
lowercase bytes. pyproxy re-frames every message it forwards: received
Content-Length / Transfer-Encoding are never copied through, they only decide
the framing pyproxy itself declares (RFC 9112 §6).
"""

from __future__ import annotations

from typing import FrozenSet, Iterable, List, Optional, Set, Tuple

from pyproxy.errors import BadRequest

Header = Tuple[bytes, bytes]
Headers = List[Header]

# RFC 9110 §7.6.1: connection-specific fields a proxy must not forward, plus the
# framing fields (RFC 9112 §6) that pyproxy recomputes itself. "Trailer" and the
# Proxy-* fields follow RFC 7230 §6.1 / RFC 9110 §11.7 (meant for this hop).
HOP_BY_HOP: FrozenSet[bytes] = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"content-length",
    }
)

# Fields pyproxy sets itself on the way to the upstream, so incoming copies
# are dropped (X-Forwarded-For is appended to instead, like nginx's
# $proxy_add_x_forwarded_for).
_REPLACED_TO_UPSTREAM: FrozenSet[bytes] = frozenset({b"host", b"x-forwarded-proto", b"x-forwarded-host", b"expect"})

VIA_TOKEN = b"1.1 pyproxy"

# Header values whose contents must never reach a log line.
SECRET_HEADERS: FrozenSet[bytes] = frozenset(
    {b"authorization", b"proxy-authorization", b"x-api-key", b"api-key", b"cookie", b"set-cookie"}
)


def connection_tokens(headers: Iterable[Header]) -> Set[bytes]:
    """The field names listed in Connection (RFC 9110 §7.6.1), lowercased."""
    tokens: Set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            for token in value.split(b","):
                token = token.strip().lower()
                if token:
                    tokens.add(token)
    return tokens


class RequestFraming:
    """How a request body is delimited, decided from already h11-validated headers."""

    __slots__ = ("content_length", "chunked")

    def __init__(self, content_length: Optional[int], chunked: bool) -> None:
        self.content_length = content_length
        self.chunked = chunked

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


def request_framing(headers: Iterable[Header]) -> RequestFraming:
    """Decide the request framing; reject what smuggling relies on.

    h11 already rejects differing duplicate Content-Lengths, non-numeric
    lengths and any Transfer-Encoding other than exactly ``chunked``. What h11
    allows but a proxy must not (RFC 9112 §6.3 ¶3: "a server MAY reject ... and
    MUST close the connection"; a front end and a back end that disagree on
    which wins is request smuggling) is both fields at once.
    """
    content_length: Optional[int] = None
    chunked = False
    for name, value in headers:
        if name == b"content-length":
            content_length = int(value)
        elif name == b"transfer-encoding":
            chunked = True
    if chunked and content_length is not None:
        raise BadRequest("both Content-Length and Transfer-Encoding are present")
    return RequestFraming(content_length, chunked)


def to_origin_form(target: bytes) -> bytes:
    """Reduce a request-target to origin-form (RFC 9112 §3.2).

    absolute-form is accepted as a server must (§3.2.2); authority-form is
    CONNECT's, which a reverse proxy does not serve.
    """
    if target[:1] == b"/":
        return target
    if target == b"*":
        return target
    lowered = target[:8].lower()
    if lowered.startswith(b"http://") or lowered.startswith(b"https://"):
        rest = target[target.index(b"//") + 2 :]
        slash = rest.find(b"/")
        query = rest.find(b"?")
        if slash == -1 or (query != -1 and query < slash):
            return b"/" + (rest[query:] if query != -1 else b"")
        return rest[slash:]
    raise BadRequest("request-target must be in origin-form or absolute-form")


def upstream_request_headers(
    headers: List[Header],
    *,
    upstream_host: bytes,
    client_ip: bytes,
    scheme: bytes,
    framing: RequestFraming,
    allow_underscores: bool = False,
) -> Headers:
    """Headers to send upstream: hop-by-hop removed, forwarding fields set, re-framed."""
    named = connection_tokens(headers)
    out: Headers = []
    original_host = b""
    forwarded_for: List[bytes] = []
    via: List[bytes] = []
    for name, value in headers:
        if name in HOP_BY_HOP or name in named:
            continue
        if name in _REPLACED_TO_UPSTREAM:
            if name == b"host":
                original_host = value
            continue
        if name == b"x-forwarded-for":
            forwarded_for.append(value)
            continue
        if name == b"via":
            via.append(value)
            continue
        # nginx's underscores_in_headers off: lenient back ends map "_" to "-",
        # so "Transfer_Encoding" could reframe the body behind our back.
        if not allow_underscores and b"_" in name:
            continue
        out.append((name, value))
    out.insert(0, (b"host", upstream_host))
    forwarded_for.append(client_ip)
    out.append((b"x-forwarded-for", b", ".join(forwarded_for)))
    out.append((b"x-forwarded-proto", scheme))
    if original_host:
        out.append((b"x-forwarded-host", original_host))
    via.append(VIA_TOKEN)
    out.append((b"via", b", ".join(via)))
    if framing.chunked:
        out.append((b"transfer-encoding", b"chunked"))
    elif framing.content_length is not None:
        out.append((b"content-length", str(framing.content_length).encode("ascii")))
    return out


def interim_headers(headers: List[Header]) -> Headers:
    """A 1xx response's fields for the client: hop-by-hop ones removed (it has no
    framing of its own)."""
    named = connection_tokens(headers)
    return [(n, v) for n, v in headers if n not in HOP_BY_HOP and n not in named]


def client_response_headers(headers: List[Header]) -> Headers:
    """Headers to send to the client: hop-by-hop removed, Via added, re-framed.

    A Content-Length is declared only when the upstream declared one and did
    not also send Transfer-Encoding (which wins, RFC 9112 §6.3 ¶3); otherwise
    h11 frames the body itself (chunked for HTTP/1.1 clients, close for 1.0).
    The Content-Length, when declared, is always the last header: the client
    protocol reads the framing from there.
    """
    named = connection_tokens(headers)
    out: Headers = []
    content_length: Optional[bytes] = None
    chunked = False
    via: List[bytes] = []
    for name, value in headers:
        if name in HOP_BY_HOP or name in named:
            if name == b"content-length":
                content_length = value
            elif name == b"transfer-encoding":
                chunked = True
            continue
        if name == b"via":
            via.append(value)
            continue
        out.append((name, value))
    via.append(VIA_TOKEN)
    out.append((b"via", b", ".join(via)))
    if content_length is not None and not chunked:
        out.append((b"content-length", content_length))
    return out


def redact(headers: Iterable[Header]) -> Headers:
    """A copy safe to log: credential values replaced."""
    return [(n, b"[redacted]" if n.lower() in SECRET_HEADERS else v) for n, v in headers]
