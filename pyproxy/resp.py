"""A pipelined Redis client for the one thing the shared limits do: run Lua scripts.

Why not redis-py (which the cache uses): its asyncio client takes a connection
from a pool for every command and waits for the answer before that connection
serves another, so N concurrent admissions hold N connections, and one
``EVALSHA`` costs about 120 us of CPU on CPython (75 us on PyPy) -- more than
pyproxy's whole relay of a request. Redis answers commands in the order they
arrive on a connection (the RESP protocol's pipelining), so one connection can
carry every admission of a process: write the command, queue a future, and
resolve the futures in order as replies arrive. That is all this module does.

``RespParser`` is sans-I/O (RESP2: simple strings, errors, integers, bulk
strings, arrays; https://redis.io/docs/latest/develop/reference/protocol-spec/),
tested without sockets; ``RespClient`` owns the connection, reconnecting on the
next call after a failure. Every call has a deadline; a timed-out call's reply,
when it comes, resolves nothing (its future is done) but keeps the order.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from typing import Any, Deque, List, Optional, Sequence, Tuple, Union
from urllib.parse import parse_qs, unquote, urlsplit

from pyproxy._compat import is_uvloop
from pyproxy.upstream.connection import ReusedBufferReads

MAX_PENDING = 10000  # calls in flight on the connection; beyond, a call fails at once
_CRLF = b"\r\n"


class RespError(Exception):
    """An error reply (``-ERR ...``): the command failed, the connection is fine."""


class RespProtocolError(Exception):
    """Bytes that are not RESP: the connection cannot be trusted any more."""


Reply = Union[bytes, int, None, RespError, List[Any]]


class RespParser:
    """Replies out of a byte stream, fed as it arrives."""

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def feed(self, data: bytes) -> List[Reply]:
        buf = self._buf[self._pos :] + data if self._buf else data
        self._buf, self._pos = buf, 0
        out: List[Reply] = []
        while self._pos < len(buf):
            parsed = self._one(buf, self._pos)
            if parsed is None:
                break
            reply, self._pos = parsed
            out.append(reply)
        if self._pos >= len(buf):
            self._buf, self._pos = b"", 0
        return out

    def _one(self, buf: bytes, pos: int) -> Optional[Tuple[Reply, int]]:
        end = buf.find(_CRLF, pos)
        if end < 0:
            return None
        kind = buf[pos : pos + 1]
        line = buf[pos + 1 : end]
        after = end + 2
        if kind == b"+":
            return line, after
        if kind == b":":
            return int(line), after
        if kind == b"-":
            return RespError(line.decode("utf-8", "replace")), after
        if kind == b"$":
            size = int(line)
            if size < 0:
                return None, after
            if len(buf) < after + size + 2:
                return None
            return buf[after : after + size], after + size + 2
        if kind == b"*":
            count = int(line)
            if count < 0:
                return None, after
            items: List[Any] = []
            for _ in range(count):
                parsed = self._one(buf, after)
                if parsed is None:
                    return None
                item, after = parsed
                items.append(item)
            return items, after
        raise RespProtocolError(f"unexpected RESP type byte {kind!r}")


_BULK_HEADS = [b"$%d\r\n" % n for n in range(256)]


def bulk(value: Union[bytes, str, int, float]) -> bytes:
    """One argument as a RESP bulk string. Callers on a hot path build a command's
    constant parts once with this and join them (see Command)."""
    kind = type(value)
    if kind is bytes:
        data = value
    elif kind is str:
        data = value.encode("utf-8")  # type: ignore[union-attr]
    elif kind is int:
        data = str(value).encode("ascii")
    else:
        data = repr(value).encode("ascii")
    size = len(data)  # type: ignore[arg-type]
    return b"".join((_BULK_HEADS[size] if size < 256 else b"$%d\r\n" % size, data, _CRLF))  # type: ignore[arg-type]


def encode_command(args: Sequence[Union[bytes, str, int, float]]) -> bytes:
    return b"".join([b"*%d\r\n" % len(args)] + [bulk(arg) for arg in args])


class Command:
    """A script call's keys and arguments as RESP bulk strings, joined once: parts
    encoded ahead of time (a scope's keys and limits) are added as they are."""

    __slots__ = ("keys", "key_count", "args", "arg_count")

    def __init__(self) -> None:
        self.keys: List[bytes] = []
        self.key_count = 0
        self.args: List[bytes] = []
        self.arg_count = 0

    def key(self, value: Union[bytes, str]) -> None:
        self.keys.append(bulk(value))
        self.key_count += 1

    def arg(self, value: Union[bytes, str, int, float]) -> None:
        self.args.append(bulk(value))
        self.arg_count += 1

    def encoded_keys(self, data: bytes, count: int) -> None:
        self.keys.append(data)
        self.key_count += count

    def encoded_args(self, data: bytes, count: int) -> None:
        self.args.append(data)
        self.arg_count += count

    def wire(self, verb: bytes, script_ref: bytes) -> bytes:
        """The whole command: ``verb`` (EVALSHA or EVAL) with the sha or the source."""
        head = b"*%d\r\n" % (3 + self.key_count + self.arg_count)
        return b"".join([head, bulk(verb), bulk(script_ref), bulk(self.key_count)] + self.keys + self.args)


class Script:
    """A Lua script, run by its SHA-1 (loaded on the first NOSCRIPT)."""

    __slots__ = ("source", "sha")

    def __init__(self, source: str) -> None:
        self.source = source.encode("utf-8")
        self.sha = hashlib.sha1(self.source).hexdigest().encode("ascii")


class _Connection(asyncio.Protocol):
    def __init__(self, client: "RespClient") -> None:
        self.client = client
        self.transport: Optional[asyncio.Transport] = None
        self.parser = RespParser()
        self.pending: Deque["asyncio.Future[Reply]"] = deque()
        self.lost = False
        # Commands of one loop iteration go out in one write (one syscall for many).
        self.out: List[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            replies = self.parser.feed(data)
        except (RespProtocolError, ValueError) as exc:
            self._fail(ConnectionError(f"redis sent bytes that are not RESP: {exc}"))
            if self.transport is not None:
                self.transport.abort()
            return
        pending = self.pending
        for reply in replies:
            if not pending:  # more replies than calls: not the protocol we speak
                self._fail(ConnectionError("redis sent a reply nobody asked for"))
                if self.transport is not None:
                    self.transport.abort()
                return
            future = pending.popleft()
            if not future.done():
                future.set_result(reply)

    def flush(self) -> None:
        out, self.out = self.out, []
        if out and self.transport is not None and not self.lost:
            self.transport.write(b"".join(out))

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._fail(ConnectionError(f"redis connection lost ({exc or 'closed'})"))

    def _fail(self, exc: Exception) -> None:
        self.lost = True
        if self.client._conn is self:
            self.client._conn = None
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(exc)


class _BufferedConnection(ReusedBufferReads, _Connection, asyncio.BufferedProtocol):
    """Reads into pyproxy's one reused buffer (see ReusedBufferReads: on PyPy a fresh
    256 KiB buffer per read was a fifth of an admission's cost)."""


class RespClient:
    """One pipelined connection to one Redis (``redis://[user:password@]host:port/db``,
    ``rediss://`` with TLS, ``unix:///path?db=N``)."""

    def __init__(self, url: str, timeout: float, loop: asyncio.AbstractEventLoop) -> None:
        self.url = url
        self.timeout = timeout
        self.loop = loop
        parts = urlsplit(url)
        self._scheme = parts.scheme
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._path = unquote(parts.path) if parts.scheme == "unix" else ""
        query = parse_qs(parts.query)
        db = query.get("db", [""])[0] if parts.scheme == "unix" else parts.path.lstrip("/")
        self._db = int(db) if db else 0
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        self._conn: Optional[_Connection] = None
        self._protocol = _Connection if is_uvloop(loop) else _BufferedConnection
        self._connecting: Optional["asyncio.Future[_Connection]"] = None

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None:
            return conn
        if self._connecting is None:
            self._connecting = self.loop.create_future()
            task = self.loop.create_task(self._connect())
            task.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, task: "asyncio.Task[_Connection]") -> None:
        waiting, self._connecting = self._connecting, None
        assert waiting is not None
        if task.cancelled():
            waiting.set_exception(ConnectionError("redis connect cancelled"))
        elif task.exception() is not None:
            waiting.set_exception(task.exception())  # type: ignore[arg-type]
        else:
            self._conn = task.result()
            waiting.set_result(self._conn)
        if not waiting.cancelled():
            waiting.exception()  # retrieved: nobody may be waiting any more

    async def _connect(self) -> _Connection:
        loop = self.loop
        if self._scheme == "unix":
            coro = loop.create_unix_connection(lambda: self._protocol(self), self._path)
        else:
            context = ssl.create_default_context() if self._scheme == "rediss" else None
            coro = loop.create_connection(lambda: self._protocol(self), self._host, self._port, ssl=context)
        transport, conn = await asyncio.wait_for(coro, self.timeout)
        try:
            if self._password is not None:
                auth = ("AUTH", self._username, self._password) if self._username else ("AUTH", self._password)
                await self._checked(conn, auth)
            if self._db:
                await self._checked(conn, ("SELECT", self._db))
        except BaseException:
            transport.abort()
            raise
        return conn

    async def _checked(self, conn: _Connection, args: Sequence[Any]) -> None:
        reply = await asyncio.wait_for(self._send(conn, args), self.timeout)
        if isinstance(reply, RespError):
            raise ConnectionError(f"redis refused {args[0]}: {reply}")

    def _send(self, conn: _Connection, args: Sequence[Any], wire: Optional[bytes] = None) -> "asyncio.Future[Reply]":
        future: "asyncio.Future[Reply]" = self.loop.create_future()
        if conn.lost or conn.transport is None:
            future.set_exception(ConnectionError("redis connection lost"))
            return future
        if len(conn.pending) >= MAX_PENDING:
            future.set_exception(ConnectionError(f"{MAX_PENDING} redis calls already in flight"))
            return future
        conn.pending.append(future)
        if not conn.out:
            self.loop.call_soon(conn.flush)
        conn.out.append(wire if wire is not None else encode_command(args))
        return future

    def _send_timed(
        self, conn: _Connection, args: Sequence[Any], wire: Optional[bytes] = None
    ) -> "asyncio.Future[Reply]":
        future = self._send(conn, args, wire)
        if not future.done():
            timer = self.loop.call_later(self.timeout, _expire, future)
            future.add_done_callback(lambda _: timer.cancel())
        return future

    async def call(self, *args: Any) -> Reply:
        """One command, its reply (an error reply is returned, not raised). Raises
        ConnectionError or asyncio.TimeoutError when Redis cannot answer in time."""
        conn = self._conn
        if conn is None:
            conn = await asyncio.wait_for(self._connection(), self.timeout)
        return await self._send_timed(conn, args)

    def submit(self, script: Script, command: Command) -> "asyncio.Future[Reply]":
        """A script call without a coroutine (no task per call on the hot path): a
        future of its reply; its error reply, a timeout or a lost connection as its
        exception. NOSCRIPT (a restarted Redis forgets scripts) is answered by EVAL."""
        conn = self._conn
        if conn is None:  # not connected yet: the coroutine, once
            return self.loop.create_task(self._submit_connecting(script, command))
        result: "asyncio.Future[Reply]" = self.loop.create_future()
        first = self._send_timed(conn, (), command.wire(b"EVALSHA", script.sha))

        def evalsha_done(done: "asyncio.Future[Reply]") -> None:
            reply = None if done.cancelled() or done.exception() is not None else done.result()
            conn = self._conn
            if isinstance(reply, RespError) and str(reply).startswith("NOSCRIPT") and conn is not None:
                again = self._send_timed(conn, (), command.wire(b"EVAL", script.source))  # EVAL loads it
                again.add_done_callback(lambda answered: _copy(answered, result))
            else:
                _copy(done, result)

        first.add_done_callback(evalsha_done)
        return result

    async def _submit_connecting(self, script: Script, command: Command) -> Reply:
        await asyncio.wait_for(self._connection(), self.timeout)
        reply = await self.submit(script, command)
        return reply

    def close(self) -> None:
        conn = self._conn
        self._conn = None
        if conn is not None and conn.transport is not None:
            conn.transport.close()


def _copy(source: "asyncio.Future[Reply]", target: "asyncio.Future[Reply]") -> None:
    """A script call's outcome onto the caller's future: an error reply as its exception."""
    failure = ConnectionError("redis call cancelled") if source.cancelled() else source.exception()
    if target.done():
        return
    if failure is not None:
        target.set_exception(failure)
        return
    reply = source.result()
    if isinstance(reply, RespError):
        target.set_exception(reply)
    else:
        target.set_result(reply)


def _expire(future: "asyncio.Future[Reply]") -> None:
    if not future.done():
        future.set_exception(asyncio.TimeoutError())
