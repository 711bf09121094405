"""HTTP dates (RFC 9110 §5.6.7), parsed exactly.

Three grammars and nothing else:

- IMF-fixdate, what every current server sends: ``Sun, 06 Nov 1994 08:49:37 GMT``;
- the obsolete RFC 850 form: ``Sunday, 06-Nov-94 08:49:37 GMT``;
- ANSI C's asctime() form: ``Sun Nov  6 08:49:37 1994``.

Anything else -- another zone (``UTC``, ``+0000``), a missing comma, dashes in
the IMF form, ``.`` between the time's fields, a one-digit hour, a two-digit
year outside RFC 850, a day that does not exist -- is invalid, and the caller
decides what an invalid date means: for ``Expires`` RFC 9111 §5.3 says already
expired, which is why a lenient parser (``email.utils``, which accepts all of
those) is a cache bug, not a convenience.
"""

from __future__ import annotations

import calendar
import datetime
import re
import time
from typing import Optional

_MONTHS = {m: i + 1 for i, m in enumerate(b"Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split())}
_DAY = rb"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_DAY_LONG = rb"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_MONTH = rb"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = rb"([0-9]{2}):([0-9]{2}):([0-9]{2})"

# day-name "," SP day SP month SP year SP time-of-day SP GMT
_IMF_FIXDATE = re.compile(_DAY + rb", ([0-9]{2}) " + _MONTH + rb" ([0-9]{4}) " + _TIME + rb" GMT")
# day-name-l "," SP day "-" month "-" 2DIGIT SP time-of-day SP GMT
_RFC850 = re.compile(_DAY_LONG + rb", ([0-9]{2})-" + _MONTH + rb"-([0-9]{2}) " + _TIME + rb" GMT")
# day-name SP month SP ( 2DIGIT / ( SP DIGIT ) ) SP time-of-day SP year
_ASCTIME = re.compile(_DAY + rb" " + _MONTH + rb" ([0-9]{2}| [0-9]) " + _TIME + rb" ([0-9]{4})")


def parse_http_date(value: bytes, now: Optional[float] = None) -> Optional[float]:
    """An HTTP-date as epoch seconds, or None when it is not one. ``now`` (epoch
    seconds, default the clock) places an RFC 850 two-digit year."""
    match = _IMF_FIXDATE.fullmatch(value)
    if match is not None:
        day, month, year, hour, minute, second = match.groups()
        return _epoch(int(year), _MONTHS[month], int(day), hour, minute, second)
    match = _RFC850.fullmatch(value)
    if match is not None:
        day, month, short_year, hour, minute, second = match.groups()
        # §5.6.7: a two-digit year that looks more than 50 years in the future is
        # the most recent past year with the same last two digits.
        this_year = time.gmtime(time.time() if now is None else now).tm_year
        year = this_year - this_year % 100 + int(short_year)
        if year > this_year + 50:
            year -= 100
        return _epoch(year, _MONTHS[month], int(day), hour, minute, second)
    match = _ASCTIME.fullmatch(value)
    if match is not None:
        month, day, hour, minute, second, year = match.groups()
        return _epoch(int(year), _MONTHS[month], int(day), hour, minute, second)
    return None


def _epoch(year: int, month: int, day: int, hour: bytes, minute: bytes, second: bytes) -> Optional[float]:
    h, m, s = int(hour), int(minute), int(second)
    # time-of-day: hour 00-23, minute 00-59, second 00-60 (a leap second, §5.6.7).
    if h > 23 or m > 59 or s > 60:
        return None
    try:
        datetime.date(year, month, day)  # 31 Feb is not a day
    except ValueError:
        return None
    return float(calendar.timegm((year, month, day, h, m, s)))
