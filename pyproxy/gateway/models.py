"""The model table: which deployments serve a request. Pure: no I/O, no clock.

``GatewayRoutes.by_head`` decides from the method and path alone: a
``[[routes]]`` entry's upstream, the model table (the body is needed), pyproxy's
own ``GET /v1/models`` answer, the default upstream, or 404. ``by_model``
finishes a model-routed request once its JSON body is parsed.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from typing import Any, Dict, List, Optional, Sequence, Tuple

from pyproxy._compat import json_dumps
from pyproxy.errors import BadRequest, ProxyError
from pyproxy.gateway.balancer import is_uniform
from pyproxy.gateway.config import Deployment, GatewayConfig, ModelSpec
from pyproxy.http.headers import to_origin_form
from pyproxy.rules import Rule, request_path

# What a request goes to once its head is read.
TO_UPSTREAM = "upstream"  # one named upstream (a [[routes]] entry or the default)
BY_MODEL = "model"  # the body's "model" decides: read and parse the body first
MODEL_LIST = "model_list"  # pyproxy answers GET /v1/models itself
NO_ROUTE = "none"  # default_upstream = "none" and nothing matched: 404

_MODEL_ROUTED_PREFIX = b"/v1/"
MEMO_SIZE = 4096
_MODELS_PATH = b"/v1/models"


class ModelNotFound(ProxyError):
    """OpenAI's answer for a model nobody serves: 404, code model_not_found."""

    status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class RouteNotFound(ProxyError):
    status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class Target:
    """Where one request goes: the candidate deployments and the model to send."""

    __slots__ = ("deployments", "public_model", "requested", "spec", "uniform", "renames")

    def __init__(
        self,
        deployments: Tuple[Deployment, ...],
        public_model: Optional[str],
        spec: Optional[ModelSpec],
        requested: Optional[str] = None,
    ):
        self.deployments = deployments
        self.public_model = public_model  # after aliases; None: not model-routed
        self.requested = requested  # the "model" the client sent
        self.spec = spec  # the model entry (retry_on, max_attempts); None: defaults
        self.uniform = is_uniform(deployments)  # see balancer.choose
        # Whether any deployment is sent another model name than the client's.
        self.renames = any(self.model_for(d) is not None for d in deployments)

    def model_for(self, deployment: Deployment) -> Optional[str]:
        """The model name to write into the body for this deployment, or None: the body
        goes as the client sent it."""
        model = deployment.model or self.public_model
        return model if model is not None and model != self.requested else None


class GatewayRoutes:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.aliases: Dict[str, str] = dict(config.aliases)
        self.exact: Dict[str, ModelSpec] = {m.name: m for m in config.models if not m.is_glob}
        self.globs: List[ModelSpec] = [m for m in config.models if m.is_glob]
        self.model_routing = bool(config.models)
        # [[routes]] in order, each with its target: one upstream, or balanced deployments.
        self._route_targets: List[Tuple[Rule, Target]] = [
            (rule, Target(spec.deployments, None, spec)) for rule, spec in zip(config.routes, config.route_specs)
        ]
        self._upstream_targets: Dict[str, Target] = {
            spec.name: Target((Deployment(spec.name),), None, None) for spec in config.upstreams
        }
        self._models_body = model_list_body(config)
        # Memos: clients repeat the same few paths and model names. Bounded: a flood of
        # distinct ones only costs the lookups.
        self._heads: Dict[Tuple[bytes, bytes], Tuple[str, Optional[Target]]] = {}
        self._targets: Dict[str, Target] = {}

    def by_head(self, method: bytes, raw_target: bytes) -> Tuple[str, Optional[Target]]:
        """Where a request goes, from its method and request-target (as sent). Raises
        BadRequest for a target no upstream request can be made of."""
        key = (method, raw_target)
        found = self._heads.get(key)
        if found is None:
            path = request_path(to_origin_form(raw_target))
            if len(self._heads) >= MEMO_SIZE:
                self._heads.clear()
            found = self._heads[key] = self._by_head(method, path)
        return found

    def _by_head(self, method: bytes, path: bytes) -> Tuple[str, Optional[Target]]:
        for rule, target in self._route_targets:
            if rule.matches(method, path):
                return TO_UPSTREAM, target
        if self.model_routing:
            if method == b"POST" and path.startswith(_MODEL_ROUTED_PREFIX):
                return BY_MODEL, None
            if path == _MODELS_PATH and method in (b"GET", b"HEAD"):
                return MODEL_LIST, None
        default = self.config.default_upstream
        if default is None:
            return NO_ROUTE, None
        return TO_UPSTREAM, self._upstream_targets[default]

    def upstream_target(self, name: str) -> Target:
        return self._upstream_targets[name]

    def resolve(self, name: str) -> Optional[Tuple[str, ModelSpec]]:
        """The public model name (after aliases) and its entry; exact names before globs."""
        public = self.aliases.get(name, name)
        spec = self.exact.get(public)
        if spec is None:
            for candidate in self.globs:
                if fnmatchcase(public, candidate.name):
                    spec = candidate
                    break
        return (public, spec) if spec is not None else None

    def by_model(self, parsed: Any) -> Target:
        """The target of a model-routed request, from its parsed JSON body."""
        if not isinstance(parsed, dict):
            raise BadRequest('the request body must be a JSON object with a "model" field')
        model = parsed.get("model")
        target = self._targets.get(model) if type(model) is str else None
        if target is not None:
            return target
        if not isinstance(model, str) or not model:
            raise BadRequest('the request body has no "model" field (a string)')
        found = self.resolve(model)
        if found is None:
            raise ModelNotFound(f"The model '{model[:200]}' does not exist or you do not have access to it.")
        public, spec = found
        target = Target(spec.deployments, public, spec, model)
        if len(self._targets) >= MEMO_SIZE:
            self._targets.clear()
        self._targets[model] = target  # a Target is never changed once made
        return target

    @property
    def models_body(self) -> bytes:
        return self._models_body


