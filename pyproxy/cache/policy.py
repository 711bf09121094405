"""RFC 9111 as pure functions: what a shared cache may store, for how long, and when
a stored response may be used. No I/O and no clock of its own: callers pass ``now``.

pyproxy stores only responses with *explicit* freshness (``s-maxage``,
``max-age``, ``Expires``) or a TTL from an operator's rule; it never applies
heuristic freshness (§4.2.2). Entries with a validator are kept past
staleness and revalidated (see ``validation``); ``no-cache`` ones are stored
stale from the start. An unsafe request's answer invalidates (§4.4):
``invalidated_targets`` says what.
"""

from __future__ import annotations

from typing import Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

from pyproxy.http.dates import parse_http_date
from pyproxy.http.messages import SAFE_METHODS
from pyproxy.rules import Rule

Header = Tuple[bytes, bytes]
Directives = Dict[bytes, Optional[bytes]]

# §1.2.2: a delta-seconds too large to represent is taken as 2^31.
_DELTA_MAX = 2**31

# Request modes, decided from the request alone.
LOOKUP = "lookup"  # may be answered from the cache
REFETCH = "refetch"  # must not be answered from the cache, but the response may be stored
BYPASS = "bypass"  # neither read nor written (no-store)
RANGE = "range"  # a Range request: a stored full response may serve it (§3.4); else as BYPASS

# Statuses a stored response may have. 206 (no range support) is left out, and a
# 304 is never stored itself: it freshens the entry it validated (§4.3.4).
_STORABLE_STATUSES = frozenset(range(200, 600)) - {206, 304}


def parse_cache_control(values: Iterable[bytes]) -> Directives:
    """Directives of every Cache-Control field line (§5.2), names lowercased,
    quoted values unquoted. A repeated directive keeps its first value. The grammar
    allows no whitespace around "=" (``token [ "=" ( token / quoted-string ) ]``):
    ``max-age =100`` and ``max-age= 100`` are not max-age, and are ignored."""
    directives: Directives = {}
    for value in values:
        for item in _split_list(value):
            name, eq, arg = item.strip().partition(b"=")
            if eq and (name[-1:].isspace() or arg[:1].isspace()):
                continue
            name = name.lower()
            if not name:
                continue
            if arg.startswith(b'"') and arg.endswith(b'"') and len(arg) >= 2:
                arg = arg[1:-1]
            directives.setdefault(name, arg if eq else None)
    return directives


def _split_list(value: bytes) -> List[bytes]:
    """Split a comma-separated field value, keeping commas inside quoted strings."""
    if b'"' not in value:
        return value.split(b",")
    items, current, quoted = [], bytearray(), False
    for byte in value:
        if byte == 0x22:  # '"'
            quoted = not quoted
        if byte == 0x2C and not quoted:  # ','
            items.append(bytes(current))
            current = bytearray()
        else:
            current.append(byte)
    items.append(bytes(current))
    return items


def delta_seconds(value: Optional[bytes]) -> Optional[int]:
    """§1.2.2: a non-negative integer; anything else is invalid (None)."""
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit():
        return None
    return min(int(value), _DELTA_MAX)


def age_seconds(value: Optional[bytes]) -> Optional[int]:
    """The Age a response carries: 0 without one; None when invalid. §5.1: of a list
    (``Age: 7200, 0``, or two Age fields, joined as one) the first member counts."""
    if value is None:
        return 0
    return delta_seconds(value.split(b",", 1)[0])


_LOCATION_FIELDS = (b"location", b"content-location")


def invalidated_targets(
    method: bytes, status: int, target: bytes, host: bytes, scheme: bytes, response_headers: Sequence[Header]
) -> List[bytes]:
    """§4.4: the origin-form targets a response invalidates -- a non-error answer (2xx,
    3xx) to an unsafe method invalidates its target URI, and the Location and
    Content-Location URIs when they are of the same origin (a cache MUST NOT
    invalidate another origin's on the say-so of this one)."""
    if method in SAFE_METHODS or not 200 <= status < 400:
        return []
    targets = [target]
    for name, value in response_headers:
        if name in _LOCATION_FIELDS:
            other = same_origin_target(value, host, scheme, target)
            if other is not None and other not in targets:
                targets.append(other)
    return targets


