"""Validation (RFC 9111 §4.3, RFC 9110 §13) as pure functions."""

from __future__ import annotations

import pytest

from pyproxy.cache.ranges import UNSATISFIABLE, single_byte_range
from pyproxy.cache.validation import (
    answers_not_modified,
    conditional_headers,
    freshened_headers,
    has_conditionals,
    not_modified_headers,
    weak_match,
)

STORED = [
    (b"content-type", b"text/plain"),
    (b"etag", b'"abc"'),
    (b"last-modified", b"Sun, 06 Nov 1994 08:49:37 GMT"),
    (b"cache-control", b"max-age=10"),
    (b"x-meta", b"1"),
    (b"x-meta", b"2"),
]


def test_the_conditional_request_carries_both_validators() -> None:
    """§4.3.1: the entity tag in If-None-Match, Last-Modified in If-Modified-Since."""
    assert conditional_headers(STORED) == [
        (b"if-none-match", b'"abc"'),
        (b"if-modified-since", b"Sun, 06 Nov 1994 08:49:37 GMT"),
    ]
    assert conditional_headers([(b"etag", b'W/"x"')]) == [(b"if-none-match", b'W/"x"')]
    assert conditional_headers([(b"content-type", b"text/plain")]) == []


@pytest.mark.parametrize(
    "request_headers, expected",
    [
        ([(b"if-none-match", b'"abc"')], []),  # the client's list names the stored tag: kept as it is
        ([(b"if-none-match", b'"x", W/"abc"')], []),
        ([(b"if-none-match", b'"x"')], None),  # a 304 for "x" says nothing of the stored one
        ([(b"if-none-match", b"*")], None),
        ([(b"if-modified-since", b"Mon, 07 Nov 1994 08:49:37 GMT")], [(b"if-none-match", b'"abc"')]),
        ([(b"if-match", b'"abc"')], None),  # asks for a 412, not a 304
        ([(b"if-range", b'"abc"')], None),
    ],
)
def test_a_clients_own_validators_merge_only_where_a_304_still_vouches_for_the_stored(
    request_headers: list, expected: object
) -> None:
    assert conditional_headers(STORED, request_headers) == expected
    only_date = [(b"last-modified", b"Sun, 06 Nov 1994 08:49:37 GMT")]
    assert conditional_headers(only_date, [(b"if-modified-since", b"Mon, 07 Nov 1994 08:49:37 GMT")]) is None


def test_a_304_replaces_the_fields_it_carries_but_not_the_framing() -> None:
    """§3.2: each field of the 304 replaces the stored values of that name."""
    merged = freshened_headers(
        STORED,
        [(b"cache-control", b"max-age=60"), (b"x-meta", b"3"), (b"content-length", b"0"), (b"x-new", b"y")],
    )
    assert (b"cache-control", b"max-age=60") in merged and (b"cache-control", b"max-age=10") not in merged
    assert [v for n, v in merged if n == b"x-meta"] == [b"3"]  # all the old values go
    assert (b"x-new", b"y") in merged and (b"etag", b'"abc"') in merged
    assert not any(n == b"content-length" for n, _ in merged)  # the stored body's own


@pytest.mark.parametrize(
    "tags, etag, expected",
    [
        (b'"abc"', b'"abc"', True),
        (b'W/"abc"', b'"abc"', True),  # weak comparison (§13.1.2 / §8.8.3.2)
        (b'"abc"', b'W/"abc"', True),
        (b'"x", "abc"', b'"abc"', True),
        (b'"a,bc"', b'"a,bc"', True),  # a comma inside the quotes is the tag's
        (b'"a,bc"', b'"bc"', False),
        (b"*", b'"anything"', True),
        (b'"abd"', b'"abc"', False),
        (b'"ABC"', b'"abc"', False),  # octet by octet
    ],
)
def test_if_none_match_uses_the_weak_comparison(tags: bytes, etag: bytes, expected: bool) -> None:
    assert weak_match(tags, etag) is expected


@pytest.mark.parametrize(
    "method, request_headers, expected",
    [
        (b"GET", [(b"if-none-match", b'"abc"')], True),
        (b"HEAD", [(b"if-none-match", b'W/"abc"')], True),
        (b"GET", [(b"if-none-match", b'"other"')], False),
        (b"GET", [(b"if-modified-since", b"Sun, 06 Nov 1994 08:49:37 GMT")], True),  # not modified since
        (b"GET", [(b"if-modified-since", b"Sat, 05 Nov 1994 08:49:37 GMT")], False),
        (b"GET", [(b"if-modified-since", b"yesterday")], False),  # an invalid date is ignored
        # If-None-Match decides when present (RFC 9110 §13.2.2)
        (b"GET", [(b"if-none-match", b'"other"'), (b"if-modified-since", b"Mon, 07 Nov 1994 08:49:37 GMT")], False),
        (b"POST", [(b"if-none-match", b'"abc"')], False),
        (b"GET", [], False),
    ],
)
def test_when_a_fresh_entry_answers_304(method: bytes, request_headers: list, expected: bool) -> None:
    assert answers_not_modified(method, request_headers, STORED) is expected
    assert has_conditionals(request_headers) is bool(request_headers)


def test_without_last_modified_the_stored_date_answers_if_modified_since() -> None:
    """§4.3.2: the Date of a stored response with no Last-Modified stands in for it."""
    dated = [(b"date", b"Sun, 06 Nov 1994 08:49:37 GMT"), (b"cache-control", b"max-age=10")]
    assert answers_not_modified(b"GET", [(b"if-modified-since", b"Sun, 06 Nov 1994 08:49:37 GMT")], dated)
    assert not answers_not_modified(b"GET", [(b"if-modified-since", b"Sat, 05 Nov 1994 08:49:37 GMT")], dated)
    undated = [(b"cache-control", b"max-age=10")]
    assert not answers_not_modified(b"GET", [(b"if-modified-since", b"Sun, 06 Nov 1994 08:49:37 GMT")], undated)


def test_a_304_from_the_cache_carries_what_a_200_would_have_of_its_fields() -> None:
    """RFC 9110 §15.4.5."""
    assert not_modified_headers(STORED) == [(b"etag", b'"abc"'), (b"cache-control", b"max-age=10")]


@pytest.mark.parametrize(
    "value, expected",
    [
        (b"bytes=0-3", (0, 3)),
        (b"bytes=5-", (5, 9)),
        (b"bytes=-3", (7, 9)),  # the last three
        (b"bytes=-30", (0, 9)),  # more than there is: all of it
        (b"bytes=2-100", (2, 9)),  # a last beyond the end is the end (RFC 9110 §14.1.2)
        (b"Bytes = 1-1", (1, 1)),
        (b"bytes=10-", UNSATISFIABLE),  # starts past the end: 416
        (b"bytes=-0", UNSATISFIABLE),
        (b"bytes=0-1,4-5", None),  # several ranges: left to the upstream
        (b"bytes=5-2", None),  # invalid: ignored
        (b"items=0-3", None),  # another unit
        (b"bytes=-", None),
        (b"bytes=a-b", None),
    ],
)
def test_one_byte_range_of_a_stored_body_of_ten(value: bytes, expected: object) -> None:
    assert single_byte_range(value, 10) == expected
