"""Whatever an upstream or a client sends in these headers, the cache and gzip
decisions answer without raising (an exception here would fail a request)."""

from __future__ import annotations

import os
from typing import List, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st

from pyproxy.cache.policy import decide_storage, parse_http_date, request_mode, vary_names, vary_values
from pyproxy.http.compression import accepts_gzip, gzip_headers, is_compressible_type
from pyproxy.rules import DEFAULT_CACHE_RULES

EXAMPLES = int(os.environ.get("PYPROXY_FUZZ_EXAMPLES", "300"))

NAMES = st.sampled_from(
    [b"cache-control", b"expires", b"date", b"age", b"vary", b"set-cookie", b"content-type", b"pragma",
     b"range", b"authorization", b"accept-encoding", b"etag", b"accept-language", b"x-other"]
)  # fmt: skip
VALUES = st.one_of(
    st.binary(max_size=40),
    st.sampled_from(
        [b"max-age=60", b"s-maxage=1", b"no-store", b"private", b"no-cache", b'no-cache="a,b"', b"max-age=",
         b"max-age=99999999999999999999999", b"stale-while-revalidate=x", b"*", b"gzip;q=0", b"gzip;q=abc",
         b"Sun, 06 Nov 1994 08:49:37 GMT", b"Sun, 99 Nov 1994 08:49:37 GMT", b"Sun, 06 Xyz 1994 08:49:37 GMT",
         b"text/event-stream", b"application/json; charset=utf-8", b"0", b"-1", b'"', b",,,"]
    ),
)  # fmt: skip
HEADERS = st.lists(st.tuples(NAMES, VALUES), max_size=8)
Headers = List[Tuple[bytes, bytes]]


@settings(max_examples=EXAMPLES, deadline=None)
@given(request_headers=HEADERS, response_headers=HEADERS, status=st.integers(100, 599), ruled=st.booleans())
def test_storage_decision_never_raises(
    request_headers: Headers, response_headers: Headers, status: int, ruled: bool
) -> None:
    freshness, why = decide_storage(
        method=b"GET",
        status=status,
        request_headers=request_headers,
        response_headers=response_headers,
        rule=DEFAULT_CACHE_RULES[0] if ruled else None,
        now=1.7e9,
    )
    assert (freshness is None) == bool(why)
    if freshness is not None:
        assert freshness.lifetime >= 0 and freshness.initial_age >= 0
    request_mode(request_headers)
    names = vary_names(response_headers)
    if names is not None:
        vary_values(request_headers, names)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=40))
def test_http_dates_never_raise(value: bytes) -> None:
    parsed = parse_http_date(value)
    assert parsed is None or isinstance(parsed, float)


@settings(max_examples=EXAMPLES, deadline=None)
@given(request_headers=HEADERS, response_headers=HEADERS)
def test_gzip_decisions_never_raise(request_headers: Headers, response_headers: Headers) -> None:
    accepts_gzip(request_headers)
    for name, value in response_headers:
        if name == b"content-type":
            is_compressible_type(value)
    out = gzip_headers(response_headers)
    assert (b"content-encoding", b"gzip") in out and all(n != b"content-length" for n, _ in out)