def same_origin_target(reference: bytes, host: bytes, scheme: bytes, base: bytes) -> Optional[bytes]:
    """A URI reference (RFC 3986 §5, relative to ``base``) as an origin-form target, if
    it names the request's own origin; else None."""
    from urllib.parse import urljoin, urlsplit

    try:
        origin = scheme.decode("ascii") + "://" + host.decode("ascii")
        resolved = urlsplit(urljoin(origin + base.decode("latin-1"), reference.strip().decode("latin-1")))
        expected = urlsplit(origin)
    except (UnicodeDecodeError, ValueError):
        return None
    if (resolved.scheme, resolved.netloc.lower()) != (expected.scheme, expected.netloc.lower()):
        return None
    path = resolved.path or "/"
    return (path + ("?" + resolved.query if resolved.query else "")).encode("latin-1")


def field_values(headers: Sequence[Header], name: bytes) -> List[bytes]:
    return [v for n, v in headers if n == name]


def request_mode(headers: Sequence[Header]) -> str:
    """How a request may use the cache (§5.2.1, §5.4)."""
    cache_control: List[bytes] = []
    pragma_no_cache = False
    for name, value in headers:
        if name == b"cache-control":
            cache_control.append(value)
        elif name == b"range":
            return RANGE  # served from a stored full response, or fetched, never stored
        elif name == b"pragma" and b"no-cache" in value.lower():
            pragma_no_cache = True
    if not cache_control:
        # §5.4: Pragma: no-cache counts only when there is no Cache-Control.
        return REFETCH if pragma_no_cache else LOOKUP
    directives = parse_cache_control(cache_control)
    if b"no-store" in directives:  # §5.2.1.5
        return BYPASS
    if b"no-cache" in directives:  # §5.2.1.4
        return REFETCH
    if delta_seconds(directives.get(b"max-age", b"x")) == 0:  # §5.2.1.1: nothing older than 0 s
        return REFETCH
    return LOOKUP


def only_if_cached(headers: Sequence[Header]) -> bool:
    """§5.2.1.7: the client wants a stored response or nothing (then a 504)."""
    values = field_values(headers, b"cache-control")
    return bool(values) and b"only-if-cached" in parse_cache_control(values)


def request_max_age(headers: Sequence[Header]) -> Optional[int]:
    """§5.2.1.1: the client accepts nothing older than this."""
    values = field_values(headers, b"cache-control")
    if not values:
        return None
    return delta_seconds(parse_cache_control(values).get(b"max-age"))


class Freshness:
    """What storing a response was decided with (§4.2): its lifetime and stale windows."""

    __slots__ = ("lifetime", "initial_age", "stale_while_revalidate", "stale_if_error", "vary", "stream", "omit")

    def __init__(
        self,
        lifetime: float,
        initial_age: float,
        stale_while_revalidate: float,
        stale_if_error: float,
        vary: Tuple[bytes, ...],
        stream: bool = False,
        omit: FrozenSet[bytes] = frozenset(),
    ) -> None:
        self.stream = stream  # an event stream (stored only where a rule allows it)
        # Fields a qualified ``no-cache="..."`` or ``private="..."`` names: the rest
        # of the response is stored without them (§5.2.2.4, §5.2.2.7).
        self.omit = omit
        self.lifetime = lifetime
        self.initial_age = initial_age
        self.stale_while_revalidate = stale_while_revalidate
        self.stale_if_error = stale_if_error
        self.vary = vary


def vary_names(headers: Sequence[Header]) -> Optional[Tuple[bytes, ...]]:
    """The request fields a response varies on, lowercased; None for ``Vary: *``."""
    names: List[bytes] = []
    for value in field_values(headers, b"vary"):
        for item in value.split(b","):
            item = item.strip().lower()
            if item == b"*":
                return None  # §4.1: always fails to match
            if item and item not in names:
                names.append(item)
    return tuple(sorted(names))


