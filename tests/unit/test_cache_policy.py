"""RFC 9111 storage and freshness rules, each must / must-not as a row of a table."""

from __future__ import annotations

import gzip
import json
from email.utils import formatdate
from typing import List, Optional, Tuple

import pytest

from pyproxy.cache import policy
from pyproxy.cache.entry import (
    EXPIRED,
    FRESH,
    STALE_IF_ERROR,
    STALE_WHILE_REVALIDATE,
    CachedResponse,
    split_events,
)
from pyproxy.cache.policy import decide_storage, parse_cache_control, request_mode
from pyproxy.rules import Rule

NOW = 1_700_000_000.0
H = List[Tuple[bytes, bytes]]


def date(offset: float) -> bytes:
    return formatdate(NOW + offset, usegmt=True).encode()


RULE = Rule(methods=frozenset({b"GET", b"POST"}), path=b"/r", prefix=False, name="r", ttl=30.0)
STREAM_RULE = Rule(methods=frozenset({b"GET"}), path=b"/r", prefix=False, name="r", ttl=30.0, stream=True)

# (id, method, status, request headers, response headers, rule, expected lifetime or None, reason fragment)
STORAGE_CASES = [
    ("max-age", b"GET", 200, [], [(b"cache-control", b"max-age=60")], None, 60.0, ""),
    (
        "s-maxage wins over max-age (§5.2.2.10)",
        b"GET",
        200,
        [],
        [(b"cache-control", b"max-age=5, s-maxage=50")],
        None,
        50.0,
        "",
    ),
    ("Expires minus Date (§4.2.1)", b"GET", 200, [], [(b"date", date(0)), (b"expires", date(120))], None, 120.0, ""),
    (
        "max-age beats Expires (§5.3)",
        b"GET",
        200,
        [],
        [(b"cache-control", b"max-age=10"), (b"expires", date(999))],
        None,
        10.0,
        "",
    ),
    ("invalid Expires is expired (§5.3)", b"GET", 200, [], [(b"expires", b"0")], None, None, "already stale"),
    # §5.3 with RFC 9110 §5.6.7: only the three date grammars are dates; the rest is
    # invalid, so expired -- however plausible a lenient parser finds it.
    *[
        (
            f"Expires {bad!r} is invalid, so expired (§5.3)",
            b"GET",
            200,
            [],
            [(b"expires", bad)],
            None,
            None,
            "already stale",
        )
        for bad in (
            date(3600).replace(b"GMT", b"UTC"),  # another zone
            date(3600)[:12] + date(3600)[14:],  # a two-digit year
            date(3600).replace(b",", b""),  # no comma
            date(3600)[:7] + b"-" + date(3600)[8:11] + b"-" + date(3600)[12:],  # dashes
            date(3600).replace(b":", b"."),  # . between the time's fields
        )
    ],
    (
        "no-cache with a validator: stored, stale from the start, to be revalidated (§5.2.2.4, §4.3)",
        b"GET",
        200,
        [],
        [(b"cache-control", b"no-cache, max-age=60"), (b"etag", b'"v"')],
        None,
        0.0,
        "",
    ),
    (
        "already stale with a validator: kept, to be revalidated (§4.3)",
        b"GET",
        200,
        [],
        [(b"cache-control", b"max-age=5"), (b"age", b"10"), (b"last-modified", date(-99))],
        None,
        5.0,
        "",
    ),
    (
        "Age with a list: the first member counts (§5.1)",
        b"GET",
        200,
        [],
        [(b"cache-control", b"max-age=3600"), (b"age", b"7200, 0")],
        None,
        None,
        "already stale",
    ),
    (
        "an invalid Age makes the response stale (§5.1)",
        b"GET",
        200,
        [],
        [(b"cache-control", b"max-age=3600"), (b"age", b"soon")],
        None,
        None,
        "already stale",
    ),
    (
        "no explicit freshness: no heuristics",
        b"GET",
        200,
        [],
        [(b"last-modified", date(-9999))],
        None,
        None,
        "no explicit freshness",
    ),
    ("HEAD is cacheable", b"HEAD", 200, [], [(b"cache-control", b"max-age=5")], None, 5.0, ""),
    ("POST without a rule (§3)", b"POST", 200, [], [(b"cache-control", b"max-age=60")], None, None, "method"),
    (
        "response no-store (§5.2.2.5)",
        b"GET",
        200,
        [],
        [(b"cache-control", b"max-age=60, no-store")],
        None,
        None,
        "no-store",
    ),
    (
        "request no-store (§5.2.1.5)",
        b"GET",
        200,
        [(b"cache-control", b"no-store")],
        [(b"cache-control", b"max-age=60")],
        None,
        None,
        "no-store",
    ),
    (
        "private: not in a shared cache (§5.2.2.7)",
        b"GET",
        200,
        [],
        [(b"cache-control", b"private, max-age=60")],
        None,
        None,
        "private",
    ),
    (
        "response no-cache: never reusable unvalidated (§5.2.2.4)",
        b"GET",
        200,
        [],
        [(b"cache-control", b"no-cache, max-age=60")],
        None,
        None,
        "no-cache",
    ),
    (
        "response no-cache under a rule: the rule's TTL",
        b"GET",
        200,
        [],
        [(b"cache-control", b"no-cache, max-age=0")],
        RULE,
        30.0,
        "",
    ),
    ("no-store holds even under a rule", b"GET", 200, [], [(b"cache-control", b"no-store")], RULE, None, "no-store"),
    ("private holds even under a rule", b"GET", 200, [], [(b"cache-control", b"private")], RULE, None, "private"),
    ("Set-Cookie", b"GET", 200, [], [(b"cache-control", b"max-age=60"), (b"set-cookie", b"a=b")], None, None, "cookie"),
    (
        "Vary: * (§4.1)",
        b"GET",
        200,
        [],
        [(b"cache-control", b"max-age=60"), (b"vary", b"Accept, *")],
        None,
        None,
        "Vary",
    ),
    (
        "Authorization without permission (§3.5)",
        b"GET",
        200,
        [(b"authorization", b"Bearer k")],
        [(b"cache-control", b"max-age=60")],
        None,
        None,
        "authenticated",
    ),
    (
        "Authorization with public (§3.5)",
        b"GET",
        200,
        [(b"authorization", b"Bearer k")],
        [(b"cache-control", b"public, max-age=60")],
        None,
        60.0,
        "",
    ),
    (
        "Authorization with s-maxage (§3.5)",
        b"GET",
        200,
        [(b"authorization", b"Bearer k")],
        [(b"cache-control", b"s-maxage=7")],
        None,
        7.0,
        "",
    ),
    (
        "Authorization with must-revalidate (§3.5)",
        b"GET",
        200,
        [(b"authorization", b"Bearer k")],
        [(b"cache-control", b"must-revalidate, max-age=9")],
        None,
        9.0,
        "",
    ),
    (
        "Authorization under a rule: keyed per caller",
        b"GET",
        200,
        [(b"authorization", b"Bearer k")],
        [],
        RULE,
        30.0,
        "",
    ),
    ("404 with explicit freshness", b"GET", 404, [], [(b"cache-control", b"max-age=60")], None, 60.0, ""),
    ("404 without explicit freshness, even with a rule", b"GET", 404, [], [], RULE, None, "no explicit freshness"),
    ("503 without explicit freshness", b"GET", 503, [], [], RULE, None, "no explicit freshness"),
    ("206 never", b"GET", 206, [], [(b"cache-control", b"max-age=60")], None, None, "status"),
    ("rule TTL for a response without cache headers", b"POST", 200, [], [], RULE, 30.0, ""),
    ("response freshness wins over the rule's", b"GET", 200, [], [(b"cache-control", b"max-age=3")], RULE, 3.0, ""),
    ("max-age=0 and no stale window", b"GET", 200, [], [(b"cache-control", b"max-age=0")], RULE, None, "already stale"),
    (
        "invalid max-age is stale (§4.2.1)",
        b"GET",
        200,
        [],
        [(b"cache-control", b"max-age=soon")],
        None,
        None,
        "already stale",
    ),
    (
        "event stream without stream = true",
        b"GET",
        200,
        [],
        [(b"content-type", b"text/event-stream")],
        RULE,
        None,
        "event stream",
    ),
    (
        'qualified no-cache="a": the rest is stored, fresh (§5.2.2.4)',
        b"GET",
        200,
        [],
        [(b"cache-control", b'no-cache="a"'), (b"a", b"1"), (b"cache-control", b"max-age=3600")],
        None,
        3600.0,
        "",
    ),
    (
        'qualified private="a": the rest is stored by a shared cache (§5.2.2.7)',
        b"GET",
        200,
        [],
        [(b"cache-control", b'private="a", max-age=60')],
        None,
        60.0,
        "",
    ),
    (
        "event stream with stream = true",
        b"GET",
        200,
        [],
        [(b"content-type", b"text/event-stream; charset=utf-8")],
        STREAM_RULE,
        30.0,
        "",
    ),
]


