"""Client keys (``[auth] mode = "keys"``): the keys file, and finding the key a
request presents.

The file holds one ``[[keys]]`` table per key with its SHA-256 only, never the
key: a leaked file (or a backup, or a diff in review) gives nobody a usable
key. A request's key is hashed and looked up by that digest, so what the lookup
costs depends on the digest, not on how many leading bytes of the key are right
(no timing oracle on the key's bytes). Keys are random 32-byte strings, so a
plain, unsalted hash is enough: there is no dictionary to attack.

Everything here is pure apart from ``load_keys`` reading the file; the
reloading (SIGHUP, mtime) lives in ``admission.py``.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from calendar import timegm
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from fnmatch import fnmatchcase
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from pyproxy.gateway.config import NAME_RE

Header = Tuple[bytes, bytes]

KEY_PREFIX = "pp-"
KEY_RANDOM_BYTES = 32
HASH_PREFIX = "sha256:"
_HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
KEY_FIELDS = frozenset(
    {"name", "hash", "tenant", "models", "rpm", "tpm", "max_parallel", "expires", "disabled", "model_limits"}
)
PLAINTEXT_FIELDS = ("key", "api_key", "secret", "value")
TENANT_FIELDS = frozenset({"name", "rpm", "tpm", "max_parallel"})
LIMIT_FIELDS = ("rpm", "tpm", "max_parallel")
# RFC 3339 §5.6 date-time: full-date "T" full-time (the separator may be "t" or " ").
_RFC3339 = re.compile(r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?(?:([Zz])|([+-])(\d{2}):(\d{2}))$")


class KeysError(ValueError):
    """One line naming the file, the entry and the field; never a key's value."""


@dataclass(frozen=True)
class Limits:
    """Caps of one scope (a key, a tenant, a key on one model); None: no cap."""

    rpm: Optional[int] = None
    tpm: Optional[int] = None
    max_parallel: Optional[int] = None

    @property
    def any(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.max_parallel is not None


NO_LIMITS = Limits()


@dataclass(frozen=True)
class ClientKey:
    name: str
    digest: bytes  # SHA-256 of the key
    tenant: str
    models: Tuple[str, ...] = ()  # allowed public model globs; (): every model
    limits: Limits = NO_LIMITS
    model_limits: Tuple[Tuple[str, Limits], ...] = ()  # (public model glob, caps of this key on it)
    expires: Optional[float] = None  # Unix time
    disabled: bool = False

    def allows(self, model: str) -> bool:
        if not self.models:
            return True
        return any(fnmatchcase(model, glob) for glob in self.models)

    def limits_on(self, model: Optional[str]) -> Optional[Tuple[str, Limits]]:
        """The first model_limits entry whose glob matches ``model``."""
        if model is None:
            return None
        for glob, limits in self.model_limits:
            if fnmatchcase(model, glob):
                return glob, limits
        return None

    def usable(self, now: float) -> bool:
        return not self.disabled and (self.expires is None or now < self.expires)


@dataclass(frozen=True)
class KeyTable:
    by_digest: Mapping[bytes, ClientKey]
    tenants: Mapping[str, Limits]  # [[tenants]]: caps shared by all keys of a tenant
    names: Tuple[str, ...] = ()  # configured key names, in file order
    tenant_names: Tuple[str, ...] = ()

    # Keys already found, by the bytes presented: SHA-256 costs 0.4 us on CPython and
    # 1.4 us (3 in a loaded proxy) on PyPy, whose hashlib goes through cffi, on every
    # request. Only hits are kept, so it holds at most one entry per configured key
    # (unknown keys cannot grow it), and it goes with its table at a reload. A lookup
    # here compares presented bytes only after their (seeded) hash matched: nothing
    # about a configured key is learned from its timing.
    _found: Dict[bytes, ClientKey] = dataclass_field(default_factory=dict, compare=False, repr=False)

    def lookup(self, presented: bytes) -> Optional[ClientKey]:
        key = self._found.get(presented)
        if key is None:
            key = self.by_digest.get(hashlib.sha256(presented).digest())
            if key is not None and len(self._found) < len(self.by_digest):
                self._found[presented] = key
        return key


EMPTY_TABLE = KeyTable({}, {})


def new_key() -> str:
    """A new client key: ``pp-`` and 32 random bytes, URL-safe base64."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)


def key_hash(key: str) -> str:
    return HASH_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


def presented_key(headers: Sequence[Header]) -> Optional[bytes]:
    """The client key a request carries: ``Authorization: Bearer``, ``x-api-key`` or
    ``api-key`` (what the OpenAI, Anthropic and Azure clients send), first found."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key" or name == b"api-key":
            if value.strip():
                return value.strip()
    return None


def parse_time(value: Any, where: str) -> float:
    """An RFC 3339 date-time (TOML's offset date-time arrives as a datetime)."""
    if hasattr(value, "timestamp") and hasattr(value, "tzinfo"):
        if value.tzinfo is None:
            raise KeysError(f"{where}: needs a UTC offset (e.g. 2027-01-01T00:00:00Z)")
        return float(value.timestamp())
    if not isinstance(value, str):
        raise KeysError(f"{where}: expected an RFC 3339 date-time, got {value!r}")
    m = _RFC3339.match(value)
    if m is None:
        raise KeysError(f"{where}: expected an RFC 3339 date-time like 2027-01-01T00:00:00Z, got {value!r}")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour <= 23 and minute <= 59 and second <= 60):
        raise KeysError(f"{where}: not a valid date-time: {value!r}")
    stamp = timegm((year, month, day, hour, minute, min(second, 59), 0, 0, 0)) + float(m.group(7) or 0)
    if m.group(9):
        offset = (int(m.group(10)) * 60 + int(m.group(11))) * 60
        stamp -= offset if m.group(9) == "+" else -offset
    return stamp


