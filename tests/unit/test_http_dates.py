"""HTTP dates (RFC 9110 §5.6.7): the three grammars exactly, and nothing else.

An invalid ``Expires`` means "already expired" (RFC 9111 §5.3), so whatever a
lenient parser would guess at must come out as invalid here.
"""

from __future__ import annotations

import calendar
import time
from email.utils import formatdate

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyproxy.http.dates import parse_http_date

NOV_6_1994 = 784111777.0  # Sun, 06 Nov 1994 08:49:37 GMT


@pytest.mark.parametrize(
    "value, expected",
    [
        (b"Sun, 06 Nov 1994 08:49:37 GMT", NOV_6_1994),  # IMF-fixdate
        (b"Sunday, 06-Nov-94 08:49:37 GMT", NOV_6_1994),  # obsolete RFC 850
        (b"Sun Nov  6 08:49:37 1994", NOV_6_1994),  # asctime, one-digit day with a space
        (b"Sun Nov 06 08:49:37 1994", NOV_6_1994),  # asctime, two digits
        (b"Thu, 01 Jan 1970 00:00:00 GMT", 0.0),
        (b"Sat, 29 Feb 2020 23:59:59 GMT", float(calendar.timegm((2020, 2, 29, 23, 59, 59)))),
        (b"Wed, 31 Dec 2036 23:59:60 GMT", float(calendar.timegm((2037, 1, 1, 0, 0, 0)))),  # a leap second
        (b"Mon, 06 Nov 1994 08:49:37 GMT", NOV_6_1994),  # a wrong day name is still the grammar
    ],
)
def test_the_three_grammars_parse(value: bytes, expected: float) -> None:
    assert parse_http_date(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        b"0",  # the classic "already expired"
        b"-1",
        b"",
        b"yesterday",
        b"Sun, 06 Nov 1994 08:49:37 UTC",  # another zone name
        b"Sun, 06 Nov 1994 08:49:37 +0000",  # a numeric zone
        b"Sun, 06 Nov 1994 08:49:37",  # no zone
        b"Sun, 06 Nov 94 08:49:37 GMT",  # a two-digit year outside RFC 850
        b"Sun 06 Nov 1994 08:49:37 GMT",  # no comma
        b"Sun, 06-Nov-1994 08:49:37 GMT",  # dashes in the IMF form
        b"Sun, 06 Nov 1994 08.49.37 GMT",  # . between the time's fields
        b"Sun, 06 Nov 1994 8:49:37 GMT",  # a one-digit hour
        b"Sun, 6 Nov 1994 08:49:37 GMT",  # a one-digit day in the IMF form
        b"Sun,  06 Nov 1994 08:49:37 GMT",  # two spaces
        b" Sun, 06 Nov 1994 08:49:37 GMT",  # leading whitespace
        b"Sun, 06 Nov 1994 08:49:37 GMT ",  # trailing whitespace
        b"sun, 06 nov 1994 08:49:37 gmt",  # the names are case-sensitive (%s"...")
        b"Sunday, 06 Nov 1994 08:49:37 GMT",  # a long day name in the IMF form
        b"Sun, 06-Nov-94 08:49:37 GMT",  # a short day name in the RFC 850 form
        b"Sun, 30 Feb 1994 08:49:37 GMT",  # no such day
        b"Sun, 06 Nov 1994 24:00:00 GMT",  # hour 24
        b"Sun, 06 Nov 1994 08:60:00 GMT",  # minute 60
        b"Sun, 06 Nov 1994 08:49:61 GMT",  # second 61
        b"Sun, 06 Foo 1994 08:49:37 GMT",
        b"Sun Nov 6 08:49:37 1994",  # asctime needs two places for the day
        b"Sun Nov  6 08:49:37 94",
        b"1994-11-06T08:49:37Z",  # ISO 8601 is not an HTTP-date
        b"Sun, \xff6 Nov 1994 08:49:37 GMT",
    ],
)
def test_everything_else_is_invalid(value: bytes) -> None:
    assert parse_http_date(value) is None


def test_an_rfc850_year_more_than_50_years_ahead_is_in_the_past_century() -> None:
    """§5.6.7: it means the most recent past year with the same last two digits."""
    now = float(calendar.timegm((2026, 6, 1, 0, 0, 0)))
    assert time.gmtime(parse_http_date(b"Friday, 01-Jan-76 00:00:00 GMT", now)).tm_year == 2076
    assert time.gmtime(parse_http_date(b"Thursday, 01-Jan-77 00:00:00 GMT", now)).tm_year == 1977
    assert time.gmtime(parse_http_date(b"Tuesday, 01-Jan-26 00:00:00 GMT", now)).tm_year == 2026


_MONTH_NAMES = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()


def _renderings(epoch: float) -> set:
    """The three forms of one instant, without the day name (which is not checked),
    written out field by field (strftime does not pad a year before 1000)."""
    t = time.gmtime(epoch)
    day, month, year = t.tm_mday, _MONTH_NAMES[t.tm_mon - 1], t.tm_year
    clock = f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
    return {
        f"{day:02d} {month} {year:04d} {clock} GMT",  # IMF-fixdate
        f"{day:02d}-{month}-{year % 100:02d} {clock} GMT",  # RFC 850
        f"{month} {day:2d} {clock} {year:04d}",  # asctime, day = SP DIGIT
        f"{month} {day:02d} {clock} {year:04d}",  # asctime, day = 2DIGIT
    }


_ALPHABET = "SunMoTeWdhFriaJFbMrApyJlgOcNvDe0123456789 ,:-.GMTUC+"


@settings(max_examples=1500, deadline=None)
@given(
    st.integers(min_value=0, max_value=4102444800),  # 1970 .. 2100
    st.lists(st.tuples(st.integers(min_value=0, max_value=40), st.sampled_from(_ALPHABET)), max_size=3),
    st.sampled_from(["imf", "rfc850", "asctime"]),
)
def test_a_mutated_date_parses_only_if_it_is_still_one_of_the_grammars(epoch: int, edits: list, form: str) -> None:
    t = time.gmtime(epoch)
    if form == "imf":
        text = formatdate(epoch, usegmt=True)
    elif form == "rfc850":
        text = time.strftime("%A, %d-%b-%y %H:%M:%S GMT", t)
    else:
        text = time.strftime("%a %b ", t) + f"{t.tm_mday:2d}" + time.strftime(" %H:%M:%S %Y", t)
    chars = list(text)
    for at, char in edits:
        if at < len(chars):
            chars[at] = char
    mutated = "".join(chars)
    parsed = parse_http_date(mutated.encode("latin-1"))
    if parsed is None:
        return
    # Whatever parses renders back to what was sent (past the day name), with a
    # leap second or an RFC 850 century as the only ways for the two to differ.
    body = mutated.split(", ", 1)[1] if ", " in mutated else mutated.split(" ", 1)[1]
    if ":60" in body:
        return
    assert body in _renderings(parsed), mutated