@pytest.mark.parametrize("case", STORAGE_CASES, ids=[c[0] for c in STORAGE_CASES])
def test_storage_rules(case: tuple) -> None:
    _, method, status, req, resp, rule, lifetime, reason = case
    freshness, why = decide_storage(
        method=method, status=status, request_headers=req, response_headers=resp, rule=rule, now=NOW
    )
    if lifetime is None:
        assert freshness is None and reason in why
    else:
        assert freshness is not None, why
        assert freshness.lifetime == lifetime


def test_qualified_no_cache_and_private_name_the_fields_left_out() -> None:
    """§5.2.2.4, §5.2.2.7: the listed fields (case-insensitive, one list or several
    directives) are what the stored response goes without."""
    freshness, why = decide_storage(
        method=b"GET",
        status=200,
        request_headers=[],
        response_headers=[(b"cache-control", b'no-cache="A, b", max-age=60, private="X-Secret"')],
        rule=None,
        now=NOW,
    )
    assert freshness is not None, why
    assert freshness.omit == {b"a", b"b", b"x-secret"}
    unqualified, _ = decide_storage(
        method=b"GET",
        status=200,
        request_headers=[],
        response_headers=[(b"cache-control", b"max-age=60")],
        rule=None,
        now=NOW,
    )
    assert unqualified is not None and not unqualified.omit


