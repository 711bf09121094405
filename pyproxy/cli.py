"""Command line: ``python -m pyproxy`` / ``pypy3 -m pyproxy`` / ``pyproxy``.

A wrong option prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import signal
import sys
from typing import Any, Dict, List, Mapping, NoReturn, Optional, Tuple

from pyproxy import __version__
from pyproxy._compat import MissingDependency, describe_runtime, new_event_loop
from pyproxy.config import OPTIONS, ConfigError, Settings, build_settings

log = logging.getLogger("pyproxy")

EXIT_USAGE = 2

# PyPy reads its GC nursery size once, at start, from PYPY_GC_NURSERY; its default
# comes from the cache size it detects (1 MB on one benchmark machine, 240 MB on
# another), so it is set. Too small: a proxy's short-lived per-request objects fill
# it every few hundred requests (1 MB -> 8 MB took small-GET throughput from 0.91x to
# 1.16x nginx's, p99 9.5 -> 5.0 ms). Larger: resident memory grows with the request
# count, in steps, to a level that scales with the nursery -- 32 MB rose from 105 to
# 355 MiB over 1.7 M requests (354 MiB after 125 k POSTs) and 16 MB kept growing,
# while 8 MB stayed flat at 137-140 MiB from the first 200 k requests, at the same
# throughput (GET 54-57k vs 52-54k req/s, POST 47-50k vs 41-52k in one A/B run); its
# p99 was ~2 ms higher on POST. PYPY_GC_MAJOR_COLLECT and PYPY_GC_MAX_DELTA changed
# nothing of that growth. benchmarks/memory.py measures it.
PYPY_NURSERY = "8MB"


def use_pypy_nursery(args: List[str]) -> None:
    """On PyPy without PYPY_GC_NURSERY set: set it and run this command again in
    this process (execv keeps the pid, so supervisors and tests see no change).
    Setting PYPY_GC_NURSERY yourself, to any size, keeps it and skips this.
    Interpreter options (-X, -O) are not carried over: Python 3.9 has no
    sys.orig_argv to rebuild them from."""
    if platform.python_implementation() != "PyPy" or "PYPY_GC_NURSERY" in os.environ or not sys.executable:
        return
    os.environ["PYPY_GC_NURSERY"] = PYPY_NURSERY
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "pyproxy", *args])


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"pyproxy: error: {message}\n")
        sys.exit(EXIT_USAGE)


def make_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="pyproxy",
        description="A streaming HTTP/1.1 reverse proxy for LLM and other HTTP APIs.",
        epilog="Every option can also be set as PYPROXY_<OPTION> in the environment "
        "(e.g. PYPROXY_UPSTREAM) or as <option> in the --config TOML file. "
        "Precedence: command line > environment > config file > default.",
    )
    parser.add_argument("--version", action="version", version=f"pyproxy {__version__}")
    parser.add_argument("--config", metavar="FILE", help="TOML file of settings (keys named like the options)")
    for option in OPTIONS:
        default = option.default
        if isinstance(default, tuple):
            default = ":".join(map(str, default))
        elif isinstance(default, bytes):
            default = default.decode()
        env = ", ".join(option.env_names)
        parser.add_argument(
            option.flag,
            dest=option.name,
            metavar=option.metavar,
            default=None,
            help=f"{option.help} (default: {default}; env: {env})",
        )
    parser.add_argument(
        "--no-cache", dest="cache_enabled", action="store_const", const="false", help="same as --cache-enabled false"
    )
    parser.add_argument(
        "--no-dedup", dest="dedup_enabled", action="store_const", const="false", help="same as --dedup-enabled false"
    )
    # Internal: how the supervisor starts a worker (listening socket fd, control socket fd).
    parser.add_argument("--worker-fds", dest="worker_fds", default=None, help=argparse.SUPPRESS)
    return parser


def parse_settings(argv: Optional[List[str]] = None, environ: Optional[Mapping[str, str]] = None) -> Settings:
    args = make_parser().parse_args(argv)
    cli: Dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None and k != "worker_fds"}
    return build_settings(cli, os.environ if environ is None else environ)


def worker_fds(argv: List[str]) -> Optional[Tuple[int, int]]:
    value = make_parser().parse_args(argv).worker_fds
    if value is None:
        return None
    listen_fd, control_fd = (int(part) for part in value.split(","))
    return listen_fd, control_fd


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


async def serve(settings: Settings) -> None:
    from pyproxy.proxy import Proxy
    from pyproxy.warmup import warm_up_logged

    loop = asyncio.get_running_loop()
    if settings.warmup:  # before the address is bound: not ready until warm
        await warm_up_logged(settings.warmup)
    proxy = Proxy(settings, loop)
    await proxy.start()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    admission = proxy.gateway.admission if proxy.gateway is not None else None
    if admission is not None:  # one process: SIGHUP reads the keys file again (the rest needs --workers)
        loop.add_signal_handler(signal.SIGHUP, admission.reload)
    else:
        loop.add_signal_handler(
            signal.SIGHUP, lambda: log.warning("SIGHUP: reloading needs --workers (a supervisor); ignored")
        )
    assert settings.upstream is not None
    log.info(
        "pyproxy %s listening on http://%s:%d -> %s%s (%s)",
        __version__,
        settings.listen[0],
        proxy.port,
        settings.upstream.origin,
        settings.upstream.prefix.decode(),
        describe_runtime(loop),
    )
    if proxy.admin is not None:
        log.info(
            "admin listener on http://%s:%d (/metrics /health /ready /cache/purge)",
            settings.admin_listen[0],
            proxy.admin.port,
        )  # type: ignore[index]
    await stop.wait()
    await proxy.stop()
    log.info("stopped")


async def serve_worker(settings: Settings, listen_fd: int, control_fd: int) -> None:
    """One worker under a supervisor: accept on the inherited socket, report over the
    control socket, drain on SIGTERM (or when the supervisor disappears)."""
    import socket

    from pyproxy.proxy import Proxy
    from pyproxy.supervisor import serve_control
    from pyproxy.warmup import warm_up_logged

    loop = asyncio.get_running_loop()
    if settings.warmup:  # clients wait in the shared socket's backlog meanwhile, or reach a warm worker
        await warm_up_logged(settings.warmup)
    proxy = Proxy(settings, loop)
    sock = socket.socket(fileno=listen_fd)
    await proxy.start(sock=sock, admin=False)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # the supervisor decides; it forwards SIGTERM
    control = loop.create_task(serve_control(proxy, control_fd, stop))
    log.info("worker %d accepting (%s)", os.getpid(), describe_runtime(loop))
    await stop.wait()
    await proxy.stop()
    control.cancel()
    await asyncio.gather(control, return_exceptions=True)


async def supervise(settings: Settings, argv: List[str]) -> int:
    from pyproxy.supervisor import Supervisor

    return await Supervisor(settings, argv, dict(os.environ)).run()


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["keys"]:  # the client keys file: python -m pyproxy keys new|list
        from pyproxy.keys_cli import main as keys_main

        return keys_main(args[1:])
    try:
        settings = parse_settings(args)
        fds = worker_fds(args)
        if argv is None:  # run as a program, not called by other code
            use_pypy_nursery(args)
        loop = new_event_loop(settings.loop)
    except (ConfigError, MissingDependency) as exc:
        sys.stderr.write(f"pyproxy: error: {exc}\n")
        return EXIT_USAGE
    configure_logging(settings.log_level)
    asyncio.set_event_loop(loop)
    try:
        if fds is not None:
            loop.run_until_complete(serve_worker(settings, *fds))
        elif settings.workers is not None:
            loop.run_until_complete(supervise(settings, args))
        else:
            loop.run_until_complete(serve(settings))
    except ConfigError as exc:
        sys.stderr.write(f"pyproxy: error: {exc}\n")
        return EXIT_USAGE
    finally:
        loop.close()
    return 0
