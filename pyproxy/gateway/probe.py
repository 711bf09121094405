"""Active checks of the gateway's upstreams: each one every --health-interval seconds.

With ``health_path``, an HTTP GET of it (with the upstream's injected key, over
TLS when the upstream is https): a 2xx, 3xx or 4xx means a server that answers
(a 401 from a health path with no key is still a live server), a 5xx or no
answer means down. Without it, a TCP connect. A pass ends an ejection early;
the verdicts feed ``proxy_upstream_up`` and the admin ``/upstreams``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Dict, List, Optional

from pyproxy.gateway.config import UpstreamSpec
from pyproxy.health import BackgroundLoop
from pyproxy.upstream.pool import make_ssl_context

if TYPE_CHECKING:  # pragma: no cover
    from pyproxy.config import Settings
    from pyproxy.gateway.relay import Gateway

log = logging.getLogger("pyproxy.gateway")

MAX_STATUS_LINE = 1024


def check_request(spec: UpstreamSpec) -> bytes:
    assert spec.health_path is not None
    headers = [(b"host", spec.upstream.host_header), (b"user-agent", b"pyproxy-check"), (b"connection", b"close")]
    credential = spec.credential_header()
    if credential is not None:
        headers.append(credential)
    path = spec.upstream.prefix + spec.health_path
    lines = [b"GET " + path + b" HTTP/1.1"] + [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def status_verdict(status_line: bytes) -> Optional[str]:
    """None: up; else why not. RFC 9112 §4: HTTP-version SP 3DIGIT SP reason."""
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit() or len(parts[1]) != 3:
        return "not an HTTP response"
    status = int(parts[1])
    if status >= 500:
        return f"answered {status}"
    return None


class GatewayChecks(BackgroundLoop):
    def __init__(self, gateway: "Gateway", settings: "Settings") -> None:
        self.gateway = gateway
        self.interval = settings.health_interval
        self.timeout = min(settings.connect_timeout, settings.health_interval)
        self.ca = settings.upstream_ca
        self._task: Optional["asyncio.Task[None]"] = None
        self._stopping: Optional[asyncio.Event] = None

    async def _run(self, stopping: asyncio.Event) -> None:
        specs: List[UpstreamSpec] = list(self.gateway.config.upstreams)
        contexts: Dict[str, object] = {s.name: make_ssl_context(self.ca) for s in specs if s.upstream.tls}
        while not stopping.is_set():
            await asyncio.gather(*(self.check_once(spec, contexts.get(spec.name)) for spec in specs))
            try:
                await asyncio.wait_for(stopping.wait(), self.interval)
            except asyncio.TimeoutError:
                pass

    async def check_once(self, spec: UpstreamSpec, ssl_context: object = None) -> None:
        error = await self._probe(spec, ssl_context)
        if self._stopping is not None and self._stopping.is_set():
            return
        if error is None:
            self.gateway.check_passed(spec.name)
        else:
            self.gateway.check_failed(spec.name, error)

    async def _probe(self, spec: UpstreamSpec, ssl_context: object) -> Optional[str]:
        upstream = spec.upstream
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    upstream.host,
                    upstream.port,
                    ssl=ssl_context,
                    server_hostname=upstream.host if ssl_context is not None else None,
                ),
                self.timeout,
            )
            if spec.health_path is None:
                return None
            writer.write(check_request(spec))
            line = await asyncio.wait_for(reader.readline(), self.timeout)
            return status_verdict(line[:MAX_STATUS_LINE].rstrip(b"\r\n"))
        except asyncio.TimeoutError:
            return "timed out"
        except (OSError, ValueError) as exc:  # refused, reset, TLS (ssl.SSLError is an OSError)
            return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        finally:
            if writer is not None:
                writer.close()
                try:
                    await writer.wait_closed()
                except (OSError, ValueError):
                    pass
