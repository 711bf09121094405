"""The gateway benchmarks (issue 12), peers measured in the same run.

1. ``routed``: POST chat routed by model across three upstreams, against the
   plain one-upstream relay of the same build (layers off both ways): the price
   of routing, per interpreter (target >= 0.9x).
2. ``slow``: three origins, one 10x slower (10 ms and 100 ms, 16 connections:
   below saturation, see SLOW_CONNECTIONS); mean and p99
   latency through pyproxy's balancer against nginx's round robin over the same
   origins (nginx with an idle keep-alive cache of the client connections times the
   origins, so no server's connections are evicted for another's).
3. ``kill``: three origins, one killed (SIGKILL) under load; failed requests for
   pyproxy and for nginx with ``proxy_next_upstream error timeout`` (its default,
   which retries connect failures for POST too), POST and GET counted apart, and
   split into requests started before and after the kill.

Every origin reports the connections it accepted, so keep-alive is checked.
The proxy runs on core 0, origins and load on core 1.

    python -m benchmarks.gateway [--quick] [--targets pyproxy-pypy,pyproxy-cpython,nginx]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from benchmarks.run import (
    CHAT_REQUEST,
    LOAD_CORE,
    ROOT,
    TARGET_CORE,
    Service,
    free_port,
    machine,
    nginx_conf,
    wrk,
)

RESULTS = ROOT / "benchmarks" / "results"
CONNECTIONS = 64
# The slow-origin scenario: a load below every proxy's saturation (16 connections at
# 10 ms are 1,600 requests/s at most), so its latencies are the balancer's doing; at
# saturation they would only restate throughput, which the routed scenario measures.
FAST_MS = 10
SLOW_CONNECTIONS = 16


def origin(pypy: str, delay_ms: float) -> Service:
    port = free_port()
    return Service(
        f"origin-{port}",
        [pypy, str(ROOT / "benchmarks" / "delay_origin.py"), str(port), str(delay_ms)],
        port,
        LOAD_CORE,
    )


def origin_stats(port: int) -> Dict[str, int]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /__stats HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data or not data.split(b"\r\n\r\n", 1)[1].endswith(b"}"):
            data += sock.recv(4096)
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


def gateway_config(
    workdir: Path,
    ports: List[int],
    keys_file: Optional[Path] = None,
    upstream_key: bool = False,
    limits_backend: Optional[str] = None,
) -> Path:
    """Upstreams balanced for one model; with ``keys_file``, [auth] mode = "keys" (which
    needs ``upstream_key``: the keys scenario sets it on both variants, so what differs
    is admission alone), its limits in ``limits_backend`` when given."""
    lines = []
    if keys_file is not None:
        lines.append(f'[auth]\nmode = "keys"\nkeys_file = "{keys_file}"\n')
        if limits_backend is not None:
            lines.append(f'limits_backend = "{limits_backend}"\n')
    for i, port in enumerate(ports):
        key = '\napi_key = "env:PYPROXY_BENCH_UPSTREAM_KEY"' if upstream_key else ""
        lines.append(f'[[upstreams]]\nname = "o{i}"\nurl = "http://127.0.0.1:{port}"{key}\n')
    deployments = ", ".join(f'{{ upstream = "o{i}" }}' for i in range(len(ports)))
    lines.append(f'[[models]]\nname = "gpt-bench"\ndeployments = [{deployments}]\n')
    # GETs carry no model: a path route balances them over the same three.
    lines.append(f'[[routes]]\nmethods = ["GET"]\npath = "/v1/chat/completions"\ndeployments = [{deployments}]\n')
    suffix = ("-keys" if keys_file else "") + ("-redis" if limits_backend else "")
    path = workdir / f"gateway-{'-'.join(map(str, ports))}{suffix}.toml"
    path.write_text("\n".join(lines))
    return path


def pyproxy(name: str, pypy: str, port: int, *args: str) -> Service:
    python = [pypy] if name == "pyproxy-pypy" else [sys.executable]
    loop = [] if name == "pyproxy-pypy" else ["--loop", "uvloop"]
    argv = python + ["-m", "pyproxy", "--listen", f"127.0.0.1:{port}", "--log-level", "warning",
                     "--admin-listen", "off", "--no-cache", "--no-dedup", "--keepalive-connections", "100",
                     *loop, *args]  # fmt: skip
    return Service(name, argv, port, TARGET_CORE)


def nginx_balancer(workdir: Path, port: int, origins: List[int]) -> Service:
    servers = " ".join(f"server 127.0.0.1:{p} max_fails=1 fail_timeout=10s;" for p in origins)
    conf = nginx_conf(
        workdir,
        f"""
  upstream pool {{ {servers} keepalive {CONNECTIONS * len(origins)}; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_buffering off;
    proxy_next_upstream error timeout;
    proxy_connect_timeout 2s;
    location / {{ proxy_pass http://pool; }}
  }}""",
    )
    return Service("nginx", ["nginx", "-c", str(conf)], port, TARGET_CORE)


def start(name: str, workdir: Path, pypy: str, ports: List[int]) -> Service:
    port = free_port()
    if name == "nginx":
        return nginx_balancer(workdir, port, ports)
    return pyproxy(name, pypy, port, "--config", str(gateway_config(workdir, ports)))


def post_script(workdir: Path, key: str = "sk-bench") -> Path:
    script = workdir / f"post-{key}.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {key}"\n'
        f"wrk.body = [[{CHAT_REQUEST}]]\n"
    )
    return script


def warm(name: str, url: str, script: Path, quick: bool) -> None:
    wrk(url, CONNECTIONS, (4 if quick else 12) if name == "pyproxy-pypy" else 2, script)


# --- 1. routed vs plain ------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def interleaved(
    name: str, services: Dict[str, Service], script: Path, origin_port: int, duration: float, quick: bool
) -> Dict[str, Any]:
    """wrk against each service in alternating rounds (drift on a shared machine hits
    both alike); the median req/s, CPU and the origin's new connections of each."""
    out: Dict[str, Any] = {}
    runs: Dict[str, List[float]] = {label: [] for label in services}
    try:
        for service in services.values():
            warm(name, f"http://127.0.0.1:{service.port}/v1/chat/completions", script, quick)
        for _ in range(1 if quick else 3):
            for label, service in services.items():
                before = origin_stats(origin_port)["connections"]
                cpu = cpu_seconds(service.proc.pid)
                result = wrk(f"http://127.0.0.1:{service.port}/v1/chat/completions", CONNECTIONS, duration, script)
                out[f"{label}_cpu"] = (cpu_seconds(service.proc.pid) - cpu) / duration
                runs[label].append(result["rps"])
                out[f"{label}_origin_connections"] = origin_stats(origin_port)["connections"] - before
                out[f"{label}_non2xx"] = out.get(f"{label}_non2xx", 0) + result.get("non2xx", 0)
    finally:
        for service in services.values():
            service.stop()
    for label, values in runs.items():
        out[f"{label}_rps"] = statistics.median(values)
        out[f"{label}_runs"] = values
    return out


def routed_scenario(name: str, workdir: Path, pypy: str, duration: float, quick: bool) -> Dict[str, Any]:
    """Three upstreams (three names, three pools) in front of one origin process, so the
    origin side -- which shares a core with wrk -- is the same for both rows and the
    ratio is what routing costs pyproxy."""
    upstream = origin(pypy, 0)
    try:
        ports = [upstream.port] * 3
        services = {
            "plain": pyproxy(name, pypy, free_port(), "--upstream", f"http://127.0.0.1:{ports[0]}"),
            "routed": start(name, workdir, pypy, ports),
        }
        out = interleaved(name, services, post_script(workdir), upstream.port, duration, quick)
        out["ratio"] = out["routed_rps"] / out["plain_rps"]
    finally:
        upstream.stop()
    return out


# --- 1b. client keys on vs off -----------------------------------------------------------


def keys_scenario(name: str, workdir: Path, pypy: str, duration: float, quick: bool) -> Dict[str, Any]:
    """The routed gateway with [auth] mode = "keys" (a key with rpm, tpm and max_parallel
    high enough never to refuse, usage read from every answer) against the same gateway
    without: the ratio is what admission, limits and usage accounting cost."""
    from pyproxy.gateway.keys import key_entry_toml, key_hash
    from pyproxy.gateway.limits import Limits

    key = "pp-bench-" + "k" * 40
    keys_file = workdir / "keys.toml"
    keys_file.write_text(key_entry_toml("bench", key_hash(key), None, (), Limits(10**9, 10**12, 10**6)))
    upstream = origin(pypy, 0)
    redis: Optional[Service] = None
    try:
        ports = [upstream.port] * 3
        services = {
            "off": pyproxy(name, pypy, free_port(), "--config", str(gateway_config(workdir, ports, None, True))),
            "keys": pyproxy(name, pypy, free_port(), "--config", str(gateway_config(workdir, ports, keys_file, True))),
        }
        if shutil.which("redis-server") is not None:
            # The same keys with limits_backend = Redis, on the load core (as a Redis on
            # another machine would be: its CPU is not the proxy's).
            redis_port = free_port()
            redis = Service(
                "redis",
                ["redis-server", "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
                redis_port,
                LOAD_CORE,
            )
            config = gateway_config(workdir, ports, keys_file, True, f"redis://127.0.0.1:{redis_port}/0")
            services["redis"] = pyproxy(name, pypy, free_port(), "--config", str(config))
        redis_cpu = cpu_seconds(redis.proc.pid) if redis is not None else 0.0
        out = interleaved(name, services, post_script(workdir, key), upstream.port, duration, quick)
        out["ratio"] = out["keys_rps"] / out["off_rps"]
        # What admission adds per request, from the CPU each spent per request.
        out["added_us"] = (out["keys_cpu"] / out["keys_rps"] - out["off_cpu"] / out["off_rps"]) * 1e6
        if redis is not None:
            out["redis_ratio"] = out["redis_rps"] / out["off_rps"]
            out["redis_added_us"] = (out["redis_cpu"] / out["redis_rps"] - out["off_cpu"] / out["off_rps"]) * 1e6
            # Redis's own CPU per request (two scripts: admission and end), warm-up included.
            served = sum(out["redis_runs"]) * duration
            out["redis_server_us"] = (cpu_seconds(redis.proc.pid) - redis_cpu) / served * 1e6
    finally:
        upstream.stop()
        if redis is not None:
            redis.stop()
    return out


# --- 2. one slow origin ------------------------------------------------------------------


def slow_scenario(name: str, workdir: Path, pypy: str, duration: float, quick: bool) -> Dict[str, Any]:
    origins = [origin(pypy, FAST_MS), origin(pypy, FAST_MS), origin(pypy, 10 * FAST_MS)]
    script = post_script(workdir)
    try:
        ports = [o.port for o in origins]
        service = start(name, workdir, pypy, ports)
        try:
            url = f"http://127.0.0.1:{service.port}/v1/chat/completions"
            warm(name, url, script, quick)
            before = [origin_stats(p) for p in ports]
            result = wrk(url, SLOW_CONNECTIONS, duration, script)
            after = [origin_stats(p) for p in ports]
        finally:
            service.stop()
        requests = [a["requests"] - b["requests"] for a, b in zip(after, before)]
        return {
            "rps": result["rps"],
            "mean": result.get("mean"),
            "p50": result.get("p50"),
            "p99": result.get("p99"),
            "slow_share": requests[2] / max(1, sum(requests)),
            "origin_connections": sum(a["connections"] - b["connections"] for a, b in zip(after, before)),
            "non2xx": result.get("non2xx", 0),
        }
    finally:
        for o in origins:
            o.stop()


# --- 3. one origin killed ------------------------------------------------------------------


async def _load(port: int, method: bytes, stop_at: float, kill_at: float, log: List[Tuple[float, bool]]) -> None:
    body = CHAT_REQUEST.encode() if method == b"POST" else b""
    head = (
        b"%s /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    )
    request = head % (method, len(body)) + body
    reader = writer = None
    while time.monotonic() < stop_at:
        started = time.monotonic()
        ok = False
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            status_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(status_head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await asyncio.wait_for(reader.readexactly(length), 10)
            ok = status_head.startswith(b"HTTP/1.1 200")
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, IndexError, ValueError):
            if writer is not None:
                writer.close()
            reader = writer = None
        log.append((started, ok))
    if writer is not None:
        writer.close()


async def _drive(port: int, method: bytes, duration: float, victim: Service, log: List[Tuple[float, bool]]) -> float:
    """32 clients back to back for ``duration``; ``victim`` killed a third of the way in."""
    now = time.monotonic()
    kill_at, stop_at = now + duration / 3, now + duration
    runner = asyncio.gather(*(_load(port, method, stop_at, kill_at, log) for _ in range(32)))
    await asyncio.sleep(kill_at - time.monotonic())
    os.killpg(victim.proc.pid, signal.SIGKILL)
    # Counted from when the origin is gone (its sockets closed by the kernel), not from
    # when the signal was sent.
    await asyncio.get_running_loop().run_in_executor(None, victim.proc.wait)
    killed = time.monotonic()
    await runner
    return killed


def kill_scenario(name: str, workdir: Path, pypy: str, duration: float, quick: bool) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for method in (b"POST", b"GET"):
        origins = [origin(pypy, 2) for _ in range(3)]
        try:
            service = start(name, workdir, pypy, [o.port for o in origins])
            try:
                url = f"http://127.0.0.1:{service.port}/v1/chat/completions"
                warm(name, url, post_script(workdir), quick)
                log: List[Tuple[float, bool]] = []
                killed = asyncio.run(_drive(service.port, method, duration, origins[0], log))
            finally:
                service.stop()
        finally:
            for o in origins:
                o.stop()
        before = [ok for started, ok in log if started < killed]
        after = [ok for started, ok in log if started >= killed]
        key = method.decode().lower()
        out[key] = {
            "requests": len(log),
            "failed_before_kill": before.count(False),
            "failed_after_kill": after.count(False),
            "started_after_kill": len(after),
        }
    return out


SCENARIOS = ("routed", "keys", "slow", "kill")


def run(args: argparse.Namespace) -> Dict[str, Any]:
    for tool in ("nginx", "wrk", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"benchmarks: {tool} is not installed")
    os.environ.setdefault("PYPROXY_BENCH_UPSTREAM_KEY", "sk-bench-upstream")  # the services inherit it
    workdir = Path(tempfile.mkdtemp(prefix="pyproxy-gw-bench-"))
    workdir.chmod(0o755)
    for sub in ("body", "proxy", "fcgi", "uwsgi", "scgi"):
        (workdir / sub).mkdir()
    duration = 3.0 if args.quick else args.duration
    results: Dict[str, Any] = {"machine": machine(), "duration": duration, "targets": {}}
    try:
        for name in args.targets:
            row: Dict[str, Any] = {}
            for scenario in args.scenarios:
                if scenario in ("routed", "keys") and name == "nginx":
                    continue
                print(f"== {name} {scenario}", file=sys.stderr, flush=True)
                func = {"routed": routed_scenario, "keys": keys_scenario, "slow": slow_scenario, "kill": kill_scenario}[
                    scenario
                ]
                row[scenario] = func(name, workdir, args.pypy, duration, args.quick)
                print(json.dumps(row[scenario]), file=sys.stderr, flush=True)
            results["targets"][name] = row
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def _ms(value: Optional[float]) -> str:
    return "–" if value is None else f"{value * 1000:.2f}"


def render(results: Dict[str, Any]) -> str:
    targets = results["targets"]
    lines = [f"Gateway benchmarks, {results['machine'].get('cpu', '')}, {results['duration']:g} s per wrk run.", ""]
    lines += ["| routed across 3 upstreams vs plain relay (POST chat, 64 conns) | plain req/s | routed req/s | ratio |",
              "| --- | --- | --- | --- |"]  # fmt: skip
    for name, row in targets.items():
        r = row.get("routed")
        if r:
            lines.append(f"| {name} | {r['plain_rps']:.0f} | {r['routed_rps']:.0f} | {r['ratio']:.2f}× |")
    lines += ["", "| client keys on vs off (rpm + tpm + max_parallel + usage, POST chat, 64 conns) | off req/s | keys req/s | ratio | added CPU µs/request |",
              "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, row in targets.items():
        r = row.get("keys")
        if r:
            lines.append(
                f"| {name} | {r['off_rps']:.0f} | {r['keys_rps']:.0f} | {r['ratio']:.2f}× | {r['added_us']:.1f} |"
            )
    if any("redis_rps" in (row.get("keys") or {}) for row in targets.values()):
        lines += ["", "| the same with limits_backend = Redis (loopback) | off req/s | keys + Redis req/s | ratio | added CPU µs/request | Redis CPU µs/request |",
                  "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for name, row in targets.items():
            r = row.get("keys") or {}
            if "redis_rps" in r:
                lines.append(
                    f"| {name} | {r['off_rps']:.0f} | {r['redis_rps']:.0f} | {r['redis_ratio']:.2f}× "
                    f"| {r['redis_added_us']:.1f} | {r['redis_server_us']:.1f} |"
                )
    lines += ["", f"| one origin 10× slower ({FAST_MS} ms / {10 * FAST_MS} ms, {SLOW_CONNECTIONS} conns) | mean ms | p99 ms | share to the slow one | req/s |",
              "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, row in targets.items():
        r = row.get("slow")
        if r:
            lines.append(
                f"| {name} | {_ms(r['mean'])} | {_ms(r['p99'])} | {r['slow_share'] * 100:.1f} % | {r['rps']:.0f} |"
            )
    lines += ["", "| one of 3 origins killed | POST failed before / after the kill | GET failed before / after |",
              "| --- | --- | --- |"]  # fmt: skip
    for name, row in targets.items():
        r = row.get("kill")
        if r:
            cells = [
                f"{r[m]['failed_before_kill']} / {r[m]['failed_after_kill']} of {r[m]['requests']}"
                for m in ("post", "get")
            ]
            lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--targets", type=lambda s: s.split(","), default=["pyproxy-pypy", "pyproxy-cpython", "nginx"])
    parser.add_argument("--scenarios", type=lambda s: s.split(","), default=list(SCENARIOS))
    parser.add_argument("--pypy", default="pypy3")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gateway.json").write_text(json.dumps(results, indent=1))
    text = render(results)
    (args.out / "gateway.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
