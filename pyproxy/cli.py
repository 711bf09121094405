"""Command line: ``python -m pyproxy`` / ``pypy3 -m pyproxy`` / ``pyproxy``.

A wrong option prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any, Dict, List, Mapping, NoReturn, Optional

from pyproxy import __version__
from pyproxy._compat import LoopUnavailable, describe_runtime, new_event_loop
from pyproxy.config import OPTIONS, ConfigError, Settings, build_settings

log = logging.getLogger("pyproxy")

EXIT_USAGE = 2


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
    return parser


def parse_settings(argv: Optional[List[str]] = None, environ: Optional[Mapping[str, str]] = None) -> Settings:
    args = make_parser().parse_args(argv)
    cli: Dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None}
    return build_settings(cli, os.environ if environ is None else environ)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


async def serve(settings: Settings) -> None:
    from pyproxy.proxy import Proxy

    loop = asyncio.get_running_loop()
    proxy = Proxy(settings, loop)
    try:
        await proxy.start()
    except OSError as exc:
        raise ConfigError(f"--listen {settings.listen[0]}:{settings.listen[1]}: {exc.strerror or exc}") from None
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
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
    await stop.wait()
    await proxy.stop()
    log.info("stopped")


def main(argv: Optional[List[str]] = None) -> int:
    try:
        settings = parse_settings(argv)
        loop = new_event_loop(settings.loop)
    except (ConfigError, LoopUnavailable) as exc:
        sys.stderr.write(f"pyproxy: error: {exc}\n")
        return EXIT_USAGE
    configure_logging(settings.log_level)
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(serve(settings))
    except ConfigError as exc:
        sys.stderr.write(f"pyproxy: error: {exc}\n")
        return EXIT_USAGE
    finally:
        loop.close()
    return 0