@pytest.mark.parametrize(
    "age, date_offset, request_delay, expected",
    [
        (b"10", -25, None, 25.0),  # the Date says more than the Age
        (b"40", 0, None, 40.0),  # the Age says more than the Date
        # The response took 6 s to come: the Age it carried is 6 s older on
        # arrival (corrected_age_value), and beats an apparent age of 0 s.
        (b"40", 0, 6, 46.0),
        (None, 0, 6, 6.0),  # without an Age the delay still counts...
        (None, -25, 6, 25.0),  # ...but an older Date wins when it says more
    ],
)
def test_initial_age_is_the_larger_of_corrected_age_and_apparent_age(
    age: Optional[bytes], date_offset: int, request_delay: Optional[int], expected: float
) -> None:
    """§4.2.3: corrected_initial_age = max(apparent_age, age_value + response_delay)."""
    headers = [(b"cache-control", b"max-age=60"), (b"date", date(date_offset))]
    if age is not None:
        headers.append((b"age", age))
    f, _ = decide_storage(
        method=b"GET",
        status=200,
        request_headers=[],
        response_headers=headers,
        rule=None,
        now=NOW,
        request_time=None if request_delay is None else NOW - request_delay,
    )
    assert f is not None and f.initial_age == expected


def test_stale_windows_from_response_or_rule_and_never_with_must_revalidate() -> None:
    swr_rule = Rule(
        methods=frozenset({b"GET"}), path=b"/", prefix=False, name="", ttl=5, stale_while_revalidate=7, stale_if_error=9
    )
    f, _ = decide_storage(method=b"GET", status=200, request_headers=[], response_headers=[], rule=swr_rule, now=NOW)
    assert f is not None and (f.stale_while_revalidate, f.stale_if_error) == (7.0, 9.0)
    f, _ = decide_storage(
        method=b"GET",
        status=200,
        request_headers=[],
        response_headers=[(b"cache-control", b"max-age=5, stale-while-revalidate=1, stale-if-error=2")],
        rule=swr_rule,
        now=NOW,
    )
    assert f is not None and (f.stale_while_revalidate, f.stale_if_error) == (1.0, 2.0)
    for cc in (b"max-age=5, must-revalidate", b"max-age=5, proxy-revalidate", b"s-maxage=5"):
        f, _ = decide_storage(
            method=b"GET",
            status=200,
            request_headers=[],
            response_headers=[(b"cache-control", cc)],
            rule=swr_rule,
            now=NOW,
        )
        assert f is not None and (f.stale_while_revalidate, f.stale_if_error) == (0.0, 0.0), cc


