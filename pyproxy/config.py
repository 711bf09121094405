"""Settings: one table of options, read from defaults < TOML file < environment < command line.

Every option has a ``PYPROXY_<NAME>`` environment variable; a few also answer
to the names the users' current proxy reads (``HTTP_POOL_CONNECTIONS``...).
Every bad value raises ``ConfigError`` with one line that names the option.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple
from urllib.parse import urlsplit

from pyproxy._compat import IS_PYPY, LOOP_CHOICES, MissingDependency, require
from pyproxy.gateway.config import GatewayConfig, GatewayConfigError, parse_gateway
from pyproxy.rules import (
    ANY_METHOD,
    CACHE_RULE_KEYS,
    DEDUP_RULE_KEYS,
    DEFAULT_CACHE_RULES,
    ROUTE_KEYS,
    Rule,
    RuleError,
    parse_rules,
)


class ConfigError(ValueError):
    """A wrong setting; the message is the one line the user sees."""


@dataclass(frozen=True)
class Upstream:
    scheme: str
    host: str
    port: int
    prefix: bytes  # path prefix without trailing slash, b"" for none

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def host_header(self) -> bytes:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return (host if self.port == default else f"{host}:{self.port}").encode("idna")

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.host_header.decode()}"


def parse_upstream(value: str) -> Upstream:
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"must start with http:// or https://, got {value!r}")
    if not parts.hostname:
        raise ConfigError(f"has no host: {value!r}")
    if parts.username or parts.password:
        raise ConfigError("must not carry credentials; send them as request headers")
    if parts.query or parts.fragment:
        raise ConfigError("must not have a query or fragment")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    prefix = parts.path.rstrip("/").encode("ascii", "strict") if parts.path else b""
    return Upstream(parts.scheme, parts.hostname, port, prefix)


def parse_listen(value: str) -> Tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigError(f"expected HOST:PORT, got {value!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(f"port out of range: {port}")
    host = host.strip("[]") or "0.0.0.0"
    return host, port


def _positive_float(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"expected a number of seconds, got {value!r}") from None
    if not number > 0 or number != number or number == float("inf"):
        raise ConfigError(f"expected a positive number of seconds, got {value!r}")
    return number


def _int_at_least(minimum: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise ConfigError(f"expected an integer, got {value!r}")
        try:
            number = int(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(f"expected an integer, got {value!r}") from None
        if number < minimum:
            raise ConfigError(f"must be at least {minimum}, got {number}")
        return number

    return parse


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"expected true or false, got {value!r}")


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).lower()
        if text not in choices:
            raise ConfigError(f"expected one of {', '.join(choices)}, got {value!r}")
        return text

    return parse


def _readable_file(value: Any) -> str:
    path = str(value)
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ConfigError(f"no readable file at {path!r}")
    return path


def _admin_token(value: Any) -> Any:
    """env:NAME or file:PATH (never the token itself on a command line, where ps shows it)."""
    from pyproxy.gateway.config import resolve_secret

    text = str(value)
    if not (text.startswith("env:") or text.startswith("file:")):
        raise ConfigError("expected env:NAME or file:PATH (a token on the command line is visible to ps)")
    try:
        return resolve_secret(text, "the admin token", os.environ)
    except GatewayConfigError as exc:
        raise ConfigError(str(exc).replace("the admin token: ", "", 1)) from None


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _cache_backend(value: Any) -> str:
    text = str(value)
    if text == "memory":
        return text
    if not text.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"expected 'memory' or a redis:// URL, got {value!r}")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ConfigError(f"not a valid Redis URL ({exc})") from None
    if parts.scheme == "unix" and not parts.path:
        raise ConfigError(f"a unix:// Redis URL needs a socket path, got {value!r}")
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"a Redis URL needs a host, got {value!r}")
    return text


def _header_names(value: Any) -> Tuple[bytes, ...]:
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"expected a list of header names, got {value!r}")
    cleaned = tuple(n.strip().lower().encode("ascii") for n in names if n.strip())
    for name in cleaned:
        if not name.replace(b"-", b"").replace(b"_", b"").isalnum():
            raise ConfigError(f"not a header name: {name.decode()!r}")
    return cleaned


def _seconds_or_off(value: Any) -> Optional[float]:
    if isinstance(value, bool) and not value:
        return None  # sse_keepalive = false in the TOML file
    if str(value).strip().lower() == "off":
        return None
    return _positive_float(value)


# PyPy interprets a code path until it has run it often enough to compile it: a
# fresh process warms up on loopback traffic of its own first (pyproxy/warmup.py).
# CPython has nothing to warm.
WARMUP_AUTO = 2.0 if IS_PYPY else 0.0
WARMUP_MAX = 60.0


def _warmup(value: Any) -> float:
    text = str(value).strip().lower()
    if text == "auto":
        return WARMUP_AUTO
    if text in ("off", "false"):
        return 0.0
    try:
        if float(text) == 0:
            return 0.0
    except ValueError:
        pass  # _positive_float says what is wrong
    seconds = _positive_float(value)
    if seconds > WARMUP_MAX:
        raise ConfigError(f"at most {WARMUP_MAX:.0f} seconds, got {value!r}")
    return seconds


def _listen_or_off(value: Any) -> Optional[Tuple[str, int]]:
    text = str(value)
    return None if text.lower() == "off" else parse_listen(text)


def _path_or_off(value: Any) -> Optional[bytes]:
    text = str(value)
    if text.lower() == "off":
        return None
    if not text.startswith("/") or any(c in text for c in " ?#"):
        raise ConfigError(f"expected a path like /health, or off, got {value!r}")
    return text.encode("ascii")


def _log_target(value: Any) -> Optional[str]:
    text = str(value)
    if text.lower() == "off" or not text:
        return None
    if text == "-":
        return text
    directory = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise ConfigError(f"cannot write a log file in {directory!r}")
    return text


def _workers(value: Any) -> int:
    text = str(value).strip().lower()
    if text == "auto":
        return 0  # resolved at start: one per CPU this process may run on
    return _int_at_least(1)(text)


def _upstream(value: Any) -> Upstream:
    return parse_upstream(str(value))


def _listen(value: Any) -> Tuple[str, int]:
    return parse_listen(str(value))


@dataclass(frozen=True)
class Option:
    name: str  # attribute name; the flag is --name-with-dashes
    parse: Callable[[Any], Any]
    default: Any
    help: str
    env_aliases: Tuple[str, ...] = ()
    metavar: Optional[str] = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env_names(self) -> Tuple[str, ...]:
        return ("PYPROXY_" + self.name.upper(),) + self.env_aliases


OPTIONS: Tuple[Option, ...] = (
    Option("listen", _listen, ("127.0.0.1", 8080), "address to accept clients on", metavar="HOST:PORT"),
    Option("upstream", _upstream, None, "upstream base URL, http:// or https://, optional path prefix", metavar="URL"),
    Option("connect_timeout", _positive_float, 10.0, "seconds to open an upstream connection (504 after)", metavar="S"),
    Option(
        "read_timeout",
        _positive_float,
        300.0,
        "longest silence between two upstream reads (504 / truncation after)",
        metavar="S",
    ),
    Option(
        "pool_connections",
        _int_at_least(1),
        1000,
        "most upstream connections at once (each concurrent stream holds one)",
        ("HTTP_POOL_CONNECTIONS",),
        "N",
    ),
    Option(
        "keepalive_connections",
        _int_at_least(0),
        30,
        "most idle upstream connections kept",
        ("HTTP_KEEPALIVE_CONNECTIONS",),
        "N",
    ),
    Option(
        "keepalive_expiry",
        _positive_float,
        4.0,
        "seconds an idle upstream connection is kept (below the upstream's own idle timeout)",
        metavar="S",
    ),
    Option(
        "pool_timeout", _positive_float, 10.0, "seconds to wait for a free upstream connection (503 after)", metavar="S"
    ),
    Option(
        "max_body_size",
        _int_at_least(0),
        100 * 1024 * 1024,
        "largest request body accepted (413 above)",
        metavar="BYTES",
    ),
    Option(
        "max_header_size", _int_at_least(1024), 64 * 1024, "largest request head accepted (431 above)", metavar="BYTES"
    ),
    Option(
        "client_timeout",
        _positive_float,
        60.0,
        "seconds a client may idle between requests (closed up to min(1 s, S/4) later)",
        metavar="S",
    ),
    Option(
        "heap_release",
        _bool,
        True,
        "after a burst of connections, give the heap's free memory back to the OS (glibc malloc_trim)",
        metavar="BOOL",
    ),
    Option(
        "warmup",
        _warmup,
        WARMUP_AUTO,
        "seconds of loopback traffic relayed before listening, to warm PyPy's JIT (auto: 2 on PyPy, off on CPython)",
        metavar="S|auto|off",
    ),
    Option(
        "header_timeout",
        _positive_float,
        10.0,
        "seconds a request head may take from its first byte to its last (408 after)",
        metavar="S",
    ),
    Option(
        "body_timeout",
        _positive_float,
        30.0,
        "window over which a request body's arrival rate is checked (408 when too slow)",
        metavar="S",
    ),
    Option(
        "body_min_rate",
        _int_at_least(0),
        1024,
        "bytes per second a request body must average over each --body-timeout window",
        metavar="BYTES",
    ),
    Option("drain_timeout", _positive_float, 30.0, "seconds in-flight requests get to finish on SIGTERM", metavar="S"),
    Option(
        "upstream_ca",
        _readable_file,
        None,
        "PEM file of CAs trusted for an https upstream (default: system CAs)",
        metavar="FILE",
    ),
    Option(
        "route_body_bytes",
        _int_at_least(0),
        8 * 1024 * 1024,
        'largest request body read to route by its JSON "model" ([[models]]; 413 above)',
        metavar="BYTES",
    ),
    Option(
        "retry_buffer_bytes",
        _int_at_least(0),
        8 * 1024 * 1024,
        "request body kept to fail over to another upstream (a larger one fails over only if unsent)",
        metavar="BYTES",
    ),
    Option(
        "upstream_headers",
        _bool,
        True,
        "tell clients which upstream answered and after how many attempts (x-pyproxy-upstream, -attempts)",
        metavar="BOOL",
    ),
    Option(
        "allow_underscore_headers",
        _bool,
        False,
        "forward header names containing '_' (dropped by default, like nginx)",
        metavar="BOOL",
    ),
    Option("cache_enabled", _bool, True, "response cache on or off (--no-cache turns it off)", metavar="BOOL"),
    Option(
        "cache_backend",
        _cache_backend,
        "memory",
        "where cached responses live: memory (this process) or a redis:// URL (shared)",
        metavar="memory|URL",
    ),
    Option("cache_max_bytes", _int_at_least(0), 256 * 1024 * 1024, "memory cache bound in bytes", metavar="BYTES"),
    Option("cache_max_entries", _int_at_least(1), 100_000, "memory cache bound in entries", metavar="N"),
    Option(
        "cache_max_object_bytes",
        _int_at_least(0),
        4 * 1024 * 1024,
        "largest response body stored (larger ones are relayed, not stored)",
        metavar="BYTES",
    ),
    Option(
        "cache_identity_headers",
        _header_names,
        (),
        "headers that identify the caller, in addition to Authorization, X-Api-Key, Api-Key and Cookie",
        metavar="NAME,...",
    ),
    Option(
        "cache_redis_timeout",
        _positive_float,
        0.25,
        "seconds a Redis operation may take before the request goes on as a miss",
        metavar="S",
    ),
    Option(
        "cache_max_key_body",
        _int_at_least(0),
        1024 * 1024,
        "largest request body a POST rule keys on (larger ones are relayed, not cached or coalesced)",
        metavar="BYTES",
    ),
    Option(
        "dedup_enabled", _bool, True, "coalesce identical in-flight requests (--no-dedup turns it off)", metavar="BOOL"
    ),
    Option(
        "dedup_replay_bytes",
        _int_at_least(0),
        1024 * 1024,
        "response bytes kept so a late request can join a fetch in flight",
        metavar="BYTES",
    ),
    Option(
        "dedup_max_backlog",
        _int_at_least(64 * 1024),
        4 * 1024 * 1024,
        "unsent bytes a joined client may fall behind before it is disconnected",
        metavar="BYTES",
    ),
    Option(
        "inflight_buffer_bytes",
        _int_at_least(0),
        64 * 1024 * 1024,
        "response bytes all requests in flight may keep together, for the cache and for late"
        " joiners (past it, a response is relayed without being kept)",
        metavar="BYTES",
    ),
    Option(
        "admin_listen",
        _listen_or_off,
        ("127.0.0.1", 9901),
        "admin listener for /metrics, /health, /ready and POST /cache/purge, or off",
        metavar="HOST:PORT|off",
    ),
    Option(
        "admin_token",
        _admin_token,
        None,
        "bearer token the admin listener requires for everything but /health and /ready "
        "(env:NAME or file:PATH; needed when --admin-listen is not loopback)",
        metavar="env:NAME|file:PATH",
    ),
    Option(
        "health_path",
        _path_or_off,
        b"/health",
        "path the main listener answers itself with 200 (liveness), or off",
        metavar="PATH|off",
    ),
    Option(
        "health_interval",
        _positive_float,
        10.0,
        "seconds between background checks that the upstream accepts connections",
        metavar="S",
    ),
    Option("access_log", _log_target, None, "access log: - (stdout), a file path, or off", metavar="-|PATH|off"),
    Option(
        "access_log_format", _choice("json", "common"), "json", "access log lines: json or common", metavar="FORMAT"
    ),
    Option("request_id", _bool, True, "propagate X-Request-Id, or generate one, and return it", metavar="BOOL"),
    Option("server_timing", _bool, True, "add a Server-Timing header (proxy and upstream time)", metavar="BOOL"),
    Option("gzip", _bool, True, "gzip compressible responses for clients that accept it", metavar="BOOL"),
    Option(
        "gzip_min_length",
        _int_at_least(0),
        1000,
        "smallest Content-Length compressed (responses of unknown length always are)",
        metavar="BYTES",
    ),
    Option("gzip_level", _int_at_least(1), 5, "gzip compression level, 1-9", metavar="N"),
    Option(
        "sse_keepalive",
        _seconds_or_off,
        15.0,
        "seconds an event stream may be silent before pyproxy writes a ': ping' comment "
        "between events, so idle timeouts on the way do not cut it (off: never)",
        metavar="S|off",
    ),
    Option(
        "workers",
        _workers,
        None,
        "run a supervisor and N worker processes sharing the listener (auto: one per CPU); "
        "it restarts crashed workers and reloads on SIGHUP (default: one process, no supervisor)",
        metavar="N|auto",
    ),
    Option("loop", _choice(*LOOP_CHOICES), "auto", "event loop implementation", metavar="auto|asyncio|uvloop"),
    Option("log_level", _choice("debug", "info", "warning", "error"), "info", "logging level", metavar="LEVEL"),
)
OPTIONS_BY_NAME: Dict[str, Option] = {o.name: o for o in OPTIONS}


@dataclass(frozen=True)
class Settings:
    listen: Tuple[str, int] = ("127.0.0.1", 8080)
    upstream: Optional[Upstream] = None
    connect_timeout: float = 10.0
    read_timeout: float = 300.0
    pool_connections: int = 1000
    keepalive_connections: int = 30
    keepalive_expiry: float = 4.0
    pool_timeout: float = 10.0
    max_body_size: int = 100 * 1024 * 1024
    max_header_size: int = 64 * 1024
    client_timeout: float = 60.0
    heap_release: bool = True
    warmup: float = WARMUP_AUTO
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    body_min_rate: int = 1024
    drain_timeout: float = 30.0
    upstream_ca: Optional[str] = None
    route_body_bytes: int = 8 * 1024 * 1024
    retry_buffer_bytes: int = 8 * 1024 * 1024
    upstream_headers: bool = True
    allow_underscore_headers: bool = False
    cache_enabled: bool = True
    cache_backend: str = "memory"
    cache_max_bytes: int = 256 * 1024 * 1024
    cache_max_entries: int = 100_000
    cache_max_object_bytes: int = 4 * 1024 * 1024
    cache_identity_headers: Tuple[bytes, ...] = ()
    cache_redis_timeout: float = 0.25
    cache_max_key_body: int = 1024 * 1024
    dedup_enabled: bool = True
    dedup_replay_bytes: int = 1024 * 1024
    dedup_max_backlog: int = 4 * 1024 * 1024
    inflight_buffer_bytes: int = 64 * 1024 * 1024
    admin_listen: Optional[Tuple[str, int]] = ("127.0.0.1", 9901)
    admin_token: Any = None  # a gateway.config.Secret, or None: no token asked
    health_path: Optional[bytes] = b"/health"
    health_interval: float = 10.0
    access_log: Optional[str] = None
    access_log_format: str = "json"
    request_id: bool = True
    server_timing: bool = True
    gzip: bool = True
    gzip_min_length: int = 1000
    gzip_level: int = 5
    sse_keepalive: Optional[float] = 15.0  # None: off
    workers: Optional[int] = None  # None: one process, no supervisor; 0: one worker per CPU
    loop: str = "auto"
    log_level: str = "info"
    config: Optional[str] = field(default=None)
    # Only from the TOML file: [[cache.rules]] and [[dedup.rules]].
    cache_rules: Tuple[Rule, ...] = DEFAULT_CACHE_RULES
    dedup_rules: Tuple[Rule, ...] = ()
    routes: Tuple[Rule, ...] = ()  # [[routes]]: names for the metrics' endpoint label
    # [[upstreams]], [[models]]...: several upstreams (None: the one --upstream).
    gateway: Optional[GatewayConfig] = None


def load_toml(path: str) -> Dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.9/3.10 (PyPy)
        try:
            require("tomli", "--config")
        except MissingDependency as exc:
            raise ConfigError(str(exc)) from None
        import tomli as tomllib
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path}: {exc}") from None


_SECTIONS = {"cache": CACHE_RULE_KEYS, "dedup": DEDUP_RULE_KEYS}
# The gateway's tables (pyproxy/gateway/config.py), parsed once the routes are known.
GATEWAY_TABLES = ("upstreams", "models", "model_aliases", "default_upstream", "batching", "auth")


def _flatten_toml(
    table: Mapping[str, Any], path: str, rules: Dict[str, Tuple[Rule, ...]], gateway: Dict[str, Any]
) -> Dict[str, Tuple[str, Any]]:
    """``[cache] backend = ...`` is the option cache_backend; ``[[cache.rules]]`` are rules;
    the gateway's tables go to ``gateway``."""
    flat: Dict[str, Tuple[str, Any]] = {}
    for key, value in table.items():
        section = key.replace("-", "_")
        if section in GATEWAY_TABLES:
            gateway[section] = value
        elif section == "routes":
            gateway["routes"] = value  # their upstream / deployments keys are the gateway's
            try:
                rules["routes"] = parse_rules(value, "routes", ROUTE_KEYS, ANY_METHOD)
            except RuleError as exc:
                raise ConfigError(f"--config: {path}: {exc}") from None
        elif section in _SECTIONS and isinstance(value, Mapping):
            for sub, sub_value in value.items():
                sub_key = sub.replace("-", "_")
                if sub_key == "rules":
                    try:
                        rules[f"{section}_rules"] = parse_rules(sub_value, f"{section}.rules", _SECTIONS[section])
                    except RuleError as exc:
                        raise ConfigError(f"--config: {path}: {exc}") from None
                else:
                    name = "enabled" if sub_key == "enabled" else sub_key
                    flat[f"{section}_{name}"] = (f"{section}.{sub}", sub_value)
        else:
            flat[key] = (key, value)
    return flat


