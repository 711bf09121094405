"""The revalidation benchmark (issue 15): one 1 MiB object with an ETag and
``max-age=1``, requested continuously through a cache.

Rows, measured in the same run: pyproxy revalidating (the origin answers the
conditional request with 304), pyproxy against an origin that ignores
validators (what a refetching cache costs: a full 1 MiB each time the entry is
stale), and nginx with ``proxy_cache_revalidate on``. Reported: requests/s,
what the origin sent per second (bytes of body, 200s, 304s), and the origin's
connections (keep-alive checked, not assumed).

    python -m benchmarks.revalidation [--duration 10] [--pypy pypy3]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict

from benchmarks.run import LOAD_CORE, ROOT, TARGET_CORE, Service, free_port, machine, nginx_conf, wrk

SIZE = 1024 * 1024
CONNECTIONS = 16


def origin(pypy: str, validate: bool) -> Service:
    port = free_port()
    argv = [pypy, str(ROOT / "benchmarks" / "etag_origin.py"), str(port), str(SIZE), "1" if validate else "0"]
    return Service(f"origin-{port}", argv, port, LOAD_CORE)


def origin_stats(port: int) -> Dict[str, int]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /__stats HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while not data.endswith(b"}"):
            data += sock.recv(4096)
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


def pyproxy(name: str, pypy: str, origin_port: int) -> Service:
    port = free_port()
    interpreter = pypy if name.startswith("pyproxy-pypy") else sys.executable
    argv = [
        interpreter, "-m", "pyproxy", "--listen", f"127.0.0.1:{port}", "--upstream", f"http://127.0.0.1:{origin_port}",
        "--log-level", "warning", "--admin-listen", "off", "--cache-max-object-bytes", str(4 * SIZE),
        "--gzip", "false",
    ]  # fmt: skip
    if not name.startswith("pyproxy-pypy"):
        argv += ["--loop", "uvloop"]
    return Service(name, argv, port, TARGET_CORE)


def nginx(workdir: Path, origin_port: int) -> Service:
    port = free_port()
    conf = nginx_conf(
        workdir,
        f"""
  proxy_cache_path {workdir}/cache levels=1 keys_zone=reval:10m max_size=100m;
  upstream origin {{ server 127.0.0.1:{origin_port}; keepalive {CONNECTIONS * 2}; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache reval;
      proxy_cache_revalidate on;
      proxy_cache_lock on;
      add_header x-cache $upstream_cache_status;
    }}
  }}""",
    )
    return Service("nginx", ["nginx", "-c", str(conf)], port, TARGET_CORE)


def measure(service: Service, origin_port: int, duration: float) -> Dict[str, Any]:
    url = f"http://127.0.0.1:{service.port}/obj"
    wrk(url, CONNECTIONS, 3)  # warm: the JIT, the cache, the pools
    before = origin_stats(origin_port)
    result = wrk(url, CONNECTIONS, duration)
    after = origin_stats(origin_port)
    sent = {k: after[k] - before[k] for k in after}
    if result.get("non2xx", 0) or not result.get("rps"):
        # An error answers fast: a row of them would flatter whoever sent them.
        raise RuntimeError(f"{service.name}: {result.get('non2xx', 0)} non-2xx responses in the measured run")
    return {
        "rps": result.get("rps", 0.0),
        "p99_ms": result.get("p99", 0.0) * 1000,
        "origin_body_mib_per_s": sent["body_bytes"] / duration / SIZE,
        "origin_200_per_s": sent["full"] / duration,
        "origin_304_per_s": sent["not_modified"] / duration,
        "origin_connections": sent["connections"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--pypy", default="pypy3")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    rows: Dict[str, Dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # nginx workers run unprivileged and must reach their cache
        for validate in (True, False):
            o = origin(args.pypy, validate)
            try:
                targets = ["pyproxy-pypy", "pyproxy-cpython"] + (["nginx"] if validate else [])
                for name in targets:
                    service = nginx(workdir, o.port) if name == "nginx" else pyproxy(name, args.pypy, o.port)
                    try:
                        label = name + (" (revalidating)" if validate else " (origin ignores validators)")
                        rows[label] = measure(service, o.port, args.duration)
                        print(label, json.dumps(rows[label]), flush=True)
                    finally:
                        service.stop()
            finally:
                o.stop()
    lines = [
        f"Revalidation: one {SIZE // 1024} KiB object, ETag, max-age=1; {CONNECTIONS} connections, "
        f"{args.duration:g} s per row; {machine().get('cpu', '')}.",
        "",
        "| cache | req/s | p99 ms | origin body MiB/s | origin 200/s | origin 304/s | origin connections |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, r in rows.items():
        lines.append(
            f"| {label} | {r['rps']:.0f} | {r['p99_ms']:.1f} | {r['origin_body_mib_per_s']:.2f} | "
            f"{r['origin_200_per_s']:.2f} | {r['origin_304_per_s']:.2f} | {r['origin_connections']} |"
        )
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "revalidation.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    (args.out / "revalidation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
