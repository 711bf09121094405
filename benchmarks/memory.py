"""Memory under load: what pyproxy's processes hold, on CPython and PyPy, beside nginx.

Three measurements, each pyproxy as a plain relay (no cache, no coalescing) pinned
to core 0, the origin and the load on core 1:

* long run: resident memory after every slice of a long wrk load (GET, then JSON
  POST) -- does it grow with the request count, and where does it settle?
* idle: resident memory per idle keep-alive client connection (10,000 of them);
* active: resident memory per active stream at the default pool size -- each one a
  client connection, an upstream connection and an exchange, 1,000 at once.

    python -m benchmarks.memory                       # both interpreters and nginx
    python -m benchmarks.memory --requests 200000     # a shorter long run
    python -m benchmarks.memory --targets pyproxy-pypy --scenarios long

Writes benchmarks/results/memory.json and prints a Markdown table. Needs nginx,
wrk and pypy3 (with h11 importable, e.g. the tox env's: --pypy .tox/pypy3/bin/python).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from benchmarks.run import (
    CHAT_REQUEST,
    LOAD_CORE,
    RELAY_ONLY,
    RESULTS,
    ROOT,
    TARGET_CORE,
    Service,
    free_port,
    nginx_proxy_conf,
    origin_conf,
    wrk,
)

TARGETS = ["pyproxy-pypy", "pyproxy-cpython", "nginx"]
SCENARIOS = ["long", "idle", "active"]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def start(name: str, workdir: Path, origin_port: int, sse_port: int, pypy: str) -> Service:
    port = free_port()
    if name == "nginx":
        # keep-alive pools as large as the 1,000 streams held (a fair peer, not nginx's default)
        conf = nginx_proxy_conf(workdir, port, origin_port, sse_port, "keepalive 1024; keepalive_requests 1000000;")
        return Service(name, ["nginx", "-c", str(conf)], port, TARGET_CORE)
    exe = pypy if name == "pyproxy-pypy" else sys.executable
    # The defaults as a user runs them (pool 1000 included), as a relay. One upstream
    # per instance: the active scenario starts its own instance on the SSE origin.
    argv = [exe, "-m", "pyproxy", "--upstream", f"http://127.0.0.1:{origin_port}", "--listen", f"127.0.0.1:{port}"]
    argv += ["--log-level", "warning", "--admin-listen", "off", *RELAY_ONLY]
    # No JIT warm-up (PyPy's default): the heap it leaves free would take the first
    # thousands of connections without growing, and the figures per connection would
    # flatter. What the warm-up itself costs at start is measured apart (README, Memory).
    argv += ["--warmup", "off"]
    return Service(name, argv, port, TARGET_CORE)


def long_run(service: Service, workdir: Path, requests: int, slice_seconds: float) -> Dict[str, Any]:
    post = workdir / "post.lua"
    post.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(CHAT_REQUEST)}\n"
    )
    samples: List[Dict[str, float]] = [{"requests": 0, "rss": rss_bytes(service.pid)}]
    done = 0
    for kind, path, script in (("GET", "/v1/models", None), ("POST", "/v1/chat/completions", post)):
        target = done + requests // 2
        while done < target:
            result = wrk(f"http://127.0.0.1:{service.port}{path}", 64, slice_seconds, script)
            done += int(result["requests"])
            samples.append({"requests": done, "rss": rss_bytes(service.pid), "kind": kind, "rps": result["rps"]})
            print(f"  {service.name} {kind}: {done:>9} requests, RSS {samples[-1]['rss'] / 2**20:.0f} MiB", flush=True)
    rss = [s["rss"] for s in samples]
    return {"samples": samples, "start": rss[0], "peak": max(rss), "end": rss[-1]}


async def _hold_connections(port: int, count: int, request: Optional[bytes]) -> List[asyncio.StreamWriter]:
    """Open ``count`` connections; with ``request``, send it on each and read the head."""
    writers: List[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(200)

    async def one() -> None:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writers.append(writer)
            if request is not None:
                writer.write(request)
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)

    await asyncio.gather(*(one() for _ in range(count)))
    return writers


def per_connection(service: Service, count: int, request: Optional[bytes], settle: float = 2.0) -> Dict[str, float]:
    """RSS added per connection held open. A small warm-up round of the same shape
    runs first (so the JIT's code is not counted), small enough that the memory it
    frees cannot hide what ``count`` connections take."""

    async def run() -> Dict[str, float]:
        warm = await _hold_connections(service.port, min(count, 50), request)
        for writer in warm:
            writer.close()
        await asyncio.sleep(settle)
        before = rss_bytes(service.pid)
        held = await _hold_connections(service.port, count, request)
        await asyncio.sleep(settle)
        after = rss_bytes(service.pid)
        for writer in held:
            writer.close()
        return {"connections": float(count), "rss_before": float(before), "per_connection": (after - before) / count}

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument(
        "--requests", type=int, default=1_000_000, help="long run: total requests (half GET, half POST)"
    )
    parser.add_argument("--slice", type=float, default=5.0, help="long run: seconds between RSS samples")
    parser.add_argument("--idle", type=int, default=10_000)
    parser.add_argument("--active", type=int, default=1000)
    parser.add_argument("--pypy", default="pypy3")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    workdir = Path(tempfile.mkdtemp(prefix="pyproxy-mem-"))
    origin_port, sse_port = free_port(), free_port()
    origin = Service("direct", ["nginx", "-c", str(origin_conf(workdir, origin_port))], origin_port, LOAD_CORE)
    sse = Service(
        "sse-origin", [args.pypy, str(ROOT / "benchmarks" / "sse_origin.py"), str(sse_port)], sse_port, LOAD_CORE
    )
    results: Dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    scenarios = args.scenarios.split(",")
    try:
        for name in args.targets.split(","):
            row: Dict[str, Any] = results.setdefault(name, {})
            if "long" in scenarios or "idle" in scenarios:
                service = start(name, workdir, origin_port, sse_port, args.pypy)
                try:
                    if "idle" in scenarios:
                        row["idle"] = per_connection(service, args.idle, b"GET /v1/models HTTP/1.1\r\nHost: b\r\n\r\n")
                    if "long" in scenarios:
                        row["long"] = long_run(service, workdir, args.requests, args.slice)
                finally:
                    service.stop()
            if "active" in scenarios:
                # An instance whose upstream is the SSE origin: every stream holds a
                # client connection, an upstream connection and an exchange.
                service = start(name, workdir, sse_port, sse_port, args.pypy)
                try:
                    stream = b"GET /sse?n=100000&interval=1 HTTP/1.1\r\nHost: b\r\n\r\n"
                    row["active"] = per_connection(service, args.active, stream)
                finally:
                    service.stop()
    finally:
        origin.stop()
        sse.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(results, indent=1))
    print(render(results))


def render(results: Dict[str, Any]) -> str:
    mib, kib = 2**20, 1024.0
    lines = [
        f"Memory, {results['date']}: RSS of the proxy process (nginx: its one worker).",
        "",
        "| target | long run: start → peak → end | idle client connection | active stream (client + upstream) |",
        "| --- | --- | --- | --- |",
    ]
    for name in TARGETS:
        row = results.get(name)
        if not row:
            continue
        long = row.get("long")
        span = "—"
        if long:
            done = long["samples"][-1]["requests"]
            span = (
                f"{long['start'] / mib:.0f} → {long['peak'] / mib:.0f} → {long['end'] / mib:.0f} MiB ({done:,.0f} req)"
            )
        idle = row.get("idle")
        active = row.get("active")
        lines.append(
            f"| {name} | {span} | {idle['per_connection'] / kib:.1f} KiB |" if idle else f"| {name} | {span} | — |"
        )
        lines[-1] += f" {active['per_connection'] / kib:.1f} KiB |" if active else " — |"
    return "\n".join(lines)


if __name__ == "__main__":
    main()
