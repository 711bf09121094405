"""Which layers a request goes through, decided once per request.

``Router.plan`` looks at the head only (method, path, Cache-Control) and
answers None for a request neither the cache nor the coalescer may touch --
those take the plain relay path and pay nothing for the layers. A plan for a
request with a body (a POST rule) is completed by ``Plan.finish`` once the
body is in, because its key and the rules' ``when`` conditions depend on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, FrozenSet, Optional, Sequence, Tuple

from pyproxy.cache import policy
from pyproxy.cache.key import (
    CREDENTIAL_HEADERS,
    IDENTITY_HEADERS,
    NO_BODY,
    body_digest,
    body_matches,
    identity_for,
    parse_json_body,
    request_key,
    tenant_identity,
)
from pyproxy.cache.validation import has_conditionals
from pyproxy.errors import BadRequest
from pyproxy.http.headers import to_origin_form
from pyproxy.rules import DEFAULT_ROUTES, Rule, find_rule, request_path

if TYPE_CHECKING:  # pragma: no cover
    from pyproxy.config import Settings
    from pyproxy.http.messages import RequestHead

Header = Tuple[bytes, bytes]

_SAFE = frozenset({b"GET", b"HEAD"})
# Plan.finish's parsed argument when nobody parsed the body yet.
UNPARSED: object = object()
ROUTE_MEMO_SIZE = 4096


class Plan:
    __slots__ = (
        "method",
        "target",
        "headers",
        "cache_rule",
        "dedup_rule",
        "cache_mode",
        "may_join",
        "may_lead",
        "needs_body",
        "key",
        "cache_key",
        "_identity_names",
        "tenant",
        "conditional",
    )

    def __init__(
        self,
        method: bytes,
        target: bytes,
        headers: Sequence[Header],
        cache_rule: Optional[Rule],
        dedup_rule: Optional[Rule],
        cache_mode: Optional[str],
        coalesce: bool,
        identity_names: Tuple[bytes, ...],
        conditional: bool = False,
        tenant: Optional[str] = None,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        # The request has preconditions of its own (RFC 9110 §13.1): its answer (a 304)
        # is its own, so it never shares a fetch; a fresh entry may answer it 304.
        self.conditional = conditional
        self.cache_rule = cache_rule
        self.dedup_rule = dedup_rule
        # policy.LOOKUP / REFETCH / BYPASS, or None: the cache is not involved.
        self.cache_mode = cache_mode
        # A request that asked for a fresh answer (no-cache) may start a shared
        # fetch but not join one that began before it arrived.
        self.may_lead = coalesce and cache_mode != policy.BYPASS and cache_mode != policy.RANGE
        self.may_join = self.may_lead and cache_mode != policy.REFETCH
        self.needs_body = method not in _SAFE
        self.key = b""
        self.cache_key = b""
        self._identity_names = identity_names
        self.tenant = tenant
        if not self.needs_body:
            self._set_keys(NO_BODY)

    def finish(self, body: bytes, parsed: Any = UNPARSED) -> bool:
        """With the whole body: apply the rules' ``when`` conditions and compute the key.
        False: no rule applies after all (the request is relayed plainly). ``parsed``:
        the body's JSON when routing by model parsed it already (parsed once per request)."""
        if parsed is UNPARSED:
            parsed = parse_json_body(body)
        if self.cache_rule is not None and not body_matches(self.cache_rule, parsed):
            self.cache_rule = None
            self.cache_mode = None
        if self.dedup_rule is not None and not body_matches(self.dedup_rule, parsed):
            self.dedup_rule = None
        if self.cache_rule is None and self.dedup_rule is None:
            return False
        if self.cache_rule is None:  # coalesced by a dedup rule only
            self.may_lead = self.may_join = not self.conditional
        self._set_keys(body_digest(body, self.cache_rule or self.dedup_rule, parsed))  # type: ignore[arg-type]
        return True

    def _set_keys(self, body: bytes) -> None:
        caller = identity_for(self.headers, self.cache_rule, self._identity_names)
        if self.tenant is not None:  # even a shared rule is shared within a tenant only
            caller = tenant_identity(self.tenant, caller)
        self.key = request_key(self.target, self.method, caller, body)
        # A HEAD is answered from the stored GET response (RFC 9110 §9.3.2); HEAD
        # responses themselves are never stored, and coalesce only with HEADs.
        self.cache_key = request_key(self.target, b"GET", caller, body) if self.method == b"HEAD" else self.key

    @property
    def records(self) -> bool:
        mode = self.cache_mode
        return mode is not None and mode != policy.BYPASS and mode != policy.RANGE and self.method != b"HEAD"


