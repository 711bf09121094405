"""Gateway test helpers: settings from a real TOML file, and a running gateway."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import tempfile
from typing import Any, AsyncIterator, Dict, Mapping, Optional

from pyproxy.config import Settings, build_settings
from pyproxy.proxy import Proxy


def gateway_settings(toml: str, environ: Optional[Mapping[str, str]] = None, **overrides: Any) -> Settings:
    """Settings read the way the CLI reads them (build_settings over a config file),
    listening on an ephemeral port, no admin listener unless asked."""
    fd, path = tempfile.mkstemp(suffix=".toml", prefix="pyproxy-gw-")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(toml)
        settings = build_settings({"config": path}, dict(environ or {}))
    finally:
        os.unlink(path)
    values: Dict[str, Any] = dict(listen=("127.0.0.1", 0), admin_listen=None)
    values.update(overrides)
    return dataclasses.replace(settings, **values)


@contextlib.asynccontextmanager
async def running_gateway(
    toml: str, environ: Optional[Mapping[str, str]] = None, **overrides: Any
) -> AsyncIterator[Proxy]:
    proxy = Proxy(gateway_settings(toml, environ, **overrides), asyncio.get_running_loop())
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop(drain_timeout=2.0)


def upstreams_toml(**origins: Any) -> str:
    """[[upstreams]] tables for name=origin (an Origin, or a URL string)."""
    out = []
    for name, origin in origins.items():
        url = origin if isinstance(origin, str) else origin.url
        out.append(f'[[upstreams]]\nname = "{name}"\nurl = "{url}"\n')
    return "\n".join(out)
