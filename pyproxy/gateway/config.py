"""The gateway's tables of the config file: ``[[upstreams]]``, ``[[models]]``,
``[model_aliases]``, the ``upstream`` of ``[[routes]]`` and ``default_upstream``.

Validated once at start-up (and on reload); every mistake is one line that
names the table and key. Upstream keys are read here -- from the environment
or a file -- and wrapped in ``Secret``, whose repr never shows the value, so
no log line, traceback or admin answer can print one by accident.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Tuple

from pyproxy.gateway.batching import BatchConfigError, BatchRule, parse_batching
from pyproxy.rules import Rule

NAME_RE = re.compile(r"^[a-z0-9_-]+$")
AUTH_HEADERS = ("authorization", "x-api-key", "api-key")
UPSTREAM_KEYS = frozenset({"name", "url", "api_key", "auth_header", "max_connections", "health_path", "stream_usage"})
STREAM_USAGE_MODES = ("off", "inject")
MODEL_KEYS = frozenset({"name", "deployments", "retry_on", "max_attempts", "retry_deadline", "early_head_after"})
DEPLOYMENT_KEYS = frozenset({"upstream", "weight", "priority", "model"})
# Failures retried only when a model opts in: the upstream may already be working
# (and billing) on the request.
OPT_IN_RETRIES = frozenset({"500", "timeout", "reset"})
DEFAULT_MAX_ATTEMPTS = 3
# The request's own deadline for retries: past this many seconds since its first
# attempt began, a failure is answered rather than tried again (a client that gave
# up long ago gains nothing from a third upstream).
DEFAULT_RETRY_DEADLINE = 30.0
NO_DEFAULT = "none"  # default_upstream = "none": unmatched requests get 404


class GatewayConfigError(ValueError):
    """One line naming the table and key."""


class Secret:
    """An upstream key: usable as bytes, never printed."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other.value == self.value

    def __hash__(self) -> int:
        return hash(self.value)


@dataclass(frozen=True)
class UpstreamSpec:
    name: str
    url: str
    upstream: Any  # pyproxy.config.Upstream (parsed URL)
    api_key: Optional[Secret] = None
    auth_header: str = "authorization"
    max_connections: Optional[int] = None  # None: --pool-connections
    health_path: Optional[bytes] = None  # None: a TCP check
    # "inject": streamed chat requests are sent with stream_options.include_usage, and
    # the usage chunk is taken out of the client's stream (see gateway/stream_usage.py).
    stream_usage: str = "off"

    def credential_header(self) -> Optional[Tuple[bytes, bytes]]:
        """The header that carries the injected key, or None (pass-through)."""
        if self.api_key is None:
            return None
        key = self.api_key.value.encode("latin-1")
        if self.auth_header == "authorization":
            return (b"authorization", b"Bearer " + key)
        return (self.auth_header.encode("ascii"), key)


@dataclass(frozen=True)
class Deployment:
    upstream: str
    weight: float = 1.0
    priority: int = 0
    model: Optional[str] = None  # the model name the upstream is sent, if not the public one


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the public name, or a glob ("gpt-*")
    deployments: Tuple[Deployment, ...]
    retry_on: FrozenSet[str] = frozenset()
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    # Seconds from the first attempt after which no further attempt starts.
    retry_deadline: float = DEFAULT_RETRY_DEADLINE
    # Seconds after which a streaming request the upstream has not answered yet gets
    # pyproxy's own 200 event-stream head and keep-alive pings (None: never).
    early_head_after: Optional[float] = None

    @property
    def is_glob(self) -> bool:
        return any(c in self.name for c in "*?[")


AUTH_KEYS = frozenset(
    {
        "mode",
        "keys_file",
        "tpm_reserve_max",
        "limits_backend",
        "limits_local_share",
        "instances",
        "limits_redis_timeout",
    }
)
AUTH_MODES = ("off", "keys")
DEFAULT_TPM_RESERVE_MAX = 32768
# An admission waits this long for Redis before this process decides alone (and the
# circuit opens): loopback Redis answers in well under a millisecond.
DEFAULT_LIMITS_REDIS_TIMEOUT = 0.1


