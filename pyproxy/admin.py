"""The admin listener: /metrics, /health, /ready, /upstreams, /usage and POST /cache/purge. Never proxied.

Low traffic, so plain asyncio streams and h11. It serves whatever ``AdminSource``
it is given: one proxy process, or the supervisor speaking for its workers.
Bind it to loopback or a private interface: it can empty the cache.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any, Awaitable, Callable, Dict, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

import h11

from pyproxy._compat import json_dumps, json_loads
from pyproxy.metrics import render

log = logging.getLogger("pyproxy.admin")

MAX_BODY = 64 * 1024


class AdminSource:
    """What the admin endpoints read and do."""

    def snapshot(self) -> Dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    async def fresh_snapshot(self) -> Dict[str, Any]:
        return self.snapshot()

    def health(self) -> Dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def ready(self) -> bool:  # pragma: no cover
        raise NotImplementedError

    async def purge(self, path: Optional[bytes], prefix: Optional[bytes]) -> int:  # pragma: no cover
        raise NotImplementedError

    async def upstreams(self) -> Dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def auth_config(self) -> Any:
        """The [auth] config (pyproxy.gateway.config.AuthConfig), or None."""
        return None


# Answered without the admin token: what load balancers and orchestrators probe.
OPEN_PATHS = frozenset({"/health", "/ready"})


class AdminServer:
    def __init__(self, source: AdminSource, token: Optional[bytes] = None) -> None:
        self.source = source
        self.token = token  # --admin-token: required for everything but OPEN_PATHS
        self._server: Optional[asyncio.AbstractServer] = None
        self._tasks: "set[asyncio.Task[None]]" = set()
        self._redis: Any = None  # a RespClient for /usage with the Redis limits backend

    async def start(self, host: str, port: int, sock: Any = None) -> None:
        if sock is not None:
            self._server = await asyncio.start_server(self._serve, sock=sock)
        else:
            self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._redis is not None:
            self._redis.close()
            self._redis = None
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        try:
            while True:
                request, body = await self._read_request(conn, reader)
                if request is None:
                    return
                status, headers, payload = await self._route(request, body)
                headers = headers + [(b"content-length", b"%d" % len(payload))]
                writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
                if payload and request.method != b"HEAD":
                    writer.write(conn.send(h11.Data(data=payload)))
                writer.write(conn.send(h11.EndOfMessage()))
                await writer.drain()
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (h11.RemoteProtocolError, h11.LocalProtocolError, ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            return
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    @staticmethod
    async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader) -> Tuple[Optional[h11.Request], bytes]:
        request = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await asyncio.wait_for(reader.read(65536), 30.0)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    return None, b""
            elif isinstance(event, h11.EndOfMessage):
                return request, body
            else:
                return None, b""

    async def _route(self, request: h11.Request, body: bytes) -> Tuple[int, list, bytes]:
        parts = urlsplit(request.target.decode("latin-1"))
        path, method = parts.path, request.method
        handlers: Dict[str, Tuple[Tuple[bytes, ...], Callable[..., Awaitable[Tuple[int, list, bytes]]]]] = {
            "/metrics": ((b"GET", b"HEAD"), self._metrics),
            "/health": ((b"GET", b"HEAD"), self._health),
            "/ready": ((b"GET", b"HEAD"), self._ready),
            "/cache/purge": ((b"POST",), self._purge),
            "/upstreams": ((b"GET", b"HEAD"), self._upstreams),
            "/usage": ((b"GET", b"HEAD"), self._usage),
        }
        if self.token is not None and path not in OPEN_PATHS and not self._authorized(request.headers):
            status, headers, payload = _json(401, {"error": "this admin endpoint needs Authorization: Bearer <token>"})
            return status, headers + [(b"www-authenticate", b'Bearer realm="pyproxy-admin"')], payload
        entry = handlers.get(path)
        if entry is None:
            return _json(404, {"error": f"no admin endpoint {path}", "endpoints": sorted(handlers)})
        methods, handler = entry
        if method not in methods:
            status, headers, payload = _json(405, {"error": f"{path} accepts {', '.join(m.decode() for m in methods)}"})
            return status, headers + [(b"allow", b", ".join(methods))], payload
        try:
            return await handler(parts.query, body)
        except Exception as exc:  # an admin request must never take the process down
            log.exception("admin %s failed", path)
            return _json(500, {"error": f"{type(exc).__name__}: {exc}"})

    async def _metrics(self, query: str, body: bytes) -> Tuple[int, list, bytes]:
        snap = await self.source.fresh_snapshot()
        payload, content_type = render(lambda: snap)
        return 200, [(b"content-type", content_type.encode())], payload

    async def _health(self, query: str, body: bytes) -> Tuple[int, list, bytes]:
        return _json(200, self.source.health())

    async def _ready(self, query: str, body: bytes) -> Tuple[int, list, bytes]:
        ready = self.source.ready()
        return _json(200 if ready else 503, {"ready": ready})

    def _authorized(self, headers: Any) -> bool:
        for name, value in headers:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                # Constant time in the token's bytes: no guessing it byte by byte.
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.token)  # type: ignore[arg-type]
        return False

    async def _usage(self, query: str, body: bytes) -> Tuple[int, list, bytes]:
        """Client keys' usage, per key and per tenant: since start, summed over workers;
        with the Redis limits backend, every instance's totals from Redis."""
        usage = (await self.source.fresh_snapshot()).get("usage")
        if usage is None:
            return _json(404, {"error": 'usage is counted with client keys ([auth] mode = "keys")'})
        answer = {
            "keys": usage["per_key"],
            "tenants": usage["per_tenant"],
            "in_flight": usage.get("in_flight", {}),
            "usage_unknown": usage["unknown"],
            "source": "this instance",
        }
        auth = self.source.auth_config()
        if auth is not None and auth.limits_backend != "memory":
            from pyproxy.gateway.shared_limits import read_usage
            from pyproxy.resp import RespClient

            if self._redis is None:
                timeout = max(1.0, auth.limits_redis_timeout)
                self._redis = RespClient(auth.limits_backend, timeout, asyncio.get_running_loop())
            try:
                answer.update(await read_usage(self._redis), source="redis")
            except (ConnectionError, OSError, asyncio.TimeoutError) as exc:
                answer["source"] = f"this instance (redis unavailable: {type(exc).__name__})"
        return _json(200, answer)

    async def _upstreams(self, query: str, body: bytes) -> Tuple[int, list, bytes]:
        return _json(200, await self.source.upstreams())

    async def _purge(self, query: str, body: bytes) -> Tuple[int, list, bytes]:
        params: Dict[str, Any] = {k: v[-1] for k, v in parse_qs(query).items()}
        if body.strip():
            try:
                parsed = json_loads(body)
            except ValueError:
                return _json(400, {"error": 'the body must be JSON: {"path": ...} / {"prefix": ...} / {"all": true}'})
            if not isinstance(parsed, dict):
                return _json(400, {"error": "the body must be a JSON object"})
            params.update(parsed)
        path, prefix, everything = params.get("path"), params.get("prefix"), params.get("all")
        given = [name for name in ("path", "prefix") if params.get(name) is not None]
        if everything in (True, "true", "1"):
            given.append("all")
        if len(given) != 1:
            return _json(400, {"error": "give exactly one of path, prefix or all=true"})
        for value in (path, prefix):
            if value is not None and (not isinstance(value, str) or not value.startswith("/")):
                return _json(400, {"error": "path and prefix must be strings starting with '/'"})
        removed = await self.source.purge(
            path.encode() if isinstance(path, str) else None, prefix.encode() if isinstance(prefix, str) else None
        )
        return _json(200, {"purged": removed})


def admin_token_bytes(settings: Any) -> Optional[bytes]:
    token = settings.admin_token
    return token.value.encode("latin-1") if token is not None else None


def _json(status: int, obj: Any) -> Tuple[int, list, bytes]:
    return status, [(b"content-type", b"application/json")], json_dumps(obj)