def model_list_body(config: GatewayConfig) -> bytes:
    """OpenAI's GET /v1/models shape: the public names (aliases included, globs not:
    a pattern is not a model a client can name)."""
    names: List[str] = [m.name for m in config.models if not m.is_glob]
    names += [alias for alias, _ in config.aliases if alias not in names]
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "pyproxy"} for name in names]
    return json_dumps({"object": "list", "data": data})


# A JSON string token, or a structural character: enough to walk the top level
# of an object without parsing the values (strings may hold any of {}[]:,).
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\]:,]', re.S)


def model_value_span(body: bytes) -> Optional[Tuple[int, int]]:
    """Where the top-level "model" string value sits in a JSON object body: (start, end)
    of the token with its quotes. The body is known to parse (the router parsed it)."""
    span = top_level_value_span(body, "model")
    if span is None or body[span[0] : span[0] + 1] != b'"':
        return None
    return span


def top_level_value_span(body: bytes, name: str) -> Optional[Tuple[int, int]]:
    """Where the value of the top-level member ``name`` sits in a JSON object body:
    (start, end), whitespace excluded; None when there is no such member. The body
    is known to parse."""
    depth = 0
    expect_key = False
    key_matches = False
    value_start = -1
    quoted = b'"%s"' % name.encode("ascii")  # member names asked for here are plain ASCII
    for match in _TOKENS.finditer(body):
        token = match.group()
        first = token[:1]
        if first == b"{" or first == b"[":
            depth += 1
            expect_key = depth == 1 and first == b"{"
        elif first == b"}" or first == b"]":
            depth -= 1
            if depth == 0 and value_start >= 0:
                return _stripped(body, value_start, match.start())
        elif depth != 1:
            continue
        elif first == b",":
            if value_start >= 0:
                return _stripped(body, value_start, match.start())
            expect_key = True
        elif first == b":":
            if key_matches:
                value_start = match.end()
        elif first == b'"' and expect_key:
            key_matches = token == quoted or (b"\\" in token and _unescape(token) == name)
            expect_key = False
    return None


def _stripped(body: bytes, start: int, end: int) -> Tuple[int, int]:
    while start < end and body[start] in b" \t\r\n":
        start += 1
    while end > start and body[end - 1] in b" \t\r\n":
        end -= 1
    return start, end


def _unescape(token: bytes) -> str:
    from pyproxy._compat import json_loads

    try:
        value = json_loads(token)
    except ValueError:
        return ""
    return value if isinstance(value, str) else ""


def rewrite_model(body: bytes, model: str) -> bytes:
    """The body with only its top-level "model" value replaced; every other byte the same."""
    span = model_value_span(body)
    if span is None:  # pragma: no cover - the router found the field, so the scan does
        raise BadRequest('the request body has no "model" field (a string)')
    start, end = span
    return b"".join((body[:start], json_dumps(model), body[end:]))


def rewrite_chunks(chunks: Sequence[bytes], model: str) -> List[bytes]:
    return [rewrite_model(b"".join(chunks), model)]
