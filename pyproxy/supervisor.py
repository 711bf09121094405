"""``--workers N``: a supervisor process and N worker processes sharing one listener.

The supervisor opens the listening socket (SO_REUSEADDR and SO_REUSEPORT, so
other pyproxy instances may share the port) and every worker accepts on that
same socket, inherited at start. One shared socket rather than one
SO_REUSEPORT socket per worker is deliberate: the kernel resets connections
still queued on a socket that closes, so per-worker sockets would drop
requests whenever a worker exits or is replaced. Here the socket outlives
every worker.

- A worker that exits unexpectedly is started again (after 1 s, doubling to
  30 s while it keeps failing within seconds of starting).
- SIGTERM / SIGINT: every worker drains (``--drain-timeout``), then the
  supervisor exits.
- SIGHUP: the configuration is read again; if it is valid, a new set of
  workers is started, and once every one of them is accepting, the old ones
  drain. No queued or in-flight request is lost. (A bad configuration is
  logged and the running workers keep serving.)
- The admin listener runs in the supervisor: ``/metrics`` sums every worker's
  counters (asked over each worker's control socket), ``/ready`` is 503 while
  draining, ``POST /cache/purge`` reaches every worker (or one, with Redis).

Workers are separate interpreters started with the supervisor's own command
line and environment, so a reload picks up the edited ``--config`` file (new
code needs a restart).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from pyproxy._compat import json_dumps, json_loads
from pyproxy.admin import AdminServer, AdminSource, admin_token_bytes
from pyproxy.config import ConfigError, Settings
from pyproxy.health import UpstreamProbe
from pyproxy.metrics import merge_snapshots

log = logging.getLogger("pyproxy.supervisor")

READY_TIMEOUT = 60.0
CONTROL_TIMEOUT = 5.0
RESTART_BACKOFF_MIN = 1.0
RESTART_BACKOFF_MAX = 30.0


def worker_count(settings: Settings) -> int:
    if settings.workers:  # None never gets here; 0 is "auto"
        return settings.workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def listen_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


class Worker:
    def __init__(self, generation: int, process: "asyncio.subprocess.Process", control: socket.socket) -> None:
        self.generation = generation
        self.process = process
        self.control = control
        self.started = time.monotonic()
        self.ready = asyncio.get_running_loop().create_future()
        self.reader: Optional[asyncio.StreamReader] = None
        self.writer: Optional[asyncio.StreamWriter] = None
        self.lock = asyncio.Lock()  # one control request at a time
        self.retired = False

    @property
    def pid(self) -> int:
        return self.process.pid

    async def attach(self) -> None:
        self.reader, self.writer = await asyncio.open_unix_connection(sock=self.control)
        try:
            line = await asyncio.wait_for(self.reader.readline(), READY_TIMEOUT)
        except asyncio.TimeoutError:
            line = b""
        if not self.ready.done():
            self.ready.set_result(line.strip() == b"ready")

    async def ask(self, command: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        if self.writer is None or self.reader is None or self.writer.is_closing():
            return None
        async with self.lock:
            try:
                self.writer.write(json_dumps(command) + b"\n")
                await self.writer.drain()
                line = await asyncio.wait_for(self.reader.readline(), CONTROL_TIMEOUT)
            except (OSError, asyncio.TimeoutError):
                return None
        if not line:
            return None
        try:
            reply = json_loads(line)
        except ValueError:
            return None
        return reply if isinstance(reply, dict) else None

    def signal(self, signum: int) -> None:
        if self.process.returncode is None:
            try:
                self.process.send_signal(signum)
            except ProcessLookupError:  # pragma: no cover - exited meanwhile
                pass

    def close_control(self) -> None:
        if self.writer is not None:
            self.writer.close()
        else:
            self.control.close()


class Supervisor:
    def __init__(self, settings: Settings, argv: Sequence[str], environ: Dict[str, str]) -> None:
        self.settings = settings
        self.argv = list(argv)  # the command line workers are started with (and reloads re-read)
        self.environ = environ
        self.count = worker_count(settings)
        self.generation = 0
        self.workers: List[Worker] = []
        self.draining = False
        self.sock: Optional[socket.socket] = None
        self.admin: Optional[AdminServer] = None
        self.probe: Optional[UpstreamProbe] = None
        self._stop = asyncio.Event()
        self._backoff = 0.0
        self._tasks: "set[asyncio.Task[None]]" = set()
        self.restarts = 0
        self.reloads = 0

    # --- lifecycle ------------------------------------------------------------------------

    async def run(self) -> int:
        settings = self.settings
        assert settings.upstream is not None
        try:
            self.sock = listen_socket(*settings.listen)
        except OSError as exc:
            raise ConfigError(f"--listen {settings.listen[0]}:{settings.listen[1]}: {exc.strerror or exc}") from None
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn_task(self.reload()))
        # Every address is bound before anything runs in the background, so a start-up
        # failure has nothing to stop: one line, exit 2, at once.
        if settings.admin_listen is not None:
            self.admin = AdminServer(SupervisorAdmin(self), admin_token_bytes(self.settings))
            try:
                await self.admin.start(*settings.admin_listen)
            except OSError as exc:
                self.sock.close()
                host, port = settings.admin_listen
                raise ConfigError(f"--admin-listen {host}:{port}: {exc.strerror or exc}") from None
        self.probe = UpstreamProbe(settings.upstream, settings.health_interval, settings.connect_timeout)
        self.probe.start()
        self.generation = 1
        started = await asyncio.gather(*(self._start_worker(1) for _ in range(self.count)))
        ready = await asyncio.gather(*(w.ready for w in started))
        log.info(
            "supervisor %d: %d/%d workers accepting on %s:%d",
            os.getpid(),
            sum(ready),
            self.count,
            *self.sock.getsockname()[:2],
        )
        await self._stop.wait()
        await self.shutdown()
        return 0

    async def shutdown(self) -> None:
        self.draining = True
        log.info("supervisor: draining %d worker(s)", len(self.workers))
        for worker in list(self.workers):
            worker.signal(signal.SIGTERM)
        if self.sock is not None:
            self.sock.close()  # the workers hold their own copies until they stop accepting
        deadline = self.settings.drain_timeout + 10.0
        waiting = [w.process.wait() for w in self.workers]
        if waiting:
            done, pending = await asyncio.wait([asyncio.ensure_future(c) for c in waiting], timeout=deadline)
            for worker in self.workers:
                if worker.process.returncode is None:
                    log.warning("worker %d did not stop in time: killing it", worker.pid)
                    worker.signal(signal.SIGKILL)
            if pending:
                await asyncio.wait(pending, timeout=5.0)
        for worker in self.workers:
            worker.close_control()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.probe is not None:
            await self.probe.stop()
        if self.admin is not None:
            await self.admin.stop()
        log.info("supervisor: stopped")

    # --- workers ----------------------------------------------------------------------------

    async def _start_worker(self, generation: int) -> Worker:
        assert self.sock is not None
        parent_end, child_end = socket.socketpair()
        listen_fd = self.sock.fileno()
        cmd = [
            sys.executable,
            "-m",
            "pyproxy",
            *self.argv,
            "--worker-fds",
            f"{listen_fd},{child_end.fileno()}",
        ]
        process = await asyncio.create_subprocess_exec(
            *cmd, pass_fds=(listen_fd, child_end.fileno()), env=self.environ, stdin=asyncio.subprocess.DEVNULL
        )
        child_end.close()
        worker = Worker(generation, process, parent_end)
        self.workers.append(worker)
        self._spawn_task(worker.attach())
        self._spawn_task(self._watch(worker))
        return worker

    async def _watch(self, worker: Worker) -> None:
        code = await worker.process.wait()
        if worker in self.workers:
            self.workers.remove(worker)
        worker.close_control()
        if not worker.ready.done():
            worker.ready.set_result(False)
        if self.draining or worker.retired:
            return
        lived = time.monotonic() - worker.started
        log.warning("worker %d exited with status %s after %.1f s: starting another", worker.pid, code, lived)
        self.restarts += 1
        # A worker that keeps dying young is restarted ever more slowly.
        backoff = 0.0 if lived > 10 else min(max(RESTART_BACKOFF_MIN, self._backoff * 2), RESTART_BACKOFF_MAX)
        self._backoff = backoff
        if backoff:
            await asyncio.sleep(backoff)
        if not self.draining and worker.generation == self.generation:
            await self._start_worker(self.generation)

    async def reload(self) -> None:
        """SIGHUP: new workers with the configuration read again, then the old ones drain."""
        from pyproxy.cli import parse_settings

        try:
            settings = parse_settings(self.argv, self.environ)
        except (ConfigError, SystemExit) as exc:
            log.error("reload refused, the workers keep the old configuration: %s", exc)
            return
        if settings.listen != self.settings.listen:
            log.error("reload refused: --listen cannot change on reload (restart instead)")
            return
        self.settings = settings
        self.count = worker_count(settings)
        self.reloads += 1
        self.generation += 1
        old = [w for w in self.workers if w.generation < self.generation]
        started = [await self._start_worker(self.generation) for _ in range(self.count)]
        ready = await asyncio.gather(*(w.ready for w in started))
        if not all(ready):
            log.error("reload: not every new worker became ready; the old workers keep serving too")
            return
        for worker in old:
            worker.retired = True
            worker.signal(signal.SIGTERM)
        log.info("reload %d: %d new workers accepting, %d old draining", self.reloads, len(started), len(old))

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class SupervisorAdmin(AdminSource):
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def snapshot(self) -> Dict[str, Any]:  # pragma: no cover - fresh_snapshot is used
        raise NotImplementedError

    async def fresh_snapshot(self) -> Dict[str, Any]:
        replies = await asyncio.gather(*(w.ask({"op": "snapshot"}) for w in list(self.supervisor.workers)))
        merged = merge_snapshots([r for r in replies if r is not None])
        merged.setdefault("requests", [])
        merged.setdefault("durations", [])
        merged.setdefault("upstream_ttfb", [])
        merged.setdefault("pool", {})
        merged.setdefault("dedup", {})
        for name in ("bytes_in", "bytes_out", "client_errors", "in_flight", "client_connections"):
            merged.setdefault(name, 0)
        merged["workers"] = {
            "running": len(self.supervisor.workers),
            "restarts": self.supervisor.restarts,
            "reloads": self.supervisor.reloads,
        }
        return merged

    def auth_config(self) -> Any:
        gateway = self.supervisor.settings.gateway
        return gateway.auth if gateway is not None else None

    def health(self) -> Dict[str, Any]:
        sup = self.supervisor
        return {
            "status": "ok",
            "draining": sup.draining,
            "workers": len(sup.workers),
            "worker_pids": sorted(w.pid for w in sup.workers),
            "upstream": sup.probe.state() if sup.probe is not None else None,
        }

    def ready(self) -> bool:
        sup = self.supervisor
        return not sup.draining and any(w.ready.done() and w.ready.result() for w in sup.workers)

    async def upstreams(self) -> Dict[str, Any]:
        """Each worker's view (ejection and latency are per worker: each sees its own traffic)."""
        workers = list(self.supervisor.workers)
        replies = await asyncio.gather(*(w.ask({"op": "upstreams"}) for w in workers))
        return {"workers": {str(w.pid): r for w, r in zip(workers, replies) if r is not None}}

    async def purge(self, path: Optional[bytes], prefix: Optional[bytes]) -> int:
        command = {
            "op": "purge",
            "path": path.decode() if path else None,
            "prefix": prefix.decode() if prefix else None,
        }
        workers = list(self.supervisor.workers)
        if self.supervisor.settings.cache_backend != "memory":
            workers = workers[:1]  # one shared store: one purge
        replies = await asyncio.gather(*(w.ask(command) for w in workers))
        return sum(int(r.get("purged", 0)) for r in replies if r is not None)


async def serve_control(proxy: Any, control_fd: int, stop: asyncio.Event) -> None:
    """A worker's end of its control socket: say ready, answer snapshot and purge
    requests, and stop when the supervisor goes away (no orphaned workers)."""
    from pyproxy.metrics import snapshot

    sock = socket.socket(fileno=control_fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    writer.write(b"ready\n")
    await writer.drain()
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            try:
                command = json_loads(line)
                op = command.get("op")
            except (ValueError, AttributeError):
                op = None
            if op == "snapshot":
                reply: Dict[str, Any] = snapshot(proxy)
            elif op == "upstreams":
                from pyproxy.proxy import upstreams_view

                reply = upstreams_view(proxy)
            elif op == "purge" and proxy.cache is not None:
                path, prefix = command.get("path"), command.get("prefix")
                purged = await proxy.cache.purge(
                    path=path.encode() if path else None, prefix=prefix.encode() if prefix else None
                )
                reply = {"purged": purged}
            elif op == "purge":
                reply = {"purged": 0}
            else:
                reply = {"error": "unknown command"}
            writer.write(json_dumps(reply) + b"\n")
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()
        stop.set()  # the supervisor is gone (or closed our control socket): drain and exit
