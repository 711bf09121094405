"""The deploy topology without containers: three pyproxy processes behind Debian's nginx
(running deploy/nginx.conf), sharing Debian's redis-server, all on loopback."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import yaml

from pyproxy.cli import PYPY_NURSERY
from tests.integration.test_cli import ROOT, _env
from tests.support.client import request
from tests.support.origin import MODELS_BODY, Origin
from tests.support.redis_server import RedisServer, free_port
from tests.support.sockets import nginx_binary, wait_listening

DEPLOY = ROOT / "deploy"
AUTH = [(b"authorization", b"Bearer sk-topology")]


def local_nginx_conf(workdir: Path, instance_ports: List[int], listen_port: int) -> Path:
    """deploy/nginx.conf with the compose host names pointed at loopback ports, and the
    process-level paths (pid, logs, temp files) inside the test's directory."""
    conf = (DEPLOY / "nginx.conf").read_text()
    for i, port in enumerate(instance_ports, start=1):
        assert f"pyproxy{i}:8080" in conf
        conf = conf.replace(f"pyproxy{i}:8080", f"127.0.0.1:{port}")
    assert "listen 8000;" in conf
    conf = conf.replace("listen 8000;", f"listen 127.0.0.1:{listen_port};")
    temp = workdir / "temp"
    temp.mkdir(exist_ok=True)
    temp.chmod(0o777)
    conf = conf.replace(
        "http {",
        "http {\n"
        + "".join(
            f"  {kind}_temp_path {temp}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        ),
        1,
    )
    head = f"daemon off;\nmaster_process on;\npid {workdir}/nginx.pid;\nerror_log {workdir}/error.log warn;\n"
    path = workdir / "nginx.conf"
    path.write_text(head + conf)
    return path


def test_compose_file_describes_the_topology() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services: Dict[str, dict] = compose["services"]
    assert set(services) == {"redis", "pyproxy1", "pyproxy2", "pyproxy3", "nginx"}
    for name in ("pyproxy1", "pyproxy2", "pyproxy3"):
        service = services[name]
        build = service["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile.pypy"
        assert service["environment"]["PYPROXY_CACHE_BACKEND"] == "redis://redis:6379/0"
        assert service["environment"]["PYPROXY_LISTEN"] == "0.0.0.0:8080"
        assert "redis" in service["depends_on"]
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in services["nginx"]["volumes"]
    dockerfile = (ROOT / "Dockerfile.pypy").read_text()
    assert "FROM debian:bookworm" in dockerfile and "pypy3" in dockerfile
    assert "USER pyproxy" in dockerfile and "HEALTHCHECK" in dockerfile and "/health" in dockerfile
    assert 'ENTRYPOINT ["pypy3", "-m", "pyproxy"]' in dockerfile
    assert f"PYPY_GC_NURSERY={PYPY_NURSERY}" in dockerfile  # what pyproxy would re-execute itself to get


def test_nginx_accepts_the_deploy_config(tmp_path: Path) -> None:
    conf = local_nginx_conf(tmp_path, [free_port() for _ in range(3)], free_port())
    result = subprocess.run([nginx_binary(), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


async def start_instance(upstream: str, port: int, redis_url: str) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pyproxy", "--upstream", upstream, "--listen", f"127.0.0.1:{port}",
        "--admin-listen", "off", "--cache-backend", redis_url, "--log-level", "warning",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env=_env(), cwd=str(ROOT),
    )  # fmt: skip
    return process


async def test_three_instances_behind_nginx_share_redis_and_survive_a_kill(tmp_path: Path) -> None:
    ports = [free_port() for _ in range(3)]
    lb_port = free_port()
    conf = local_nginx_conf(tmp_path, ports, lb_port)
    async with RedisServer() as redis, Origin() as origin:
        instances = [await start_instance(origin.url, port, redis.url) for port in ports]
        nginx = subprocess.Popen(
            [nginx_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            for port in ports + [lb_port]:
                await wait_listening(port)
            # Cached through one instance, a hit through another.
            first = await request(ports[0], b"GET", b"/v1/models", AUTH)
            assert first.header(b"x-cache") == b"MISS" and first.body == MODELS_BODY
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while int((await redis.command(b"DBSIZE"))[1:]) < 1:
                assert loop.time() < deadline, "the entry never reached redis"
                await asyncio.sleep(0.01)
            second = await request(ports[1], b"GET", b"/v1/models", AUTH)
            assert second.header(b"x-cache") == b"HIT" and second.body == MODELS_BODY
            through_lb = await request(lb_port, b"GET", b"/v1/models", AUTH)
            assert through_lb.header(b"x-cache") == b"HIT" and through_lb.body == MODELS_BODY
            assert sum(1 for r in origin.requests if r.target == b"/v1/models") == 1

            # Load through nginx; one instance is killed in the middle. nginx retries a GET
            # that failed before its response began on another instance, so every request
            # that starts after the kill succeeds. A response the killed instance was in
            # the middle of sending cannot be retried (its head has already gone to the
            # client); it must reach the client visibly truncated, never short and complete.
            stop = asyncio.Event()
            killed = asyncio.Event()
            ok = [0]
            failures_after_kill: List[str] = []
            cut_at_kill: List[str] = []

            async def client_loop(n: int) -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    started_after_kill = killed.is_set()
                    try:
                        resp = await request(lb_port, b"GET", b"/echo?c=%d&i=%d" % (n, i))
                        if resp.status == 200 and resp.complete:
                            ok[0] += 1
                            continue
                        outcome = f"{resp.status} complete={resp.complete} {resp.body[:60]!r}"
                    except OSError as exc:
                        outcome = repr(exc)
                    (failures_after_kill if started_after_kill else cut_at_kill).append(outcome)

            loops = [asyncio.ensure_future(client_loop(n)) for n in range(6)]
            deadline = loop.time() + 60
            while ok[0] < 100:
                assert loop.time() < deadline, f"only {ok[0]} requests succeeded before the kill"
                await asyncio.sleep(0.01)
            instances[1].send_signal(signal.SIGKILL)
            await instances[1].wait()
            killed.set()
            before = ok[0]
            deadline = loop.time() + 60
            while ok[0] < before + 200:
                assert loop.time() < deadline, f"only {ok[0] - before} requests succeeded after the kill"
                await asyncio.sleep(0.01)
            stop.set()
            await asyncio.gather(*loops)
            assert failures_after_kill == [], failures_after_kill[:5]
            # At most the one request per client that was in flight at the kill, and only
            # as a truncation the client can see (a 200 head, then the connection closed).
            assert len(cut_at_kill) <= 6, cut_at_kill
            assert all(outcome.startswith("200 complete=False") for outcome in cut_at_kill), cut_at_kill
        finally:
            nginx.send_signal(signal.SIGQUIT)
            try:
                nginx.wait(15)
            except subprocess.TimeoutExpired:
                nginx.kill()
                nginx.wait()
            for process in instances:
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
            for process in instances:
                try:
                    await asyncio.wait_for(process.wait(), 30)
                except asyncio.TimeoutError:
                    process.kill()
                    await process.wait()