@dataclass(frozen=True)
class AuthConfig:
    """``[auth]``: client keys (mode = "keys"), read from ``keys_file``."""

    mode: str
    keys_file: str  # absolute
    table: Any  # pyproxy.gateway.keys.KeyTable, as loaded at start-up
    # The most tokens a request reserves at admission (its prompt bytes / 4 plus
    # max_tokens); the real usage is charged when the response ends.
    tpm_reserve_max: int = DEFAULT_TPM_RESERVE_MAX
    # "memory" (each process alone) or a redis:// URL: counters shared by every
    # instance and worker (see gateway/shared_limits.py).
    limits_backend: str = "memory"
    # The fraction of every limit each instance enforces by itself while Redis is
    # down or slow (default 1/instances); a process of --workers N takes 1/N of it.
    limits_local_share: float = 1.0
    instances: int = 1
    limits_redis_timeout: float = DEFAULT_LIMITS_REDIS_TIMEOUT


@dataclass(frozen=True)
class GatewayConfig:
    upstreams: Tuple[UpstreamSpec, ...]
    models: Tuple[ModelSpec, ...] = ()
    aliases: Tuple[Tuple[str, str], ...] = ()
    routes: Tuple[Rule, ...] = ()  # the [[routes]] that name an upstream or deployments
    # Each of ``routes``' targets: one upstream, or deployments balanced as a model's are.
    route_specs: Tuple[ModelSpec, ...] = ()
    default_upstream: Optional[str] = None  # None: no default (404); else an upstream name
    upstream_names: Tuple[str, ...] = field(default=())
    batching: Tuple[BatchRule, ...] = ()  # [[batching]]: embeddings requests batched upstream
    auth: Optional[AuthConfig] = None  # [auth] mode = "keys"; None: off (the client's key passes)

    def upstream(self, name: str) -> UpstreamSpec:
        for spec in self.upstreams:
            if spec.name == name:
                return spec
        raise KeyError(name)


def resolve_secret(value: Any, where: str, environ: Mapping[str, str]) -> Secret:
    """``env:NAME``, ``file:/path`` or the key itself."""
    if not isinstance(value, str) or not value:
        raise GatewayConfigError(f"{where}: expected a string (env:NAME, file:PATH or the key)")
    if value.startswith("env:"):
        name = value[4:]
        if not name:
            raise GatewayConfigError(f"{where}: env: needs a variable name")
        if not environ.get(name):
            raise GatewayConfigError(f"{where}: environment variable {name} is not set")
        text = environ[name]
    elif value.startswith("file:"):
        path = value[5:]
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise GatewayConfigError(f"{where}: cannot read {path!r}: {reason}") from None
        if not text:
            raise GatewayConfigError(f"{where}: {path!r} is empty")
    else:
        text = value
    text = text.strip()
    # A header value: RFC 9110 §5.5 field-value, and no line breaks (header injection).
    if not text or any(ord(c) < 0x20 or ord(c) > 0x7E for c in text):
        raise GatewayConfigError(f"{where}: the key has characters a header cannot carry")
    return Secret(text)