def vary_values(request_headers: Sequence[Header], names: Tuple[bytes, ...]) -> Tuple[bytes, ...]:
    """§4.1: the request's values of the Vary-named fields, combined per field and
    with whitespace around the commas normalised, so equivalent lists compare equal."""
    values = []
    for name in names:
        parts = [p.strip() for v in field_values(request_headers, name) for p in v.split(b",")]
        values.append(b",".join(p for p in parts if p))
    return tuple(values)


class _ResponseFields:
    """The fields storage decisions read, gathered in one pass over the response head."""

    __slots__ = ("cache_control", "expires", "date", "age", "vary", "set_cookie", "content_type", "validator")

    def __init__(self, headers: Sequence[Header]) -> None:
        self.cache_control: List[bytes] = []
        self.vary: List[bytes] = []
        self.expires: Optional[bytes] = None
        self.date: Optional[bytes] = None
        self.age: Optional[bytes] = None
        self.set_cookie = False
        self.content_type: Optional[bytes] = None
        self.validator = False  # an ETag or Last-Modified: the entry can be revalidated (§4.3.1)
        for name, value in headers:
            if name in _INTERESTING:
                if name == b"cache-control":
                    self.cache_control.append(value)
                elif name == b"vary":
                    self.vary.append(value)
                elif name == b"set-cookie":
                    self.set_cookie = True
                elif name == b"expires":
                    if self.expires is None:
                        self.expires = value
                elif name == b"date":
                    if self.date is None:
                        self.date = value
                elif name == b"age":
                    if self.age is None:
                        self.age = value  # the first field: its first member counts (§5.1)
                elif name == b"etag" or name == b"last-modified":
                    self.validator = True
                elif self.content_type is None:
                    self.content_type = value


_INTERESTING = frozenset(
    {b"cache-control", b"vary", b"set-cookie", b"expires", b"date", b"age", b"content-type", b"etag", b"last-modified"}
)


