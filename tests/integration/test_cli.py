"""The command line as a user runs it: ``<python> -m pyproxy`` in a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

from pyproxy.cli import PYPY_NURSERY
from tests.support.client import Client
from tests.support.origin import MODELS_BODY, Origin
from tests.support.sockets import blackholed_port, free_port

ROOT = Path(__file__).resolve().parents[2]


def _env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYPROXY_") and not k.startswith("HTTP_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # Dozens of processes start here: not one of them warms PyPy's JIT for 2 s
    # (test_warmup_runs_before_listening does, and every path of it is tested there).
    env["PYPROXY_WARMUP"] = "off"
    env.update(extra or {})
    return env


def run_cli(args: List[str], extra_env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyproxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(extra_env),
        cwd=str(ROOT),
    )


BAD_OPTIONS: Dict[str, Tuple[List[str], Dict[str, str], str]] = {
    "missing_upstream": ([], {}, "--upstream is required"),
    "bad_timeout": (["--upstream", "http://127.0.0.1:1", "--read-timeout", "abc"], {}, "--read-timeout"),
    "negative_timeout": (["--upstream", "http://127.0.0.1:1", "--connect-timeout", "-1"], {}, "--connect-timeout"),
    "bad_listen": (["--upstream", "http://127.0.0.1:1", "--listen", "nonsense"], {}, "--listen"),
    "bad_scheme": (["--upstream", "ftp://example"], {}, "--upstream"),
    "zero_pool": (["--upstream", "http://127.0.0.1:1", "--pool-connections", "0"], {}, "--pool-connections"),
    "keepalive_over_pool": (
        ["--upstream", "http://127.0.0.1:1", "--pool-connections", "2", "--keepalive-connections", "5"],
        {},
        "--keepalive-connections",
    ),
    "bad_loop": (["--upstream", "http://127.0.0.1:1", "--loop", "trio"], {}, "--loop"),
    "unknown_flag": (["--upstream", "http://127.0.0.1:1", "--frobnicate"], {}, "unrecognized arguments"),
    "missing_ca": (["--upstream", "https://127.0.0.1:1", "--upstream-ca", "/nonexistent/ca.pem"], {}, "--upstream-ca"),
    "bad_env": (["--upstream", "http://127.0.0.1:1"], {"PYPROXY_READ_TIMEOUT": "soon"}, "PYPROXY_READ_TIMEOUT"),
    "bad_env_alias": (["--upstream", "http://127.0.0.1:1"], {"HTTP_POOL_CONNECTIONS": "many"}, "HTTP_POOL_CONNECTIONS"),
    "missing_config": (["--config", "/nonexistent/pyproxy.toml"], {}, "--config"),
    "warmup_too_long": (["--upstream", "http://127.0.0.1:1", "--warmup", "90"], {}, "--warmup"),
    "warmup_not_seconds": (["--upstream", "http://127.0.0.1:1", "--warmup", "soon"], {}, "--warmup"),
    "admin_off_loopback_without_token": (
        ["--upstream", "http://127.0.0.1:1", "--admin-listen", "0.0.0.0:0"],
        {},
        "--admin-token is required",
    ),
    "admin_token_on_the_command_line": (
        ["--upstream", "http://127.0.0.1:1", "--admin-token", "s3cret-token"],
        {},
        "expected env:NAME or file:PATH",
    ),
    "admin_token_env_unset": (
        ["--upstream", "http://127.0.0.1:1", "--admin-token", "env:PYPROXY_TEST_NO_SUCH_VAR"],
        {},
        "PYPROXY_TEST_NO_SUCH_VAR is not set",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_wrong_option_is_one_line_and_exit_2(case: str) -> None:
    args, env, needle = BAD_OPTIONS[case]
    result = run_cli(args, env)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pyproxy: error:") and needle in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def test_bad_config_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "pyproxy.toml"
    config.write_text('upstream = "http://127.0.0.1:1"\nread_timeout = "later"\n')
    result = run_cli(["--config", str(config)])
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "read_timeout in" in result.stderr
    config.write_text('upstream = "http://127.0.0.1:1"\nno_such_setting = 1\n')
    result = run_cli(["--config", str(config)])
    assert result.returncode == 2 and "unknown setting 'no_such_setting'" in result.stderr
    config.write_text("this is = not toml [")
    result = run_cli(["--config", str(config)])
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "tables, expected",
    [
        ('[[upstreams]]\nname = "a"\nurl = "http://127.0.0.1:1"\napi_key = "env:PYPROXY_TEST_UNSET_KEY"\n',
         "upstreams[0].api_key: environment variable PYPROXY_TEST_UNSET_KEY is not set"),
        ('[[upstreams]]\nname = "a"\nurl = "http://127.0.0.1:1"\napi_key = "file:/nonexistent/secret"\n',
         "upstreams[0].api_key: cannot read '/nonexistent/secret'"),
        ('[[upstreams]]\nname = "a"\nurl = "http://127.0.0.1:1"\n[[models]]\nname = "m"\n'
         'deployments = [{ upstream = "b" }]\n', "models[0].deployments[0].upstream: no upstream named 'b'"),
        ('[[upstreams]]\nname = "a"\nurl = "http://127.0.0.1:1"\n[[upstreams]]\nname = "a"\nurl = "http://x"\n',
         "upstreams[1].name: 'a' is used twice"),
    ],
)  # fmt: skip
def test_bad_gateway_config_is_one_line_naming_the_key_and_exit_2(tmp_path: Path, tables: str, expected: str) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(tables)
    result = run_cli(["--config", str(config)])
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result
    assert expected in result.stderr


def test_loop_uvloop_without_uvloop_is_exit_2() -> None:
    """As on PyPy, where uvloop never installs; on CPython uvloop is hidden from the import."""
    code = (
        "import sys; sys.modules['uvloop'] = None; from pyproxy.cli import main; "
        "sys.exit(main(['--upstream', 'http://127.0.0.1:1', '--loop', 'uvloop']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=_env(), cwd=str(ROOT)
    )
    assert result.returncode == 2 and "uvloop is not installed" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_listen_port_in_use_is_exit_2() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = run_cli(["--upstream", "http://127.0.0.1:1", "--listen", f"127.0.0.1:{port}"])
    assert result.returncode == 2, result
    assert len(result.stderr.strip().splitlines()) == 1 and "--listen" in result.stderr


@contextlib.contextmanager
def _upstream(state: str) -> Iterator[str]:
    """An upstream in each state a start-up failure must not care about."""
    if state == "refused":
        yield f"http://127.0.0.1:{free_port()}"
    elif state == "blackholed":
        with blackholed_port() as port:
            yield f"http://127.0.0.1:{port}"
    else:  # reachable: a listener with room in its accept queue
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen(16)
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def _timed_cli(args: List[str]) -> Tuple[subprocess.CompletedProcess, float]:
    import time

    started = time.monotonic()
    result = run_cli(args)
    return result, time.monotonic() - started


# Start-up failures exit within a second of the failure; an interpreter's own start
# (PyPy's included, with its one re-exec) gets the rest of this margin.
START_FAILURE_SECONDS = 5.0


@pytest.mark.parametrize("workers", [None, "1"], ids=["one-process", "supervisor"])
@pytest.mark.parametrize("upstream_state", ["refused", "blackholed", "reachable"])
def test_admin_port_in_use_is_one_line_and_exit_2_at_once(upstream_state: str, workers: Optional[str]) -> None:
    """Issue 10 item 1: with the admin port taken and the upstream not reachable, a
    second instance never exited (the background upstream check swallowed its cancel)."""
    with _upstream(upstream_state) as upstream, socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        admin = busy.getsockname()[1]
        args = ["--upstream", upstream, "--listen", f"127.0.0.1:{free_port()}"]
        args += ["--admin-listen", f"127.0.0.1:{admin}", "--health-interval", "30"]
        if workers:
            args += ["--workers", workers]
        result, took = _timed_cli(args)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if "error" in line] == lines[-1:], result.stderr
    assert lines[-1].startswith(f"pyproxy: error: --admin-listen 127.0.0.1:{admin}:"), lines[-1]
    assert "Traceback" not in result.stderr
    assert took < START_FAILURE_SECONDS, took


STARTUP_FAILURES: Dict[str, Tuple[List[str], str]] = {
    "redis_url_bad_port": (["--cache-backend", "redis://localhost:notaport/0"], "not a valid Redis URL"),
    "redis_url_no_host": (["--cache-backend", "redis:///0"], "needs a host"),
    "unix_url_no_path": (["--cache-backend", "unix://"], "needs a socket path"),
}


@pytest.mark.parametrize("case", sorted(STARTUP_FAILURES))
def test_refused_setting_is_one_line_and_exit_2(case: str) -> None:
    args, needle = STARTUP_FAILURES[case]
    result, took = _timed_cli(["--upstream", "http://127.0.0.1:1", *args])
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert took < START_FAILURE_SECONDS, took


# Each optional package a setting needs, hidden from the import system: the message
# names what to install. (tomli is only ever imported on Python < 3.11: PyPy here.)
MISSING_PACKAGES: Dict[str, Tuple[List[str], str]] = {
    "redis": (["--cache-backend", "redis://127.0.0.1:6379/0"], "pip install 'pyproxy[redis]'"),
    "uvloop": (["--loop", "uvloop"], "pip install 'pyproxy[speedups]'"),
    "prometheus_client": (["--admin-listen", "127.0.0.1:0"], "pip install prometheus_client"),
}
if sys.version_info < (3, 11):
    MISSING_PACKAGES["tomli"] = (["--config", "CONFIG"], "pip install tomli")


@pytest.mark.parametrize("module", sorted(MISSING_PACKAGES))
def test_missing_optional_package_is_one_line_naming_the_install(module: str, tmp_path: Path) -> None:
    """Issue 10 item 2: a setting that needs a package that is not installed says what
    to install, in one line, exit 2 -- not an ImportError traceback."""
    args, hint = MISSING_PACKAGES[module]
    config = tmp_path / "pyproxy.toml"
    config.write_text("read_timeout = 5\n")
    args = [str(config) if arg == "CONFIG" else arg for arg in args]
    code = (
        f"import sys; sys.modules[{module!r}] = None; from pyproxy.cli import main; "
        f"sys.exit(main(['--upstream', 'http://127.0.0.1:1', '--listen', '127.0.0.1:0', *{args!r}]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=_env(), cwd=str(ROOT)
    )
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and hint in lines[0] and "not installed" in lines[0], result.stderr


def test_help_lists_every_option() -> None:
    result = run_cli(["--help"])
    assert result.returncode == 0
    for flag in (
        "--listen",
        "--upstream",
        "--connect-timeout",
        "--read-timeout",
        "--pool-connections",
        "--keepalive-connections",
        "--keepalive-expiry",
        "--max-body-size",
        "--max-header-size",
        "--upstream-ca",
        "--loop",
        "--config",
        "--log-level",
        "HTTP_POOL_CONNECTIONS",
    ):
        assert flag in result.stdout, flag


class RunningCLI:
    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port
        self.log: List[str] = []

    async def wait_for_log(self, needle: str, timeout: float = 10.0) -> None:
        assert self.process.stderr is not None
        while not any(needle in line for line in self.log):
            line = await asyncio.wait_for(self.process.stderr.readline(), timeout)
            if not line:
                raise AssertionError(f"process ended before logging {needle!r}: {self.log}")
            self.log.append(line.decode())


async def start_cli(*args: str, env: Optional[Dict[str, str]] = None) -> RunningCLI:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pyproxy",
        "--listen",
        "127.0.0.1:0",
        *(() if "--admin-listen" in args else ("--admin-listen", "off")),
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=_env() if env is None else env,
        cwd=str(ROOT),
    )
    assert process.stderr is not None
    log: List[str] = []
    while True:
        line = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
        if not line:
            raise AssertionError(f"pyproxy did not start: {log}")
        log.append(line)
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if match:
            running = RunningCLI(process, int(match.group(1)))
            running.log = log
            return running


async def test_serves_then_drains_in_flight_stream_on_sigterm() -> None:
    async with Origin() as origin:
        cli = await start_cli("--upstream", origin.url, "--drain-timeout", "20")
        try:
            async with await Client.connect(cli.port) as client:
                assert (await client.request(b"GET", b"/v1/models")).body == MODELS_BODY
            async with await Client.connect(cli.port) as streaming:
                await streaming.send_request(b"GET", b"/sse?n=10&interval=0.05")
                head = await streaming.read_head()
                assert head.status_code == 200
                cli.process.send_signal(signal.SIGTERM)
                await cli.wait_for_log("stopped accepting")
                with pytest.raises(OSError):  # no longer accepting
                    await Client.connect(cli.port)
                chunks = []
                while True:
                    event = await streaming.next_event()
                    if type(event).__name__ == "Data":
                        chunks.append(event.data)
                    else:
                        assert type(event).__name__ == "EndOfMessage"
                        break
            assert b"".join(chunks).count(b"data: ") == 11  # the whole stream, [DONE] included
            assert await asyncio.wait_for(cli.process.wait(), 20) == 0
        finally:
            if cli.process.returncode is None:
                cli.process.kill()
                await cli.process.wait()


async def test_drain_timeout_bounds_shutdown_and_truncates() -> None:
    async with Origin() as origin:
        cli = await start_cli("--upstream", origin.url, "--drain-timeout", "0.3")
        try:
            async with await Client.connect(cli.port) as streaming:
                await streaming.send_request(b"GET", b"/sse?n=100&interval=0.1")
                assert (await streaming.read_head()).status_code == 200
                cli.process.send_signal(signal.SIGINT)
                assert await asyncio.wait_for(cli.process.wait(), 10) == 0
                response_rest = await asyncio.wait_for(streaming.reader.read(), 5)
                assert b"0\r\n\r\n" not in response_rest  # never completed
        finally:
            if cli.process.returncode is None:
                cli.process.kill()
                await cli.process.wait()


@pytest.mark.parametrize("preset", [None, "2MB"])
async def test_pypy_runs_with_a_set_gc_nursery_unless_one_is_set(preset: Optional[str]) -> None:
    """On PyPy, ``-m pyproxy`` re-executes itself once (same pid) with PYPY_GC_NURSERY=8MB;
    a size the user set is kept; on CPython the environment is left alone."""
    env = {k: v for k, v in _env().items() if k != "PYPY_GC_NURSERY"}
    if preset is not None:
        env["PYPY_GC_NURSERY"] = preset
    async with Origin() as origin:
        cli = await start_cli("--upstream", origin.url, env=env)
        try:
            async with await Client.connect(cli.port) as client:
                assert (await client.request(b"GET", b"/v1/models")).body == MODELS_BODY
            environ = Path(f"/proc/{cli.process.pid}/environ").read_bytes().split(b"\0")
            nursery = [entry.split(b"=", 1)[1] for entry in environ if entry.startswith(b"PYPY_GC_NURSERY=")]
            if preset is not None:
                expected = [preset.encode()]
            elif platform.python_implementation() == "PyPy":
                expected = [PYPY_NURSERY.encode()]
            else:
                expected = []
            assert nursery == expected
        finally:
            cli.process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(cli.process.wait(), 20) == 0


def test_keys_new_and_list_and_a_bad_keys_file_at_start(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    made = run_cli(["keys", "new", "--name", "alice", "--rpm", "60", "--tpm", "1000", "--file", str(keys)])
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert re.fullmatch(r"pp-[A-Za-z0-9_-]{43,}", key)
    assert key not in keys.read_text() and "sha256:" in keys.read_text()
    assert oct(keys.stat().st_mode & 0o777) == "0o600"
    again = run_cli(["keys", "new", "--name", "alice", "--file", str(keys)])
    assert again.returncode == 2 and "exists already" in again.stderr and again.stderr.count("\n") == 1
    assert run_cli(["keys", "new", "--name", "Bad Name", "--file", str(keys)]).returncode == 2
    listed = run_cli(["keys", "list", "--file", str(keys)])
    assert listed.returncode == 0 and "alice" in listed.stdout and "60" in listed.stdout
    digest = keys.read_text().split('hash = "sha256:')[1][:64]
    assert digest not in listed.stdout and digest[:8] in listed.stdout
    # Started with a keys file that does not load: one line, exit 2, no key material.
    keys.write_text(keys.read_text() + '\n[[keys]]\nname = "bob"\nhash = "' + key + '"\n')
    config = tmp_path / "gw.toml"
    config.write_text(
        '[[upstreams]]\nname = "up"\nurl = "http://127.0.0.1:1"\napi_key = "k"\n'
        '[auth]\nmode = "keys"\nkeys_file = "keys.toml"\n'  # relative: next to the config file
    )
    result = run_cli(["--config", str(config)])
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "keys[1] (bob).hash" in result.stderr and "plaintext key is not stored" in result.stderr
    assert key not in result.stderr


async def test_sighup_reloads_the_keys_file_in_one_process(tmp_path: Path) -> None:
    from pyproxy.gateway.keys import key_hash

    async with Origin() as origin:
        keys = tmp_path / "keys.toml"
        keys.write_text(f'[[keys]]\nname = "alice"\nhash = "{key_hash("pp-alice-key")}"\n')
        config = tmp_path / "gw.toml"
        config.write_text(
            f'[[upstreams]]\nname = "up"\nurl = "{origin.url}"\napi_key = "k"\n'
            f'[auth]\nmode = "keys"\nkeys_file = "{keys}"\n'
        )
        cli = await start_cli("--config", str(config))
        try:
            auth = [(b"authorization", b"Bearer pp-alice-key")]
            async with await Client.connect(cli.port) as client:
                assert (await client.request(b"GET", b"/v1/models", auth)).status == 200
            # Same size, same second: only SIGHUP tells (an mtime check might miss it).
            text = keys.read_text()
            with open(keys, "r+") as fh:
                fh.write(text.replace('name = "alice"', 'name = "alicf"'))
            stat = keys.stat()
            os.utime(keys, ns=(stat.st_atime_ns, stat.st_mtime_ns))
            cli.process.send_signal(signal.SIGHUP)
            await cli.wait_for_log("keys file reloaded (SIGHUP)")
            async with await Client.connect(cli.port) as client:
                resp = await client.request(b"GET", b"/v1/models", auth)
                assert resp.status == 200  # the same key, renamed: still valid
            keys.write_text("")
            cli.process.send_signal(signal.SIGHUP)
            await cli.wait_for_log(f"keys file reloaded (SIGHUP) in process {cli.process.pid}: 0 keys")
            async with await Client.connect(cli.port) as client:
                assert (await client.request(b"GET", b"/v1/models", auth)).status == 401
        finally:
            cli.process.terminate()
            await cli.process.wait()


async def test_warmup_runs_before_listening() -> None:
    async with Origin() as origin:
        cli = await start_cli("--upstream", origin.url, "--warmup", "0.3")
        try:
            warm = [line for line in cli.log if "warm-up:" in line]
            assert warm, cli.log  # logged before "listening on"
            relayed = int(re.search(r"warm-up: (\d+) requests relayed", warm[0]).group(1))  # type: ignore[union-attr]
            assert relayed >= 3 * 250  # at least one whole round, every response a 200
            assert origin.requests == []  # its own loopback origin, never the upstream
            async with await Client.connect(cli.port) as client:
                assert (await client.request(b"GET", b"/v1/models")).body == MODELS_BODY
        finally:
            cli.process.send_signal(signal.SIGTERM)
            await cli.process.wait()