@pytest.mark.parametrize(
    "headers, mode",
    [
        ([], policy.LOOKUP),
        ([(b"cache-control", b"no-cache")], policy.REFETCH),
        ([(b"cache-control", b"max-age=0")], policy.REFETCH),
        ([(b"cache-control", b"max-age=30")], policy.LOOKUP),
        ([(b"cache-control", b"no-store")], policy.BYPASS),
        ([(b"cache-control", b"No-Cache, no-store")], policy.BYPASS),
        ([(b"pragma", b"no-cache")], policy.REFETCH),  # §5.4: only without Cache-Control
        ([(b"pragma", b"no-cache"), (b"cache-control", b"max-age=30")], policy.LOOKUP),
        ([(b"range", b"bytes=0-10")], policy.RANGE),  # §3.4: served from a stored full response
    ],
)
def test_request_modes(headers: H, mode: str) -> None:
    assert request_mode(headers) == mode


def test_cache_control_parsing() -> None:
    # No whitespace around "=" (§5.2): such a directive is not the one it looks like.
    assert parse_cache_control([b"max-age =100, public"]) == {b"public": None}
    assert parse_cache_control([b"max-age= 100"]) == {}
    assert parse_cache_control([b'ext="max-age=100", max-age=1']) == {b"ext": b"max-age=100", b"max-age": b"1"}
    cc = parse_cache_control([b'max-age=5, no-cache="set-cookie, x", Private', b's-maxage="9"'])
    assert cc == {b"max-age": b"5", b"no-cache": b"set-cookie, x", b"private": None, b"s-maxage": b"9"}
    assert policy.delta_seconds(b"99999999999999") == 2**31  # §1.2.2
    assert policy.delta_seconds(b"-1") is None and policy.delta_seconds(b"1.5") is None


def test_http_date_forms() -> None:
    # RFC 9110 §5.6.7: IMF-fixdate, and the obsolete RFC 850 and asctime forms.
    expected = 784111777.0
    assert policy.parse_http_date(b"Sun, 06 Nov 1994 08:49:37 GMT") == expected
    assert policy.parse_http_date(b"Sunday, 06-Nov-94 08:49:37 GMT") == expected
    assert policy.parse_http_date(b"Sun Nov  6 08:49:37 1994") == expected
    assert policy.parse_http_date(b"yesterday") is None


def test_vary_values_normalise_list_whitespace() -> None:
    names = policy.vary_names([(b"vary", b"Accept-Encoding, accept"), (b"vary", b"X-Tenant")])
    assert names == (b"accept", b"accept-encoding", b"x-tenant")
    a = policy.vary_values([(b"accept-encoding", b"gzip,  br"), (b"accept", b"*/*")], names)
    b = policy.vary_values([(b"accept", b"*/*"), (b"accept-encoding", b"gzip"), (b"accept-encoding", b"br")], names)
    assert a == b
    assert policy.vary_values([(b"accept", b"text/html")], names) != a


JSON_HEADERS: H = [(b"content-type", b"application/json")]


def make_entry(headers: H = JSON_HEADERS, body: bytes = b'{"a":1}', **kw: object) -> CachedResponse:
    args = dict(
        stream=False,
        stored_at=NOW,
        lifetime=10.0,
        initial_age=2.0,
        stale_while_revalidate=5.0,
        stale_if_error=20.0,
        vary_names=(b"accept",),
        vary_values=(b"*/*",),
    )
    args.update(kw)
    return CachedResponse(200, b"OK", list(headers), body, **args)  # type: ignore[arg-type]


def test_entry_states_follow_age() -> None:
    entry = make_entry()
    assert entry.state(NOW) == FRESH and entry.age(NOW + 3) == 5.0
    assert entry.state(NOW + 8) == STALE_WHILE_REVALIDATE  # age 10: just stale
    assert entry.state(NOW + 14) == STALE_IF_ERROR
    assert entry.state(NOW + 28) == EXPIRED and entry.remaining(NOW + 28) <= 0


