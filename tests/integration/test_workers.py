"""--workers: a supervisor and worker processes, run as a user runs them (subprocesses)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from typing import Any, Dict, List, Optional

from tests.integration.test_cli import ROOT, _env
from tests.integration.test_operations import metric
from tests.support.client import request
from tests.support.origin import MODELS_BODY, Origin
from tests.support.redis_server import free_port


class Supervised:
    def __init__(self, process: asyncio.subprocess.Process, port: int, admin: int, log: List[str]) -> None:
        self.process = process
        self.port = port
        self.admin = admin
        self.log = log
        self._reader = asyncio.ensure_future(self._read_log())

    async def _read_log(self) -> None:
        assert self.process.stderr is not None
        while True:
            line = await self.process.stderr.readline()
            if not line:
                return
            self.log.append(line.decode())

    async def wait_for_log(self, pattern: str, timeout: float = 60.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not any(re.search(pattern, line) for line in self.log):
            assert loop.time() < deadline, f"no log line matching {pattern!r}: {self.log[-20:]}"
            await asyncio.sleep(0.02)

    async def health(self) -> Dict[str, Any]:
        return (await request(self.admin, b"GET", b"/health")).json()

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.process.wait(), 60)
        finally:
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
            await asyncio.gather(self._reader, return_exceptions=True)
        return code


async def start_supervised(upstream: Optional[str], *args: str, env: Optional[Dict[str, str]] = None) -> Supervised:
    """``upstream`` None: the upstreams come from the --config file's [[upstreams]]."""
    admin = free_port()
    target = ["--upstream", upstream] if upstream is not None else []
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pyproxy", *target, "--listen", "127.0.0.1:0",
        "--admin-listen", f"127.0.0.1:{admin}", "--drain-timeout", "20", *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=_env(env), cwd=str(ROOT),
    )  # fmt: skip
    assert process.stderr is not None
    log: List[str] = []
    while True:
        line = (await asyncio.wait_for(process.stderr.readline(), 60)).decode()
        if not line:
            raise AssertionError(f"the supervisor did not start: {log}")
        log.append(line)
        match = re.search(r"workers accepting on 127\.0\.0\.1:(\d+)", line)
        if match:
            return Supervised(process, int(match.group(1)), admin, log)


async def test_workers_serve_share_metrics_and_restart_after_a_crash() -> None:
    async with Origin() as origin:
        sup = await start_supervised(origin.url, "--workers", "2")
        try:
            health = await sup.health()
            assert health["workers"] == 2 and len(health["worker_pids"]) == 2
            for _ in range(20):
                resp = await request(sup.port, b"GET", b"/v1/models", [(b"authorization", b"Bearer k")])
                assert resp.status == 200 and resp.body == MODELS_BODY
            text = (await request(sup.admin, b"GET", b"/metrics")).body.decode()
            labels = {"endpoint": "/v1/models", "method": "GET", "status": "200"}
            assert metric(text, "proxy_requests_total", labels) == 20  # summed over both workers

            victim = health["worker_pids"][0]
            os.kill(victim, signal.SIGKILL)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while True:
                pids = (await sup.health())["worker_pids"]
                if len(pids) == 2 and victim not in pids:
                    break
                assert loop.time() < deadline, pids
                await asyncio.sleep(0.05)
            await sup.wait_for_log(rf"worker {victim} exited")
            for _ in range(10):
                assert (await request(sup.port, b"GET", b"/v1/models")).status == 200
        finally:
            assert await sup.stop() == 0


GET_ECHO = b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


async def load_loop(
    port: int, stop: asyncio.Event, results: Dict[str, int], failures: List[str], raw_request: bytes = GET_ECHO
) -> None:
    """Requests back to back until told to stop, each on a new connection: a request
    that fails is a failure, there is no retry to hide it."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw_request)
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), 20)
            writer.close()
            if not data.startswith(b"HTTP/1.1 200"):
                failures.append(repr(data[:80]))
            else:
                results["ok"] += 1
        except (OSError, asyncio.TimeoutError) as exc:
            failures.append(repr(exc))


async def test_sighup_reload_under_load_drops_nothing(tmp_path: Any) -> None:
    config = tmp_path / "pyproxy.toml"
    config.write_text("keepalive_connections = 10\n")
    async with Origin() as origin:
        sup = await start_supervised(origin.url, "--workers", "2", "--config", str(config))
        try:
            before = set((await sup.health())["worker_pids"])
            stop = asyncio.Event()
            results = {"ok": 0}
            failures: List[str] = []
            loops = [asyncio.ensure_future(load_loop(sup.port, stop, results, failures)) for _ in range(8)]
            await asyncio.sleep(0.5)
            config.write_text("keepalive_connections = 20\n")
            sup.process.send_signal(signal.SIGHUP)
            await sup.wait_for_log(r"reload 1: 2 new workers accepting, 2 old draining")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while set((await sup.health())["worker_pids"]) & before:
                assert loop.time() < deadline, "the old workers did not finish draining"
                await asyncio.sleep(0.05)
            served_during = results["ok"]
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*loops)
            assert failures == [], failures[:5]
            assert served_during > 50 and results["ok"] > served_during
        finally:
            assert await sup.stop() == 0


async def test_bad_config_on_reload_keeps_the_running_workers(tmp_path: Any) -> None:
    config = tmp_path / "pyproxy.toml"
    config.write_text("read_timeout = 30\n")
    async with Origin() as origin:
        sup = await start_supervised(origin.url, "--workers", "1", "--config", str(config))
        try:
            pids = (await sup.health())["worker_pids"]
            config.write_text("read_timeout = 'soon'\n")
            sup.process.send_signal(signal.SIGHUP)
            await sup.wait_for_log("reload refused")
            assert (await sup.health())["worker_pids"] == pids
            assert (await request(sup.port, b"GET", b"/v1/models")).status == 200
            assert json.loads((await request(sup.admin, b"GET", b"/ready")).body) == {"ready": True}
        finally:
            assert await sup.stop() == 0


GATEWAY_CONFIG = """
[[upstreams]]
name = "{name}"
url = "{url}"
api_key = "env:GW_TEST_KEY"