def build_settings(
    cli: Mapping[str, Any],
    environ: Mapping[str, str],
    *,
    require_upstream: bool = True,
) -> Settings:
    """Merge the sources; ``cli`` holds only the options given on the command line."""
    raw: Dict[str, Tuple[str, Any]] = {}
    rules: Dict[str, Tuple[Rule, ...]] = {}
    gateway_tables: Dict[str, Any] = {}
    config_path = cli.get("config") or environ.get("PYPROXY_CONFIG")
    if config_path:
        for key, (where, value) in _flatten_toml(load_toml(config_path), config_path, rules, gateway_tables).items():
            option = OPTIONS_BY_NAME.get(key.replace("-", "_"))
            if option is None:
                raise ConfigError(f"--config: {config_path}: unknown setting {where!r}")
            raw[option.name] = (f"{where} in {config_path}", value)
    for option in OPTIONS:
        for env_name in option.env_names:
            if env_name in environ:
                raw[option.name] = (env_name, environ[env_name])
                break
    for name, value in cli.items():
        if name in OPTIONS_BY_NAME and value is not None:
            raw[name] = (OPTIONS_BY_NAME[name].flag, value)

    values: Dict[str, Any] = {}
    for name, (source, value) in raw.items():
        try:
            values[name] = OPTIONS_BY_NAME[name].parse(value)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    gateway = None
    try:
        base_dir = os.path.dirname(os.path.abspath(config_path)) if config_path else "."
        gateway = parse_gateway(gateway_tables, rules.get("routes", ()), environ, base_dir)
    except GatewayConfigError as exc:
        raise ConfigError(f"--config: {config_path}: {exc}") from None
    if gateway is not None:
        if values.get("upstream") is not None:
            raise ConfigError(f"--upstream and [[upstreams]] in {config_path}: give one or the other")
        values["upstream"] = gateway.upstreams[0].upstream  # the first one: what single-upstream code reads
    if require_upstream and values.get("upstream") is None:
        raise ConfigError("--upstream is required (or PYPROXY_UPSTREAM, or 'upstream' in --config)")
    settings = Settings(config=config_path, gateway=gateway, **values, **rules)
    # Optional packages the settings need, checked now: one line, not a traceback later.
    try:
        if settings.cache_enabled and settings.cache_backend != "memory":
            require("redis", f"--cache-backend {settings.cache_backend.split('://')[0]}://")
        if settings.admin_listen is not None:
            require("prometheus_client", "--admin-listen (its /metrics)")
    except MissingDependency as exc:
        raise ConfigError(str(exc)) from None
    if (
        settings.admin_listen is not None
        and settings.admin_token is None
        and not _is_loopback(settings.admin_listen[0])
    ):
        raise ConfigError(
            f"--admin-listen {settings.admin_listen[0]}: not a loopback address, so --admin-token is required "
            "(the admin listener can empty the cache and shows usage per key)"
        )
    if settings.gzip_level > 9:
        raise ConfigError(f"--gzip-level must be 1-9, got {settings.gzip_level}")
    if settings.keepalive_connections > settings.pool_connections:
        raise ConfigError(
            f"--keepalive-connections ({settings.keepalive_connections}) must not exceed "
            f"--pool-connections ({settings.pool_connections})"
        )
    return settings