def _limit(table: Mapping[str, Any], name: str, where: str) -> Optional[int]:
    value = table.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KeysError(f"{where}.{name}: expected an integer >= 1, got {value!r}")
    return value


def _limits(table: Mapping[str, Any], where: str) -> Limits:
    return Limits(*(_limit(table, name, where) for name in LIMIT_FIELDS))


def _looks_plaintext(value: Any) -> bool:
    return isinstance(value, str) and not value.startswith(HASH_PREFIX)


def _parse_key(raw: Any, where: str) -> ClientKey:
    if not isinstance(raw, Mapping):
        raise KeysError(f"{where}: expected a table")
    for field in raw:
        if field in PLAINTEXT_FIELDS:
            raise KeysError(
                f"{where}.{field}: a plaintext key is not stored; store its hash "
                f'(hash = "sha256:<64 hex>"), as `python -m pyproxy keys new` writes it'
            )
    unknown = sorted(set(raw) - KEY_FIELDS)
    if unknown:
        raise KeysError(f"{where}: unknown field {unknown[0]!r} (expected one of {', '.join(sorted(KEY_FIELDS))})")
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise KeysError(f"{where}.name: expected a name of [a-z0-9_-], got {name!r}")
    where = f"{where} ({name})"
    digest_text = raw.get("hash")
    if not isinstance(digest_text, str) or not _HASH_RE.match(digest_text):
        if _looks_plaintext(digest_text):
            raise KeysError(
                f"{where}.hash: expected sha256:<64 lowercase hex>; a plaintext key is not stored "
                "(`python -m pyproxy keys new` prints a key and writes its hash)"
            )
        raise KeysError(f"{where}.hash: expected sha256:<64 lowercase hex>")
    tenant = raw.get("tenant", name)
    if not isinstance(tenant, str) or not NAME_RE.match(tenant):
        raise KeysError(f"{where}.tenant: expected a name of [a-z0-9_-], got {tenant!r}")
    models = raw.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise KeysError(f"{where}.models: expected a list of public model names or globs")
    model_limits_raw = raw.get("model_limits", {})
    if not isinstance(model_limits_raw, Mapping):
        raise KeysError(f'{where}.model_limits: expected a table of "model glob" = {{ rpm = ..., tpm = ... }}')
    model_limits: List[Tuple[str, Limits]] = []
    for glob, table in model_limits_raw.items():
        at = f"{where}.model_limits.{glob}"
        if not isinstance(table, Mapping) or set(table) - set(LIMIT_FIELDS):
            raise KeysError(f"{at}: expected {{ rpm = N, tpm = N, max_parallel = N }}")
        model_limits.append((glob, _limits(table, at)))
    expires = parse_time(raw["expires"], f"{where}.expires") if "expires" in raw else None
    disabled = raw.get("disabled", False)
    if not isinstance(disabled, bool):
        raise KeysError(f"{where}.disabled: expected true or false, got {disabled!r}")
    return ClientKey(
        name,
        bytes.fromhex(digest_text[len(HASH_PREFIX) :]),
        tenant,
        tuple(models),
        _limits(raw, where),
        tuple(model_limits),
        expires,
        disabled,
    )