def test_entry_wire_format_and_round_trip() -> None:
    entry = make_entry()
    head = entry.response_head(b"HIT", 7, close=True)
    assert head.startswith(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 7\r\n")
    assert head.endswith(b"x-cache: HIT\r\nage: 7\r\nconnection: close\r\n\r\n")
    copy = CachedResponse.from_bytes(entry.to_bytes())
    assert copy is not None
    for name in CachedResponse.__slots__:
        if name != "_head":  # built lazily, on the first hit
            assert getattr(copy, name) == getattr(entry, name), name
    assert copy.response_head(b"HIT", 7, close=True) == head
    assert CachedResponse.from_bytes(b"garbage") is None
    assert CachedResponse.from_bytes(b"PPC1\x00\x00\x00\x05{nope") is None


def test_a_shared_entry_carries_its_gzip_form() -> None:
    """Written with its gzip form, an entry read back has it without compressing again."""
    body = json.dumps({"data": [{"id": f"model-{i}"} for i in range(200)]}).encode()
    entry = make_entry(body=body)
    variant = entry.gzipped(5, 1000)
    assert variant is not None and gzip.decompress(variant[1]) == body
    copy = CachedResponse.from_bytes(entry.to_bytes())
    assert copy is not None and copy.body == body
    size = copy.size
    assert copy.gzipped(9, 1000) == variant  # level 9 would differ: it is the stored form
    assert copy.size == size
    # An entry written without one still round-trips, and decides for itself.
    plain = CachedResponse.from_bytes(make_entry(body=body).to_bytes())
    assert plain is not None and plain.body == body and plain.gzipped(5, 1000) == variant
    # A meta that claims more gzip bytes than there are is not an entry.
    wire = entry.to_bytes()
    assert CachedResponse.from_bytes(wire.replace(b'"gzip":%d' % len(variant[1]), b'"gzip":99999999')) is None


def test_event_stream_entries_keep_event_boundaries() -> None:
    body = b"data: a\n\ndata: b\r\n\r\nid: 3\ndata: c\n\n"
    assert split_events(body) == [b"data: a\n\n", b"data: b\r\n\r\n", b"id: 3\ndata: c\n\n"]
    entry = make_entry([(b"content-type", b"text/event-stream")], body, stream=True)
    assert entry.wire == b"9\r\ndata: a\n\n\r\nb\r\ndata: b\r\n\r\n\r\nf\r\nid: 3\ndata: c\n\n\r\n0\r\n\r\n"
    assert b"transfer-encoding: chunked" in entry.response_head(b"HIT", 0, close=False)


@pytest.mark.parametrize(
    "method, status, headers, expected",
    [
        (b"POST", 201, [], [b"/a/b?x=1"]),  # §4.4: the target URI
        (b"DELETE", 204, [], [b"/a/b?x=1"]),
        (b"MKCOL", 200, [], [b"/a/b?x=1"]),  # a method not known to be safe
        (b"POST", 303, [], [b"/a/b?x=1"]),  # 3xx is not an error
        (b"POST", 404, [], []),  # an error invalidates nothing
        (b"POST", 500, [], []),
        (b"GET", 200, [], []),  # safe methods (RFC 9110 §9.2.1)
        (b"OPTIONS", 200, [], []),
        (b"PUT", 201, [(b"location", b"/c")], [b"/a/b?x=1", b"/c"]),
        (b"PUT", 201, [(b"content-location", b"c?y=2")], [b"/a/b?x=1", b"/a/c?y=2"]),  # relative
        (b"PUT", 201, [(b"location", b"http://Proxy.Test/d")], [b"/a/b?x=1", b"/d"]),  # host case-blind
        (b"PUT", 201, [(b"location", b"http://other.test/d")], [b"/a/b?x=1"]),  # another origin
        (b"PUT", 201, [(b"location", b"https://proxy.test/d")], [b"/a/b?x=1"]),  # another scheme
        (b"PUT", 201, [(b"location", b"/a/b?x=1")], [b"/a/b?x=1"]),  # once
    ],
)
def test_invalidation_after_unsafe_methods(method: bytes, status: int, headers: list, expected: list) -> None:
    assert policy.invalidated_targets(method, status, b"/a/b?x=1", b"proxy.test", b"http", headers) == expected
