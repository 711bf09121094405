"""Settings merge and validation, without starting anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyproxy.cli import parse_settings
from pyproxy.config import ConfigError, build_settings, parse_upstream


def test_defaults() -> None:
    s = build_settings({"upstream": "http://127.0.0.1:9000"}, {})
    assert s.listen == ("127.0.0.1", 8080)
    assert (s.connect_timeout, s.read_timeout, s.keepalive_expiry) == (10.0, 300.0, 4.0)
    assert (s.pool_connections, s.keepalive_connections) == (1000, 30)
    assert s.allow_underscore_headers is False and s.loop == "auto"


def test_precedence_cli_over_env_over_file(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('upstream = "http://file:1"\nread-timeout = 7\npool_connections = 41\nconnect_timeout = 3\n')
    env = {"PYPROXY_READ_TIMEOUT": "8", "HTTP_POOL_CONNECTIONS": "42"}
    s = parse_settings(["--config", str(config), "--read-timeout", "9"], env)
    assert s.read_timeout == 9.0  # cli
    assert s.pool_connections == 42  # env alias beats file
    assert s.connect_timeout == 3.0  # file
    assert s.upstream is not None and s.upstream.host == "file"


def test_pyproxy_env_name_beats_alias() -> None:
    s = build_settings({"upstream": "http://x"}, {"PYPROXY_POOL_CONNECTIONS": "35", "HTTP_POOL_CONNECTIONS": "36"})
    assert s.pool_connections == 35


def test_parse_upstream() -> None:
    u = parse_upstream("https://api.example.com/openai/")
    assert (u.scheme, u.host, u.port, u.prefix) == ("https", "api.example.com", 443, b"/openai")
    assert u.host_header == b"api.example.com"
    u = parse_upstream("http://[::1]:8000")
    assert u.host == "::1" and u.host_header == b"[::1]:8000"


@pytest.mark.parametrize(
    "value", ["ftp://x", "http://", "http://user:pw@host", "http://host/?q=1", "http://host:99999"]
)
def test_parse_upstream_rejects(value: str) -> None:
    with pytest.raises(ConfigError):
        parse_upstream(value)


@pytest.mark.parametrize(
    "cli, message",
    [
        ({"upstream": "http://x", "read_timeout": "0"}, "--read-timeout"),
        ({"upstream": "http://x", "read_timeout": "nan"}, "--read-timeout"),
        ({"upstream": "http://x", "max_body_size": "-1"}, "--max-body-size"),
        ({"upstream": "http://x", "max_header_size": "10"}, "--max-header-size"),
        ({"upstream": "http://x", "listen": "1.2.3.4"}, "--listen"),
        ({"upstream": "http://x", "allow_underscore_headers": "maybe"}, "--allow-underscore-headers"),
        ({"upstream": "http://x", "log_level": "loud"}, "--log-level"),
    ],
)
def test_bad_values_name_their_option(cli: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_settings(cli, {})


def test_listen_forms() -> None:
    assert build_settings({"upstream": "http://x", "listen": ":9000"}, {}).listen == ("0.0.0.0", 9000)
    assert build_settings({"upstream": "http://x", "listen": "[::1]:9000"}, {}).listen == ("::1", 9000)


def test_the_example_config_in_deploy_loads() -> None:
    path = Path(__file__).resolve().parents[2] / "deploy" / "pyproxy.toml"
    s = build_settings({"config": str(path)}, {})
    assert s.upstream is not None and s.upstream.host == "api.openai.com"
    assert [r.name for r in s.cache_rules] == ["/v1/models", "/v1/embeddings", "/v1/chat/completions"]
    assert s.cache_rules[2].stream and s.cache_rules[2].when == (("temperature", 0),)
    assert s.dedup_rules[0].matches(b"POST", b"/v1/chat/completions")
    assert s.routes[0].name == "assistants" and s.routes[0].matches(b"GET", b"/v1/assistants/asst_1")
    assert s.cache_identity_headers == (b"openai-organization", b"openai-project")
    assert s.access_log == "-" and s.admin_listen == ("127.0.0.1", 9901)