def parse_keys(tables: Mapping[str, Any], source: str) -> KeyTable:
    """The key table from a parsed keys file; ``source`` names it in errors."""
    unknown = sorted(set(tables) - {"keys", "tenants"})
    if unknown:
        raise KeysError(f"{source}: unknown table {unknown[0]!r} (expected [[keys]] and [[tenants]])")
    raw_keys = tables.get("keys", [])
    if not isinstance(raw_keys, list):
        raise KeysError(f"{source}: keys: expected an array of tables ([[keys]])")
    by_digest: Dict[bytes, ClientKey] = {}
    names: Dict[str, int] = {}
    for i, raw in enumerate(raw_keys):
        key = _parse_key(raw, f"{source}: keys[{i}]")
        if key.name in names:
            raise KeysError(f"{source}: keys[{i}].name: {key.name!r} is used twice (also keys[{names[key.name]}])")
        if key.digest in by_digest:
            # Never show the hash: naming the other entry is enough to find it.
            raise KeysError(f"{source}: keys[{i}] ({key.name}).hash: the same key as {by_digest[key.digest].name!r}")
        names[key.name] = i
        by_digest[key.digest] = key
    raw_tenants = tables.get("tenants", [])
    if not isinstance(raw_tenants, list):
        raise KeysError(f"{source}: tenants: expected an array of tables ([[tenants]])")
    tenants: Dict[str, Limits] = {}
    for i, raw in enumerate(raw_tenants):
        where = f"{source}: tenants[{i}]"
        if not isinstance(raw, Mapping) or set(raw) - TENANT_FIELDS:
            raise KeysError(f"{where}: expected name and rpm, tpm, max_parallel")
        name = raw.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise KeysError(f"{where}.name: expected a name of [a-z0-9_-], got {name!r}")
        if name in tenants:
            raise KeysError(f"{where}.name: {name!r} is used twice")
        tenants[name] = _limits(raw, where)
    tenant_names = tuple(dict.fromkeys([k.tenant for k in by_digest.values()] + list(tenants)))
    return KeyTable(by_digest, tenants, tuple(names), tenant_names)


def load_keys(path: str) -> KeyTable:
    from pyproxy.config import ConfigError, load_toml

    try:
        tables = load_toml(path)
    except ConfigError as exc:
        raise KeysError(str(exc).replace("--config", "keys_file", 1)) from None
    return parse_keys(tables, path)


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def key_entry_toml(name: str, digest: str, tenant: Optional[str], models: Sequence[str], limits: Limits) -> str:
    """The ``[[keys]]`` table ``keys new`` appends."""
    lines = ["", "[[keys]]", f"name = {_toml_string(name)}", f"hash = {_toml_string(digest)}"]
    if tenant:
        lines.append(f"tenant = {_toml_string(tenant)}")
    if models:
        lines.append("models = [" + ", ".join(_toml_string(m) for m in models) + "]")
    for field in LIMIT_FIELDS:
        value = getattr(limits, field)
        if value is not None:
            lines.append(f"{field} = {value}")
    return "\n".join(lines) + "\n"


def short_hash(key: ClientKey) -> str:
    """What ``keys list`` shows of a hash: enough to tell entries apart, not the hash."""
    return HASH_PREFIX + key.digest.hex()[:8] + "..."
