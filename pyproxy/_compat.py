"""The one place that knows which interpreter and which optional speedups we run on.

uvloop and orjson are CPython-only speedups (neither builds on PyPy); everything
falls back to the standard library when they are missing.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import platform
import sys
from typing import Any, Callable

IS_PYPY = platform.python_implementation() == "PyPy"

try:  # pragma: no cover - depends on the interpreter
    import uvloop as _uvloop
except ImportError:  # pragma: no cover
    _uvloop = None

try:  # pragma: no cover
    import orjson as _orjson
except ImportError:  # pragma: no cover
    _orjson = None

HAVE_UVLOOP = _uvloop is not None
HAVE_ORJSON = _orjson is not None

if _orjson is not None:

    def json_dumps(obj: Any) -> bytes:
        return _orjson.dumps(obj)

    json_loads: Callable[[bytes], Any] = _orjson.loads
else:

    def json_dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    json_loads = json.loads

LOOP_CHOICES = ("auto", "asyncio", "uvloop")


# What to install for each optional package a setting may need.
INSTALL_HINTS = {
    "redis": "pip install 'pyproxy[redis]'",
    "uvloop": "pip install 'pyproxy[speedups]' (CPython only; PyPy runs the stdlib loop)",
    "tomli": "pip install tomli (Python < 3.11 reads TOML with it)",
    "prometheus_client": "pip install prometheus_client",
}


class MissingDependency(RuntimeError):
    """A setting needs an optional package that is not installed; the message is the one
    line the user sees, saying what to install."""


class LoopUnavailable(MissingDependency):
    """Asked for uvloop where it is not installed."""


def require(module: str, needed_for: str) -> None:
    """Fail at start, in one line, rather than with an ImportError traceback later."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise MissingDependency(
            f"{needed_for} needs the {module} package, which is not installed: {INSTALL_HINTS[module]}"
        )


def new_event_loop(choice: str = "auto") -> asyncio.AbstractEventLoop:
    """A fresh event loop of the requested kind; ``auto`` prefers uvloop."""
    if choice == "uvloop" and _uvloop is None:
        raise LoopUnavailable(f"--loop uvloop: uvloop is not installed for this interpreter: {INSTALL_HINTS['uvloop']}")
    if choice in ("auto", "uvloop") and _uvloop is not None:
        return _uvloop.new_event_loop()
    return asyncio.new_event_loop()


def is_uvloop(loop: asyncio.AbstractEventLoop) -> bool:
    return type(loop).__module__.split(".")[0] == "uvloop"


def describe_runtime(loop: asyncio.AbstractEventLoop) -> str:
    impl = platform.python_implementation()
    version = ".".join(map(str, sys.version_info[:3]))
    loop_name = type(loop).__module__.split(".")[0]
    return f"{impl} {version}, loop={loop_name}, json={'orjson' if _orjson else 'json'}"
