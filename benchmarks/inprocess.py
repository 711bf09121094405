"""Client keys on vs off inside one process: an A/B without the spread between processes.

Two pyproxy processes compared by ``benchmarks.gateway`` differ by up to 15 % from
run to run on PyPy (each JIT compiles its own traces), which hides a few
microseconds. Here the gateway runs in this process, its admission switched on
and off between wrk runs, the origin (``delay_origin.py``) and wrk on the other
core; it reports this process's CPU per request, the median over rounds.
``--vmprof FILE`` (PyPy) profiles the measured keys runs, which the CLI's own
process cannot be (it re-executes itself to set PYPY_GC_NURSERY).

    PYPY_GC_NURSERY=8MB taskset -c 0 .tox/pypy3/bin/python -m benchmarks.inprocess
    taskset -c 0 .tox/cpython/bin/python -m benchmarks.inprocess --rounds 5

No thread and no child watcher: a second thread alone makes PyPy's GIL switch on
every I/O call, which halved the throughput measured this way.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from benchmarks.gateway import gateway_config, origin, origin_stats, post_script
from benchmarks.run import LOAD_CORE, free_port
from pyproxy.gateway.keys import key_entry_toml, key_hash
from pyproxy.gateway.limits import Limits
from tests.support.gateway import running_gateway

KEY = "pp-bench-" + "k" * 40


async def wrk_rps(url: str, script: Path, seconds: int, out: Path) -> float:
    with out.open("w") as fh:
        proc = subprocess.Popen(
            ["taskset", "-c", LOAD_CORE, "wrk", "-t1", "-c64", f"-d{seconds}s", "-s", str(script), url], stdout=fh
        )
    while proc.poll() is None:
        await asyncio.sleep(0.2)
    text = out.read_text()
    if "Non-2xx" in text:
        raise RuntimeError(f"errors in the load: {text[-400:]}")
    for line in text.splitlines():
        if line.strip().startswith("Requests/sec:"):
            return float(line.split()[1])
    raise RuntimeError(f"wrk gave no result: {text[-400:]}")


async def measure(args: argparse.Namespace, workdir: Path) -> Dict[str, List[float]]:
    keys_file = workdir / "keys.toml"
    keys_file.write_text(key_entry_toml("bench", key_hash(KEY), None, (), Limits(10**9, 10**12, 10**6)))
    upstream = origin(sys.executable, 0)
    try:
        toml = gateway_config(workdir, [upstream.port] * 3, keys_file, True).read_text()
        environ = dict(os.environ, PYPROXY_BENCH_UPSTREAM_KEY="sk-up")
        port = free_port()
        overrides = dict(
            listen=("127.0.0.1", port), cache_enabled=False, dedup_enabled=False, keepalive_connections=100
        )
        script = post_script(workdir, KEY)
        async with running_gateway(toml, environ, **overrides) as proxy:
            gateway = proxy.gateway
            assert gateway is not None and gateway.admission is not None
            admission = gateway.admission
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            out = workdir / "wrk.out"
            warm = 8 if sys.implementation.name == "pypy" else 2
            for variant in ("off", "keys"):  # every path compiled before anything is measured
                gateway.admission = None if variant == "off" else admission
                await wrk_rps(url, script, warm, out)
            results: Dict[str, List[float]] = {"off": [], "keys": []}
            profile: Optional[int] = None
            for _ in range(args.rounds):
                for variant in ("off", "keys"):
                    gateway.admission = None if variant == "off" else admission
                    if variant == "keys" and args.vmprof:
                        import vmprof  # type: ignore[import-not-found]

                        profile = os.open(args.vmprof, os.O_RDWR | os.O_CREAT | os.O_APPEND)
                        vmprof.enable(profile, period=0.0005, native=False)
                    before = time.process_time()
                    served = origin_stats(upstream.port)["requests"]
                    rps = await wrk_rps(url, script, args.seconds, out)
                    cpu = time.process_time() - before
                    if profile is not None:
                        vmprof.disable()
                        os.close(profile)
                        profile = None
                    # Keep-alive and no failure, checked: the origin served what wrk counted.
                    if origin_stats(upstream.port)["requests"] - served < rps * args.seconds * 0.95:
                        raise RuntimeError("the origin served fewer requests than wrk counted")
                    results[variant].append(cpu / (rps * args.seconds) * 1e6)
            gateway.admission = admission
        return results
    finally:
        upstream.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--vmprof", default=None, help="PyPy: profile the keys runs into this file")
    args = parser.parse_args()
    if sys.implementation.name != "pypy":
        try:
            import uvloop

            uvloop.install()
        except ImportError:  # pragma: no cover
            pass
    with tempfile.TemporaryDirectory(prefix="pyproxy-ab-") as tmp:
        results = asyncio.run(measure(args, Path(tmp)))
    off, keys = statistics.median(results["off"]), statistics.median(results["keys"])
    for name, values in results.items():
        print(
            f"{name:5s} CPU µs/request: median {statistics.median(values):.1f} ({' '.join(f'{v:.1f}' for v in values)})"
        )
    print(f"keys add {keys - off:.1f} µs/request: {off / keys:.2f}× the throughput at one core's CPU")


if __name__ == "__main__":
    main()