class Router:
    def __init__(self, settings: "Settings") -> None:
        self.cache_on = settings.cache_enabled
        self.dedup_on = settings.dedup_enabled
        self.cache_rules = settings.cache_rules if self.cache_on else ()
        self.dedup_rules = settings.dedup_rules if self.dedup_on else ()
        self.identity_names = IDENTITY_HEADERS + settings.cache_identity_headers
        # With client keys the tenant is the caller: the key's own bytes are not.
        self.tenant_identity_names = tuple(n for n in self.identity_names if n not in CREDENTIAL_HEADERS)
        methods = set()
        if self.cache_on or self.dedup_on:
            methods |= _SAFE
        for rule in self.cache_rules + self.dedup_rules:
            methods |= rule.methods
        self.methods: FrozenSet[bytes] = frozenset(methods)
        self._routes: Dict[Tuple[bytes, bytes], Tuple[bytes, Optional[Rule], Optional[Rule]]] = {}

    def _route(self, method: bytes, raw_target: bytes) -> Tuple[bytes, Optional[Rule], Optional[Rule]]:
        """The origin-form target and the matching rules, remembered per (method, target):
        clients repeat the same few targets, and this is per-request work otherwise."""
        target = to_origin_form(raw_target)
        path = request_path(target)
        lookup_method = b"GET" if method == b"HEAD" else method
        cache_rule = find_rule(self.cache_rules, lookup_method, path) if self.cache_rules else None
        dedup_rule = find_rule(self.dedup_rules, method, path) if self.dedup_rules else None
        route = (target, cache_rule, dedup_rule)
        if len(self._routes) >= ROUTE_MEMO_SIZE:
            self._routes.clear()  # bounded: a flood of distinct targets only costs the lookups
        self._routes[(method, raw_target)] = route
        return route

    @property
    def active(self) -> bool:
        return bool(self.methods)

    def route(self, method: bytes, raw_target: bytes) -> Tuple[bytes, Optional[Rule], Optional[Rule]]:
        """The origin-form target and the cache and dedup rules for it (memoized).
        Raises BadRequest for a target no upstream request can be made of."""
        route = self._routes.get((method, raw_target))
        return route if route is not None else self._route(method, raw_target)

    def plan(self, request: "RequestHead", has_body: bool, tenant: Optional[str] = None) -> Optional[Plan]:
        """``tenant``: with client keys, the caller's tenant -- what cache and coalescing
        keys are scoped by (keys of one tenant may share entries, tenants never)."""
        method = request.method
        if method not in self.methods:
            return None
        target, cache_rule, dedup_rule = self.route(method, request.target)
        safe = method in _SAFE
        if safe and has_body:
            return None  # a GET with a body is not a plain fetch: never shared or stored
        if not safe and cache_rule is None and dedup_rule is None:
            return None
        cache_mode = policy.request_mode(request.headers) if self.cache_on and (safe or cache_rule) else None
        conditional = has_conditionals(request.headers)
        coalesce = self.dedup_on and (safe or cache_rule is not None or dedup_rule is not None) and not conditional
        if cache_mode is None and not coalesce:
            return None
        return Plan(
            method,
            target,
            request.headers,
            cache_rule,
            dedup_rule,
            cache_mode,
            coalesce,
            self.identity_names if tenant is None else self.tenant_identity_names,
            conditional,
            tenant,
        )


class Endpoints:
    """The ``endpoint`` label of metrics: a bounded set of names, never the raw path.

    The first of [[routes]], the cache rules, the dedup rules and the
    OpenAI-compatible paths that matches names the request; else ``other``.
    """

    def __init__(self, settings: "Settings") -> None:
        self.rules = settings.routes + settings.cache_rules + settings.dedup_rules + DEFAULT_ROUTES
        self._memo: Dict[Tuple[bytes, bytes], str] = {}

    def name(self, method: bytes, target: bytes) -> str:
        key = (method, target)
        name = self._memo.get(key)
        if name is None:
            try:
                rule = find_rule(self.rules, method, request_path(to_origin_form(target)))
            except BadRequest:  # a target the request was refused for
                rule = None
            name = rule.name if rule is not None else "other"
            if len(self._memo) >= ROUTE_MEMO_SIZE:
                self._memo.clear()
            self._memo[key] = name
        return name
