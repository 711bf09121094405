"""Run ``async def`` tests on a fresh event loop of every installed implementation.

Each async test runs once on the stdlib asyncio loop and once on uvloop where
uvloop is installed (CPython), like uvicorn's tests do. Anything the loop's
exception handler reports (an exception never retrieved, a callback that
raised) fails the test; unclosed sockets fail it through
``filterwarnings = error``.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import ssl
from typing import Any, Dict, List

import pytest

from pyproxy._compat import HAVE_UVLOOP, new_event_loop

LOOPS: List[str] = ["asyncio"] + (["uvloop"] if HAVE_UVLOOP else [])
TEST_TIMEOUT = 60.0


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if inspect.iscoroutinefunction(metafunc.function):
        only = metafunc.definition.get_closest_marker("loops")
        loops = [name for name in LOOPS if only is None or name in only.args]
        if "loop_impl" not in metafunc.fixturenames:
            metafunc.fixturenames.append("loop_impl")
        metafunc.parametrize("loop_impl", loops, ids=loops, indirect=True)


def _record_loop_error(errors: List[Any], context: Dict[str, Any]) -> None:
    # The in-test TLS origin reports the handshakes the proxy rightly refuses
    # (untrusted certificate, wrong name) as "Error on transport creation";
    # that is the origin's complaint about the test's premise, not a fault.
    if context.get("message", "").startswith("Error on transport creation for incoming connection") and isinstance(
        context.get("exception"), (ConnectionResetError, ssl.SSLError)
    ):
        return
    errors.append(context)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Any:
    func = pyfuncitem.obj
    if not inspect.iscoroutinefunction(func):
        return None
    kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    loop = new_event_loop(pyfuncitem.callspec.params["loop_impl"])
    errors: List[Any] = []
    loop.set_exception_handler(lambda _loop, context: _record_loop_error(errors, context))
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(asyncio.wait_for(func(**kwargs), TEST_TIMEOUT))
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        asyncio.set_event_loop(None)
        loop.close()
        gc.collect()
    if errors:
        raise AssertionError(f"event loop reported errors: {errors!r}")
    return True


@pytest.fixture
def loop_impl(request: pytest.FixtureRequest) -> str:
    """The event loop implementation an async test runs on (parametrized above)."""
    return str(getattr(request, "param", "asyncio"))