def decide_storage(
    *,
    method: bytes,
    status: int,
    request_headers: Sequence[Header],
    response_headers: Sequence[Header],
    rule: Optional[Rule],
    now: float,
    request_time: Optional[float] = None,
) -> Tuple[Optional[Freshness], str]:
    """Whether a response may be stored by a shared cache, and with what freshness.

    Returns ``(Freshness, "")`` or ``(None, reason)``. ``rule`` is the operator's
    cache rule that matched the request, if any: it permits a method other than
    GET/HEAD, supplies a TTL where the response gives none, overrides a response's
    ``no-cache`` (then the rule's TTL applies), and -- because rule entries are
    keyed by the caller's credentials -- lifts the Authorization rule of §3.5.
    ``no-store``, ``private`` and Set-Cookie hold even under a rule. ``now`` is when
    the response arrived and ``request_time`` when its request was sent (§4.2.3).
    """
    if rule is None and method not in (b"GET", b"HEAD"):
        return None, "method not cacheable"  # §3: understood and cacheable methods only
    if status not in _STORABLE_STATUSES:
        return None, f"status {status} not stored"
    fields = _ResponseFields(response_headers)
    if rule is None and not fields.cache_control and fields.expires is None:
        return None, "no explicit freshness"  # the common case, settled in one pass
    request_cc_values = field_values(request_headers, b"cache-control")
    if request_cc_values and b"no-store" in parse_cache_control(request_cc_values):
        return None, "request no-store"  # §3, §5.2.1.5
    cc = parse_cache_control(fields.cache_control) if fields.cache_control else {}
    if b"no-store" in cc:
        return None, "response no-store"  # §5.2.2.5
    omit: FrozenSet[bytes] = frozenset()
    if b"private" in cc:
        named = _field_names(cc[b"private"])
        if not named:
            return None, "response private"  # §5.2.2.7: a shared cache must not store it
        omit = named  # the qualified form: only the named fields are private
    always_revalidate = False
    if b"no-cache" in cc and _field_names(cc[b"no-cache"]):
        # §5.2.2.4, the qualified form: the named fields must not be reused without
        # validation -- stored without them, the rest is used as its freshness allows.
        omit = omit | _field_names(cc[b"no-cache"])
        cc = {k: v for k, v in cc.items() if k != b"no-cache"}
    if b"no-cache" in cc:
        if rule is None:
            # §5.2.2.4: usable only after validation, on every request: stored as
            # stale from the start when it has a validator, else of no use.
            if not fields.validator:
                return None, "response no-cache without a validator"
            always_revalidate = True
        # An operator's rule says this route may be served from cache even so:
        # event streams in particular send no-cache as a matter of course.
        cc = {k: v for k, v in cc.items() if k not in (b"no-cache", b"max-age", b"s-maxage", b"must-revalidate")}
    if fields.set_cookie:
        return None, "response sets a cookie"
    names = vary_names([(b"vary", v) for v in fields.vary]) if fields.vary else ()
    if names is None:
        return None, "Vary: *"
    if rule is None and any(n == b"authorization" for n, _ in request_headers):
        # §3.5: a shared cache stores an answer to an authenticated request only if told it may.
        if not (b"must-revalidate" in cc or b"public" in cc or b"s-maxage" in cc):
            return None, "authenticated request"
    stream = fields.content_type is not None and _is_event_stream_type(fields.content_type)
    if stream and not (rule is not None and rule.stream):
        return None, "event stream (a rule may allow it with stream = true)"

    date = parse_http_date(fields.date) if fields.date is not None else None
    lifetime = _explicit_lifetime(cc, fields.expires, date, now)
    if always_revalidate:
        lifetime = 0.0  # stale from the start: every use is validated first
    if lifetime is None:
        if rule is None or not 200 <= status < 300:
            return None, "no explicit freshness"  # heuristic freshness is never used
        lifetime = rule.ttl
    # §4.2.3: the larger of what the Date implies and the Age the upstream sent
    # plus the time the response took to come (it aged on the way).
    age_value = age_seconds(fields.age)
    apparent_age = max(0.0, now - date) if date is not None else 0.0
    response_delay = max(0.0, now - request_time) if request_time is not None else 0.0
    initial_age = max(apparent_age, (age_value or 0) + response_delay)
    if age_value is None:  # §5.1: an invalid Age -- the response is stale
        initial_age = max(initial_age, float(lifetime))

    if b"must-revalidate" in cc or b"proxy-revalidate" in cc or b"s-maxage" in cc:
        swr = sie = 0.0  # §5.2.2.2, §5.2.2.8, §5.2.2.10: never served stale
    else:
        swr = _window(cc, b"stale-while-revalidate", rule.stale_while_revalidate if rule else 0.0)
        sie = _window(cc, b"stale-if-error", rule.stale_if_error if rule else 0.0)
    if always_revalidate:
        swr = sie = 0.0
    if lifetime - initial_age <= 0 and swr <= 0 and sie <= 0 and not fields.validator:
        return None, "already stale"  # with a validator it is kept, to be revalidated (§4.3)
    return Freshness(float(lifetime), initial_age, swr, sie, names, stream, omit), ""


def _field_names(argument: Optional[bytes]) -> FrozenSet[bytes]:
    """The field names a qualified ``no-cache`` or ``private`` lists, lowercased;
    empty for the unqualified directive."""
    if not argument:
        return frozenset()
    return frozenset(name.strip().lower() for name in argument.split(b",") if name.strip())


def _explicit_lifetime(
    cc: Directives, expires_value: Optional[bytes], date: Optional[float], now: float
) -> Optional[float]:
    """§4.2.1: s-maxage, else max-age, else Expires minus Date."""
    for directive in (b"s-maxage", b"max-age"):
        if directive in cc:
            seconds = delta_seconds(cc[directive])
            # An invalid value makes the response stale (§4.2.1, §5.2.2.1).
            return float(seconds) if seconds is not None else 0.0
    if expires_value is not None:
        expires = parse_http_date(expires_value)
        if expires is None:
            return 0.0  # §5.3: an invalid Expires means already expired
        return max(0.0, expires - (date if date is not None else now))
    return None


def _window(cc: Directives, directive: bytes, default: float) -> float:
    """RFC 5861 windows: the response's own value wins over the rule's."""
    if directive in cc:
        seconds = delta_seconds(cc[directive])
        return float(seconds) if seconds is not None else 0.0
    return default


def _is_event_stream_type(content_type: bytes) -> bool:
    return content_type.split(b";", 1)[0].strip().lower() == b"text/event-stream"