def _table(value: Any, where: str, allowed: FrozenSet[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise GatewayConfigError(f"{where}: expected a table, got {value!r}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise GatewayConfigError(f"{where}: unknown key {unknown[0]!r} (expected one of {', '.join(sorted(allowed))})")
    return value


def _array(value: Any, where: str) -> List[Any]:
    if not isinstance(value, list):
        raise GatewayConfigError(f"{where}: expected an array of tables ([[...]]), got {value!r}")
    return value


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GatewayConfigError(f"{where}: expected an integer >= 1, got {value!r}")
    return value


def _parse_upstream(table: Any, where: str, environ: Mapping[str, str]) -> UpstreamSpec:
    from pyproxy.config import ConfigError, parse_upstream

    table = _table(table, where, UPSTREAM_KEYS)
    name = table.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise GatewayConfigError(f"{where}.name: expected a name of [a-z0-9_-], got {name!r}")
    url = table.get("url")
    if not isinstance(url, str):
        raise GatewayConfigError(f"{where}.url: expected an http(s) URL, got {url!r}")
    try:
        parsed = parse_upstream(url)
    except ConfigError as exc:
        raise GatewayConfigError(f"{where}.url: {exc}") from None
    auth_header = table.get("auth_header", "authorization")
    if not isinstance(auth_header, str) or auth_header.lower() not in AUTH_HEADERS:
        raise GatewayConfigError(f"{where}.auth_header: expected one of {', '.join(AUTH_HEADERS)}, got {auth_header!r}")
    api_key = resolve_secret(table["api_key"], f"{where}.api_key", environ) if "api_key" in table else None
    max_connections = (
        _positive_int(table["max_connections"], f"{where}.max_connections") if "max_connections" in table else None
    )
    health_path = table.get("health_path")
    if health_path is not None:
        if not isinstance(health_path, str) or not health_path.startswith("/") or any(c in health_path for c in " #"):
            raise GatewayConfigError(f"{where}.health_path: expected a path like /v1/models, got {health_path!r}")
        health_path = health_path.encode("ascii")
    stream_usage = table.get("stream_usage", "off")
    if stream_usage not in STREAM_USAGE_MODES:
        raise GatewayConfigError(
            f"{where}.stream_usage: expected one of {', '.join(STREAM_USAGE_MODES)}, got {stream_usage!r}"
        )
    return UpstreamSpec(name, url, parsed, api_key, auth_header.lower(), max_connections, health_path, stream_usage)


def _parse_deployment(value: Any, where: str, upstreams: Dict[str, UpstreamSpec]) -> Deployment:
    table = _table(value, where, DEPLOYMENT_KEYS)
    upstream = table.get("upstream")
    if upstream not in upstreams:
        known = ", ".join(sorted(upstreams))
        raise GatewayConfigError(f"{where}.upstream: no upstream named {upstream!r} (configured: {known})")
    weight = table.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        raise GatewayConfigError(f"{where}.weight: expected a number > 0, got {weight!r}")
    priority = table.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
        raise GatewayConfigError(f"{where}.priority: expected an integer >= 0, got {priority!r}")
    model = table.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise GatewayConfigError(f"{where}.model: expected a model name, got {model!r}")
    return Deployment(upstream, float(weight), priority, model)


def _parse_model(value: Any, where: str, upstreams: Dict[str, UpstreamSpec]) -> ModelSpec:
    table = _table(value, where, MODEL_KEYS)
    name = table.get("name")
    if not isinstance(name, str) or not name:
        raise GatewayConfigError(f"{where}.name: expected the public model name, got {name!r}")
    deployments = table.get("deployments")
    if not isinstance(deployments, list) or not deployments:
        raise GatewayConfigError(f"{where}.deployments: expected a non-empty array of {{ upstream = ... }}")
    parsed = tuple(_parse_deployment(d, f"{where}.deployments[{i}]", upstreams) for i, d in enumerate(deployments))
    retry_on = table.get("retry_on", [])
    if not isinstance(retry_on, list) or not all(str(r) in OPT_IN_RETRIES for r in retry_on):
        raise GatewayConfigError(
            f"{where}.retry_on: expected a list of {', '.join(sorted(OPT_IN_RETRIES))}, got {retry_on!r}"
        )
    max_attempts = _positive_int(table.get("max_attempts", DEFAULT_MAX_ATTEMPTS), f"{where}.max_attempts")
    retry_deadline = table.get("retry_deadline", DEFAULT_RETRY_DEADLINE)
    if isinstance(retry_deadline, bool) or not isinstance(retry_deadline, (int, float)) or not retry_deadline > 0:
        raise GatewayConfigError(f"{where}.retry_deadline: expected seconds > 0, got {retry_deadline!r}")
    early_head_after = _early_head_after(table, where)
    return ModelSpec(
        name, parsed, frozenset(str(r) for r in retry_on), max_attempts, float(retry_deadline), early_head_after
    )


def _early_head_after(table: Mapping[str, Any], where: str) -> Optional[float]:
    value = table.get("early_head_after")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise GatewayConfigError(f"{where}.early_head_after: expected seconds > 0, got {value!r}")
    return float(value)


def parse_auth(value: Any, specs: List[UpstreamSpec], base_dir: str) -> Optional[AuthConfig]:
    """``[auth]``; None when off. Loads the keys file: a mistake is one line at start-up."""
    import os

    from pyproxy.gateway.keys import KeysError, load_keys

    table = _table(value, "auth", AUTH_KEYS)
    mode = table.get("mode", "off")
    if mode not in AUTH_MODES:
        raise GatewayConfigError(f"auth.mode: expected one of {', '.join(AUTH_MODES)}, got {mode!r}")
    if mode == "off":
        return None
    keys_file = table.get("keys_file")
    if not isinstance(keys_file, str) or not keys_file:
        raise GatewayConfigError('auth.keys_file: mode = "keys" needs the keys file (keys_file = "keys.toml")')
    for spec in specs:
        if spec.api_key is None:
            # The client's key is pyproxy's now: it must never reach an upstream.
            raise GatewayConfigError(f'auth: mode = "keys" needs an api_key on every upstream; {spec.name!r} has none')
    reserve_max = _positive_int(table.get("tpm_reserve_max", DEFAULT_TPM_RESERVE_MAX), "auth.tpm_reserve_max")
    backend = table.get("limits_backend", "memory")
    if not isinstance(backend, str) or (
        backend != "memory" and not backend.startswith(("redis://", "rediss://", "unix://"))
    ):
        raise GatewayConfigError(f"auth.limits_backend: expected 'memory' or a redis:// URL, got {backend!r}")
    instances = _positive_int(table.get("instances", 1), "auth.instances")
    share = table.get("limits_local_share", 1.0 / instances)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise GatewayConfigError(f"auth.limits_local_share: expected a fraction in (0, 1], got {share!r}")
    timeout = table.get("limits_redis_timeout", DEFAULT_LIMITS_REDIS_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 10:
        raise GatewayConfigError(f"auth.limits_redis_timeout: expected seconds in (0, 10], got {timeout!r}")
    path = os.path.abspath(os.path.join(base_dir, keys_file))
    try:
        keys = load_keys(path)
    except KeysError as exc:
        raise GatewayConfigError(f"auth.keys_file: {exc}") from None
    return AuthConfig(mode, path, keys, reserve_max, backend, float(share), instances, float(timeout))


def parse_gateway(
    tables: Mapping[str, Any], routes: Tuple[Rule, ...], environ: Mapping[str, str], base_dir: str = "."
) -> Optional[GatewayConfig]:
    """The gateway config from the top-level TOML tables, or None (no ``[[upstreams]]``).
    ``base_dir``: where a relative keys_file is found (the config file's directory)."""
    if "upstreams" not in tables:
        if "auth" in tables and _table(tables["auth"], "auth", AUTH_KEYS).get("mode", "off") != "off":
            raise GatewayConfigError('auth: mode = "keys" needs [[upstreams]], each with its api_key')
        for key in ("models", "model_aliases", "default_upstream", "batching"):
            if key in tables:
                raise GatewayConfigError(f"{key}: needs [[upstreams]]")
        for i, raw in enumerate(tables.get("routes", [])):
            for key in ("upstream", "deployments", "early_head_after"):
                if isinstance(raw, Mapping) and key in raw:
                    raise GatewayConfigError(f"routes[{i}].{key}: needs [[upstreams]]")
        return None
    specs = [
        _parse_upstream(t, f"upstreams[{i}]", environ) for i, t in enumerate(_array(tables["upstreams"], "upstreams"))
    ]
    if not specs:
        raise GatewayConfigError("upstreams: at least one [[upstreams]] is needed")
    by_name: Dict[str, UpstreamSpec] = {}
    for i, spec in enumerate(specs):
        if spec.name in by_name:
            raise GatewayConfigError(f"upstreams[{i}].name: {spec.name!r} is used twice")
        by_name[spec.name] = spec
    models = tuple(
        _parse_model(t, f"models[{i}]", by_name) for i, t in enumerate(_array(tables.get("models", []), "models"))
    )
    seen = set()
    for i, model in enumerate(models):
        if model.name in seen:
            raise GatewayConfigError(f"models[{i}].name: {model.name!r} is used twice")
        seen.add(model.name)
    aliases_table = tables.get("model_aliases", {})
    if not isinstance(aliases_table, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in aliases_table.items()
    ):
        raise GatewayConfigError('model_aliases: expected a table of "alias" = "model"')
    for alias, target in aliases_table.items():
        if target in aliases_table:
            raise GatewayConfigError(f"model_aliases.{alias}: points at another alias ({target!r}); name the model")
    gateway_routes: List[Rule] = []
    route_specs: List[ModelSpec] = []
    for i, (rule, raw) in enumerate(zip(routes, tables.get("routes", []))):
        where = f"routes[{i}]"
        if rule.upstream and "deployments" in raw:
            raise GatewayConfigError(f"{where}: give upstream or deployments, not both")
        if rule.upstream:
            if rule.upstream not in by_name:
                raise GatewayConfigError(f"{where}.upstream: no upstream named {rule.upstream!r}")
            spec = ModelSpec(rule.name, (Deployment(rule.upstream),), early_head_after=_early_head_after(raw, where))
        elif "deployments" in raw:
            route_table = {k: raw[k] for k in MODEL_KEYS - {"name"} if k in raw}
            spec = _parse_model(dict(route_table, name=rule.name), where, by_name)
        elif "early_head_after" in raw:
            raise GatewayConfigError(f"{where}.early_head_after: needs upstream or deployments in the same route")
        else:
            continue  # a name for the metrics only
        gateway_routes.append(rule)
        route_specs.append(spec)
    try:
        batching = parse_batching(tables.get("batching", []))
    except BatchConfigError as exc:
        raise GatewayConfigError(str(exc)) from None
    if batching and not models:
        # A batch goes to one model's deployments: the body's "model" must be read.
        raise GatewayConfigError("batching: needs [[models]] (requests are batched per model)")
    default = tables.get("default_upstream", specs[0].name)
    if default != NO_DEFAULT and default not in by_name:
        raise GatewayConfigError(f'default_upstream: no upstream named {default!r} (or "none")')
    auth = parse_auth(tables["auth"], specs, base_dir) if "auth" in tables else None
    for i, spec in enumerate(specs):
        if spec.stream_usage == "inject" and (auth is None or not models):
            # Usage is read for a key's accounting, of requests whose body was parsed to
            # route by model: without both, injecting would change streams for nothing.
            raise GatewayConfigError(
                f'upstreams[{i}].stream_usage: "inject" is for usage accounting; '
                'it needs [auth] mode = "keys" and [[models]]'
            )
    return GatewayConfig(
        upstreams=tuple(specs),
        models=models,
        aliases=tuple(aliases_table.items()),
        routes=tuple(gateway_routes),
        route_specs=tuple(route_specs),
        default_upstream=None if default == NO_DEFAULT else default,
        upstream_names=tuple(by_name),
        batching=batching,
        auth=auth,
    )
