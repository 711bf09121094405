"""The request key shared by the cache and the coalescer.

A key is ``target NUL method NUL caller NUL body``:

- *target* first and in clear, so a purge by path or prefix is a prefix scan
  (a target longer than ``MAX_TARGET_IN_KEY`` is cut and its hash appended);
- *caller* is a digest of the credentials (Authorization, X-Api-Key, Api-Key,
  Cookie and any configured header), so two API keys sending identical
  requests never share an entry or a fetch; ``*`` only for a rule marked
  ``shared = true``; ``-`` for a request with no credentials at all;
- *body* is a digest of the canonical JSON body for POST rules: parsed, keys
  sorted, whitespace dropped, integral floats written as integers (``0.0`` is
  ``0``), ``ignore_fields`` removed -- the same request written two ways is
  one key. A body that is not JSON is keyed by its bytes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional, Sequence, Tuple

from pyproxy._compat import json_loads
from pyproxy.rules import Rule

Header = Tuple[bytes, bytes]

IDENTITY_HEADERS = (b"authorization", b"x-api-key", b"api-key", b"cookie")
CREDENTIAL_HEADERS = (b"authorization", b"x-api-key", b"api-key")  # where a client key is sent
MAX_TARGET_IN_KEY = 2048
SHARED = b"*"
ANONYMOUS = b"-"
NO_BODY = b""


def _digest(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(b"%d:" % len(part))  # length-prefixed: no two part lists hash alike
        h.update(part)
    return h.hexdigest().encode("ascii")


def caller_identity(headers: Sequence[Header], names: Tuple[bytes, ...]) -> bytes:
    parts = []
    for name, value in headers:
        if name in names:
            parts.append(name)
            parts.append(value)
    if not parts:
        return ANONYMOUS
    return _digest(*parts)


def parse_json_body(body: bytes) -> Tuple[bool, Any]:
    """(True, value) for a JSON body, (False, None) otherwise."""
    try:
        return True, json_loads(body)
    except (ValueError, TypeError, OverflowError):
        try:  # orjson refuses integers beyond 64 bits, which JSON allows
            return True, json.loads(body)
        except (ValueError, TypeError, UnicodeDecodeError, RecursionError):
            return False, None
    except RecursionError:
        return False, None


def body_matches(rule: Rule, parsed: Tuple[bool, Any]) -> bool:
    """A rule's ``when`` conditions: every named top-level field has the given value."""
    if not rule.when:
        return True
    ok, value = parsed
    if not ok or not isinstance(value, dict):
        return False
    for field, expected in rule.when:
        actual = value.get(field, _MISSING)
        # 0 and 0.0 are the same temperature; True is not 1.
        if actual is _MISSING or (type(actual) is bool) != (type(expected) is bool) or actual != expected:
            return False
    return True


_MISSING = object()


def body_digest(body: bytes, rule: Rule, parsed: Tuple[bool, Any]) -> bytes:
    ok, value = parsed
    if not ok:
        return b"raw-" + _digest(body)
    if rule.ignore_fields and isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in rule.ignore_fields}
    value = _same_numbers(value)
    # Serialized by the standard library on every interpreter, so processes on
    # CPython (orjson) and PyPy that share a Redis cache compute equal keys.
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)
    return b"json-" + _digest(canonical.encode("utf-8", "surrogatepass"))


def _same_numbers(value: Any) -> Any:
    """JSON has one number type: 0 and 0.0 (a temperature) are the same value."""
    kind = type(value)
    if kind is float:
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    if kind is dict:
        return {k: _same_numbers(v) for k, v in value.items()}
    if kind is list:
        return [_same_numbers(v) for v in value]
    return value


# RFC 9111 §4.1: responses that Vary are stored one per variant, under the request's
# key plus the digest of the Vary-named request values; under the key itself goes a
# marker naming the fields, so a lookup knows which variant to ask for.
VARIANT_SEPARATOR = b"\x00vary\x00"


def variant_key(key: bytes, values: Tuple[bytes, ...]) -> bytes:
    return key + VARIANT_SEPARATOR + _digest(b"\x00".join(values))[:24]


def request_key(target: bytes, method: bytes, caller: bytes, body: bytes = NO_BODY) -> bytes:
    if len(target) > MAX_TARGET_IN_KEY:
        target = target[:MAX_TARGET_IN_KEY] + b"#" + _digest(target)
    return b"%s\x00%s\x00%s\x00%s" % (target, method, caller, body)


def tenant_identity(tenant: str, caller: bytes) -> bytes:
    """A caller's identity scoped by its tenant (client keys): two tenants never share."""
    return _digest(b"tenant", tenant.encode("ascii"), caller)


def identity_for(headers: Sequence[Header], rule: Optional[Rule], names: Tuple[bytes, ...]) -> bytes:
    if rule is not None and rule.shared:
        return SHARED
    return caller_identity(headers, names)