[[models]]
name = "m"
deployments = [{{ upstream = "{name}" }}]
"""
CHAT_BODY = b'{"model":"m","messages":[]}'
RAW_CHAT = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(CHAT_BODY), CHAT_BODY)
)


async def test_sighup_applies_a_new_upstream_set_under_load_and_refuses_a_bad_one(tmp_path: Any) -> None:
    config = tmp_path / "gateway.toml"
    async with Origin() as first, Origin() as second:
        for origin in (first, second):

            @origin.route(b"/v1/chat/completions")
            async def chat(req: Any, reply: Any) -> None:
                await reply.full(200, b'{"ok":true}')

        config.write_text(GATEWAY_CONFIG.format(name="first", url=first.url))
        sup = await start_supervised(
            None, "--workers", "2", "--config", str(config), env={"GW_TEST_KEY": "sk-reload-test"}
        )
        try:
            stop = asyncio.Event()
            results = {"ok": 0}
            failures: List[str] = []
            loops = [asyncio.ensure_future(load_loop(sup.port, stop, results, failures, RAW_CHAT)) for _ in range(8)]
            await asyncio.sleep(0.5)
            # A bad one first (a deployment naming no upstream): refused, the old set stays.
            config.write_text(
                GATEWAY_CONFIG.format(name="first", url=first.url).replace('upstream = "first"', 'upstream = "x"')
            )
            sup.process.send_signal(signal.SIGHUP)
            await sup.wait_for_log("reload refused.*models\\[0\\].deployments\\[0\\].upstream")
            config.write_text(GATEWAY_CONFIG.format(name="second", url=second.url))
            sup.process.send_signal(signal.SIGHUP)
            await sup.wait_for_log(r"reload 1: 2 new workers accepting, 2 old draining")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            seen = len(second.requests)
            while len(second.requests) < seen + 50:
                assert loop.time() < deadline, "the new upstream set was not applied"
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*loops)
            assert failures == [], failures[:5]
            assert first.requests and second.requests
            for got in first.requests + second.requests:
                assert got.header(b"authorization") == b"Bearer sk-reload-test"
        finally:
            assert await sup.stop() == 0


async def test_workers_share_limits_through_redis_and_a_disabled_key_stops_in_every_worker(tmp_path: Any) -> None:
    """Two workers: one rpm limit through the Redis backend (not one each), and a key
    disabled in the file refused by both within 5 s. Which worker answered is told
    by the x-request-id prefix, random per process."""
    from tests.integration.test_keys import KEYS, keys_toml, usage_origin
    from tests.support.redis_server import RedisServer

    async with RedisServer() as server, Origin() as origin:
        usage_origin(origin)
        keys_file = tmp_path / "keys.toml"
        keys_file.write_text(keys_toml(alice="rpm = 6", bob=""))
        config = tmp_path / "pyproxy.toml"
        config.write_text(
            f'[[upstreams]]\nname = "up"\nurl = "{origin.url}"\napi_key = "sk-up"\n'
            '[[models]]\nname = "m"\ndeployments = [{ upstream = "up" }]\n'
            f'[auth]\nmode = "keys"\nkeys_file = "keys.toml"\nlimits_backend = "{server.url}"\n'
        )
        sup = await start_supervised(None, "--config", str(config), "--workers", "2")
        try:

            async def chat(who: str) -> Any:
                headers = [(b"content-type", b"application/json"), (b"authorization", b"Bearer " + KEYS[who].encode())]
                return await request(sup.port, b"POST", b"/v1/chat/completions", headers, b'{"model": "m"}')

            def worker(resp: Any) -> bytes:
                return resp.header(b"x-request-id").rsplit(b"-", 1)[0]

            statuses = [(await chat("alice")).status for _ in range(10)]
            assert statuses.count(200) == 6 and statuses.count(429) == 4, statuses
            seen = {worker(await chat("bob")) for _ in range(100)}  # new connections: the kernel spreads them
            assert len(seen) == 2, "the requests never reached both workers"
            before = sum("keys file reloaded" in line for line in sup.log)
            replacement = tmp_path / "keys.toml.new"
            replacement.write_text(keys_toml(alice="disabled = true", bob=""))
            os.replace(replacement, keys_file)  # atomic: one change, one reload per worker
            loop = asyncio.get_running_loop()
            written = loop.time()
            while sum("keys file reloaded" in line for line in sup.log) < before + 2:
                assert loop.time() - written < 5.0, f"not every worker reloaded within 5 s: {sup.log[-6:]}"
                await asyncio.sleep(0.02)
            reloaded = [re.search(r"keys file reloaded .* in process (\d+)", line) for line in sup.log]
            pids = {match.group(1) for match in reloaded[-4:] if match}
            assert pids == {str(pid) for pid in (await sup.health())["worker_pids"]}, sup.log[-6:]
            assert len(pids) == 2, sup.log[-6:]
            # Refused everywhere from then on (bob still works, in both workers).
            for _ in range(20):
                assert (await chat("alice")).status == 401
            assert {worker(await chat("bob")) for _ in range(100)} == seen
        finally:
            assert await sup.stop() == 0
