"""Route rules from the ``[[cache.rules]]`` and ``[[dedup.rules]]`` tables of the config.

A rule names methods and a path (exact, or a prefix ending in ``*``); the
first rule that matches a request applies. Rules are validated once at
start-up, each mistake reported as one line that names the rule and key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Mapping, Optional, Sequence, Tuple

_COMMON_KEYS = frozenset({"methods", "path", "name"})
CACHE_RULE_KEYS = _COMMON_KEYS | frozenset(
    {"ttl", "stale_while_revalidate", "stale_if_error", "shared", "ignore_fields", "when", "stream"}
)
DEDUP_RULE_KEYS = _COMMON_KEYS
# upstream / deployments (+ retry_on, max_attempts, retry_deadline): the gateway's
# (pyproxy/gateway/config.py).
ROUTE_KEYS = _COMMON_KEYS | frozenset(
    {"upstream", "deployments", "retry_on", "max_attempts", "retry_deadline", "early_head_after"}
)
ANY_METHOD = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


class RuleError(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    methods: FrozenSet[bytes]
    path: bytes  # without the trailing "*" of a prefix rule
    prefix: bool
    name: str  # the bounded label metrics use for this route
    ttl: float = 0.0
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0
    shared: bool = False  # one entry for every caller (no credentials in the key)
    ignore_fields: Tuple[str, ...] = ()  # top-level JSON body fields left out of the key
    when: Tuple[Tuple[str, Any], ...] = ()  # JSON body fields that must have these values
    stream: bool = False  # record and replay text/event-stream responses
    upstream: str = ""  # [[routes]]: the upstream requests on this path go to (the gateway)

    def matches(self, method: bytes, path: bytes) -> bool:
        if method not in self.methods:
            return False
        return path.startswith(self.path) if self.prefix else path == self.path


def find_rule(rules: Sequence[Rule], method: bytes, path: bytes) -> Optional[Rule]:
    for rule in rules:
        if rule.matches(method, path):
            return rule
    return None


def request_path(target: bytes) -> bytes:
    """The path of an origin-form target, without its query (rules match on this)."""
    end = target.find(b"?")
    return target if end < 0 else target[:end]


def _seconds(where: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise RuleError(f"{where}: {key} must be a number of seconds >= 0, got {value!r}")
    return float(value)


def parse_rule(table: Any, where: str, allowed: FrozenSet[str], default_methods: Tuple[str, ...] = ("GET",)) -> Rule:
    if not isinstance(table, Mapping):
        raise RuleError(f"{where}: expected a table, got {table!r}")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise RuleError(f"{where}: unknown key {unknown[0]!r} (expected one of {', '.join(sorted(allowed))})")
    methods = table.get("methods", list(default_methods))
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, list) or not methods or not all(isinstance(m, str) and m.isalpha() for m in methods):
        raise RuleError(f"{where}: methods must be a list of method names, got {methods!r}")
    path = table.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        raise RuleError(f"{where}: path must be a string starting with '/', got {path!r}")
    prefix = path.endswith("*")
    if "*" in path[:-1]:
        raise RuleError(f"{where}: path may only end in '*' (a prefix), got {path!r}")
    raw_path = path[:-1] if prefix else path
    fields: Dict[str, Any] = {
        "methods": frozenset(m.upper().encode("ascii") for m in methods),
        "path": raw_path.encode("utf-8"),
        "prefix": prefix,
        "name": str(table.get("name", path)),
    }
    for key in ("ttl", "stale_while_revalidate", "stale_if_error"):
        if key in table:
            fields[key] = _seconds(where, key, table[key])
    for key in ("shared", "stream"):
        if key in table:
            if not isinstance(table[key], bool):
                raise RuleError(f"{where}: {key} must be true or false, got {table[key]!r}")
            fields[key] = table[key]
    if "upstream" in table:
        if not isinstance(table["upstream"], str) or not table["upstream"]:
            raise RuleError(f"{where}: upstream must be an upstream's name, got {table['upstream']!r}")
        fields["upstream"] = table["upstream"]
    if "ignore_fields" in table:
        ignore = table["ignore_fields"]
        if not isinstance(ignore, list) or not all(isinstance(f, str) for f in ignore):
            raise RuleError(f"{where}: ignore_fields must be a list of field names, got {ignore!r}")
        fields["ignore_fields"] = tuple(ignore)
    if "when" in table:
        when = table["when"]
        if not isinstance(when, Mapping) or not when:
            raise RuleError(f"{where}: when must be a table of field = value, got {when!r}")
        fields["when"] = tuple(sorted(when.items()))
    if allowed is CACHE_RULE_KEYS and fields.get("ttl", 0.0) <= 0:
        raise RuleError(f"{where}: ttl must be given and > 0")
    return Rule(**fields)


def parse_rules(
    tables: Any, where: str, allowed: FrozenSet[str], default_methods: Tuple[str, ...] = ("GET",)
) -> Tuple[Rule, ...]:
    if not isinstance(tables, list):
        raise RuleError(f"{where}: expected an array of tables ([[...]]), got {tables!r}")
    return tuple(parse_rule(t, f"{where}[{i}]", allowed, default_methods) for i, t in enumerate(tables))


def _route(path: str) -> Rule:
    return Rule(methods=frozenset(m.encode() for m in ANY_METHOD), path=path.encode(), prefix=False, name=path)


# The endpoint label of metrics for the OpenAI-compatible API, besides [[routes]].
DEFAULT_ROUTES: Tuple[Rule, ...] = tuple(
    _route(p) for p in ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
)

# With no [[cache.rules]] configured: the endpoint every LLM client polls.
DEFAULT_CACHE_RULES: Tuple[Rule, ...] = (
    Rule(methods=frozenset({b"GET"}), path=b"/v1/models", prefix=False, name="/v1/models", ttl=300.0),
)
