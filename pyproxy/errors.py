"""The error hierarchy and the one table from error kind to what the client sees.

Every failure a client can observe is a ``ProxyError`` subclass carrying its
HTTP status and an OpenAI-style error ``type``, so the answer is decided in one
place and rendered in one shape: ``{"error": {"message", "type", "code"}}``.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from typing import List, Optional, Tuple

from pyproxy._compat import json_dumps

Headers = List[Tuple[bytes, bytes]]


class ProxyError(Exception):
    kind = "internal"  # the label of the upstream-errors metric
    status = 500
    limit = ""  # the label of proxy_limits_fired_total when a protective limit answered
    error_type = "proxy_error"
    code: Optional[str] = None  # OpenAI's error "code" (model_not_found...); None: the status
    # Headers added by whoever answers with this error (the gateway's x-pyproxy-attempts).
    added_headers: Headers = []

    def __init__(self, message: str, *, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def extra_headers(self) -> Headers:
        return self.added_headers


# --- the client's fault (4xx): the connection is closed after the answer ---


class BadRequest(ProxyError):
    """Malformed or ambiguous request (RFC 9112 §2.2, §6.3): answered 400, then close."""

    status = 400
    error_type = "invalid_request_error"


class HeadersTooLarge(BadRequest):
    status = 431
    limit = "header_size"


class BodyTooLarge(BadRequest):
    status = 413
    limit = "body_size"


class MethodNotAllowed(BadRequest):
    status = 405


class VersionNotSupported(BadRequest):
    """RFC 9110 §15.6.6: only HTTP/1.0 and HTTP/1.1 are spoken here."""

    status = 505


class ClientStalled(BadRequest):
    """The client stopped reading a response for longer than --read-timeout:
    both its connection and the upstream one are closed (408 if nothing was sent)."""

    status = 408
    limit = "client_stalled"


class RequestTimeout(BadRequest):
    """RFC 9110 §15.5.9: the request head did not arrive whole within --header-timeout,
    or its body arrived slower than --body-min-rate (a slowloris)."""

    status = 408

    def __init__(self, message: str, *, limit: str) -> None:
        super().__init__(message)
        self.limit = limit  # header_timeout | body_timeout


# --- the upstream's fault (5xx) ---


class NotInCache(ProxyError):
    """``Cache-Control: only-if-cached`` and nothing usable is stored: 504 (RFC 9111 §5.2.1.7)."""

    status = 504
    error_type = "cache_miss"


class UpstreamError(ProxyError):
    """The upstream could not be reached or broke the exchange: 502."""

    kind = "upstream"  # the label of the upstream-errors metric

    status = 502
    error_type = "upstream_error"


class UpstreamConnectError(UpstreamError):
    """Refused, unresolvable, or TLS handshake failed."""

    kind = "connect"  # the label of the upstream-errors metric


class UpstreamProtocolError(UpstreamError):
    """The upstream sent something that is not valid HTTP/1.1."""

    kind = "protocol"  # the label of the upstream-errors metric


class UpstreamDisconnected(UpstreamError):
    """The upstream closed the connection before a complete response head.

    ``request_sent`` tells the pool whether a retry could duplicate the request.
    """

    kind = "disconnected"  # the label of the upstream-errors metric

    def __init__(self, message: str, *, request_sent: bool = True, reused: bool = False) -> None:
        super().__init__(message)
        self.request_sent = request_sent
        self.reused = reused


class UpstreamTimeout(UpstreamError):
    """Connect or read timeout: 504 (RFC 9110 §15.6.5)."""

    kind = "timeout"  # the label of the upstream-errors metric

    status = 504


class PoolTimeout(UpstreamError):
    """No upstream connection became free within the pool wait limit: 503."""

    kind = "pool_timeout"  # the label of the upstream-errors metric

    status = 503
    error_type = "overloaded_error"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def extra_headers(self) -> Headers:
        return [(b"retry-after", str(self.retry_after).encode("ascii"))] + self.added_headers


class NoUpstreamAvailable(PoolTimeout):
    """Every deployment of the request is ejected, cooling down after a 429, or at its
    connection bound: 503 with Retry-After, the soonest recovery."""

    kind = "unavailable"


# --- admission ([auth] mode = "keys"): answered, the connection kept ---

_NO_RETRY = (b"x-should-retry", b"false")  # the openai and anthropic clients obey it


class Unauthorized(ProxyError):
    """No key, an unknown, expired or disabled one: 401."""

    kind = "unauthorized"
    status = 401
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code

    def extra_headers(self) -> Headers:
        return [(b"www-authenticate", b'Bearer realm="pyproxy"'), _NO_RETRY]


class Forbidden(ProxyError):
    """A key used for a model it may not use: 403."""

    kind = "forbidden"
    status = 403
    error_type = "permission_error"

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code

    def extra_headers(self) -> Headers:
        return [_NO_RETRY]


class RateLimited(ProxyError):
    """A key's, tenant's or key-on-model's limit: 429 with Retry-After and the
    x-ratelimit-* fields of the scope that refused."""

    kind = "rate_limited"
    status = 429
    error_type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after: float, headers: Headers, *, tokens: bool = False) -> None:
        super().__init__(message)
        if tokens:
            self.error_type = "tokens"  # OpenAI's type for a tokens-per-minute refusal
        self.retry_after = retry_after
        self.headers = headers

    def extra_headers(self) -> Headers:
        # Retry-After is whole seconds (RFC 9110 §10.2.3): rounded up, so a client that
        # waits that long is admitted.
        seconds = max(1, int(-(-self.retry_after // 1)))
        return [(b"retry-after", b"%d" % seconds)] + self.headers


_date_cache: List[object] = [0, b""]


def http_date() -> bytes:
    """The Date field for responses pyproxy itself generates (RFC 9110 §6.6.1),
    formatted at most once a second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = formatdate(now, usegmt=True).encode("ascii")
    return _date_cache[1]  # type: ignore[return-value]


def error_body(status: int, message: str, error_type: str, code: Optional[str] = None) -> bytes:
    return json_dumps({"error": {"message": message, "type": error_type, "code": code or status}})


def error_response_parts(exc: ProxyError) -> Tuple[int, Headers, bytes]:
    """Status, headers and JSON body for an error answered by the proxy itself."""
    body = error_body(exc.status, exc.message, exc.error_type, exc.code)
    headers: Headers = [(b"date", http_date()), (b"content-type", b"application/json")]
    headers.extend(exc.extra_headers())
    # last, as in client_response_headers: that is where framing is read from
    headers.append((b"content-length", str(len(body)).encode("ascii")))
    return exc.status, headers, body
