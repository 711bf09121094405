"""Batching embedding requests: the I/O around the decisions of ``batching``.

A request a ``[[batching]]`` rule covers reaches the batcher instead of an
upstream. It waits in its key's window (or goes at once), and when its batch
goes, one upstream request carries every member's inputs through the gateway's
attempt loop -- deployment choice, failover and retries as for any request --
to a ``BatchCall``: a response sink that keeps the whole answer and then
answers each member's own sink (a client, or a coalesced fetch the cache
records) with its share, as if it had been sent alone.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from time import perf_counter
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from pyproxy.errors import ProxyError, UpstreamDisconnected, UpstreamError
from pyproxy.gateway.batching import (
    SCOPING_HEADERS,
    SHARED_CLIENT_ERRORS,
    BatchRule,
    BatchWindow,
    MemberInput,
    Unsplittable,
    batch_body,
    batch_key,
    member_input,
    split_response,
    too_large,
)
from pyproxy.metrics import Histogram
from pyproxy.rules import request_path
from pyproxy.server.body import RequestBody

if TYPE_CHECKING:  # pragma: no cover
    from pyproxy.gateway.relay import Gateway, RoutedRequest
    from pyproxy.handler import Handler

log = logging.getLogger("pyproxy.batching")

Header = Tuple[bytes, bytes]
# What a batch's answer may take in memory: past it, every member gets a 502
# (256 inputs of 3,072 dimensions are 4 MiB as base64).
MAX_ANSWER_BYTES = 64 * 1024 * 1024
# Request fields that are one member's and not the batch's: dropped from the
# upstream request of a batch (pyproxy sends it, for everyone in it).
_MEMBER_ONLY = frozenset(
    {b"x-request-id", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"x-real-ip"}
    | {b"content-type", b"accept-encoding", b"traceparent", b"tracestate"}
)
# A batch's answer is split, so it must come unencoded (RFC 9110 §12.5.3).
_BATCH_FIELDS = [(b"content-type", b"application/json"), (b"accept-encoding", b"identity")]
_CREDENTIALS = (b"authorization", b"x-api-key", b"api-key")
MEMO_SIZE = 4096
# Inputs per upstream request, and seconds a request waited for its batch to go.
INPUT_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0)
WAIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class BatchStats:
    __slots__ = ("batches", "inputs", "fallbacks", "inputs_per_batch", "wait")

    def __init__(self) -> None:
        self.batches = 0  # upstream requests the batcher sent
        self.inputs = 0  # inputs they carried
        self.fallbacks: Dict[str, int] = {}  # requests sent alone instead, by reason
        self.inputs_per_batch = Histogram(INPUT_BUCKETS)
        self.wait = Histogram(WAIT_BUCKETS)

    def fallback(self, reason: str) -> None:
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1

    def snapshot(self) -> Dict[str, Any]:
        return {
            "batches": self.batches,
            "inputs": self.inputs,
            "fallbacks": dict(self.fallbacks),
            "inputs_per_batch": self.inputs_per_batch.snapshot(),
            "wait": self.wait.snapshot(),
        }


class Member:
    """One request in a batch. While it waits and while its batch is upstream, it is
    its sink's ``exchange``: a caller that leaves is told here, and loses its place."""

    __slots__ = ("batcher", "handler", "sink", "request", "body", "input", "key", "arrived", "gone")

    def __init__(
        self,
        batcher: "Batcher",
        handler: "Handler",
        sink: Any,
        request: "RoutedRequest",
        body: RequestBody,
        member: MemberInput,
        key: Optional[Tuple[Any, ...]],
    ) -> None:
        self.batcher = batcher
        self.handler = handler
        self.sink = sink
        self.request = request
        self.body = body
        self.input = member
        self.key = key
        self.arrived = perf_counter()
        self.gone = False

    # The response source interface (what a client connection tells its exchange).
    def client_gone(self) -> None:
        if not self.gone:
            self.gone = True
            self.batcher.left(self)

    def client_paused(self) -> None:
        pass  # nothing streams: the answer is written whole

    def client_resumed(self) -> None:
        pass


class BatchCall:
    """The sink of one upstream request made for a batch: keeps the whole answer, then
    hands it to the batcher to split. ``solo``: one member's own request, sent as it
    came (its answer is relayed as it is)."""

    __slots__ = (
        "batcher",
        "key",
        "members",
        "solo",
        "inputs",
        "loop",
        "exchange",
        "task",
        "_write_paused",
        "upstream_ttfb",
        "upstream",
        "attempts",
        "status",
        "reason",
        "headers",
        "chunks",
        "size",
        "done",
    )

    def __init__(self, batcher: "Batcher", key: Optional[Tuple[Any, ...]], members: List[Member], solo: bool) -> None:
        self.batcher = batcher
        self.key = key  # None: not one of its window's batches (sent alone as a fallback)
        self.members = members
        self.solo = solo
        self.inputs = sum(len(m.input.inputs) for m in members)
        self.loop = batcher.loop
        self.exchange: Any = None
        self.task: Optional["asyncio.Task[None]"] = None
        self._write_paused = False
        self.upstream_ttfb = -1.0
        self.upstream = ""
        self.attempts = 0
        self.status = 0
        self.reason = b""
        self.headers: List[Header] = []
        self.chunks: List[bytes] = []
        self.size = 0
        self.done = False

    @property
    def gone(self) -> bool:
        """Never: a batch goes on when its callers leave (each only loses its share), so
        every call ends in an answer or an error, which is what frees its window."""
        return False

    def note_upstream(self, name: str, attempts: int) -> None:
        self.upstream, self.attempts = name, attempts

    def send_interim(self, status: int, reason: bytes, headers: List[Header]) -> None:
        pass  # pyproxy made this request: its 1xx are nobody's (RFC 9110 §15.2)

    def start_response(self, status: int, reason: bytes, headers: List[Header]) -> None:
        self.status, self.reason, self.headers = status, reason, headers

    def send_data(self, data: bytes) -> None:
        self.size += len(data)
        if self.size <= MAX_ANSWER_BYTES:
            self.chunks.append(data)
        else:
            self.chunks = []

    def flush(self) -> None:
        pass

    def finish_response(self) -> None:
        self._end()
        if self.size > MAX_ANSWER_BYTES:
            self.batcher.failed(self, UpstreamError(f"the answer to a batch passed {MAX_ANSWER_BYTES} bytes"))
        else:
            self.batcher.answered(self)

    def abort_truncated(self) -> None:
        self._end()
        self.batcher.failed(self, UpstreamDisconnected("the upstream's answer to a batch was cut off"))

    abort_now = abort_truncated

    def send_error(self, exc: ProxyError) -> None:
        self._end()
        self.batcher.failed(self, exc)

    def _end(self) -> None:
        self.done = True
        self.exchange = None
        self.task = None


class Batcher:
    def __init__(self, gateway: "Gateway", rules: Tuple[BatchRule, ...], loop: asyncio.AbstractEventLoop) -> None:
        self.gateway = gateway
        self.rules = rules
        self.loop = loop
        self.stats = BatchStats()
        self.windows: Dict[Tuple[Any, ...], BatchWindow[Member]] = {}
        self._timers: Dict[Tuple[Any, ...], Tuple[asyncio.TimerHandle, float]] = {}
        # (target, route) -> (the rule, and whether any deployment passes the client's
        # credential through); bounded like the model table's memos.
        self._memo: Dict[Tuple[bytes, Any], Tuple[Optional[BatchRule], bool]] = {}

    def _rule_for(self, request: "RoutedRequest") -> Tuple[Optional[BatchRule], bool]:
        route = request.route
        memo_key = (request.target, route)
        found = self._memo.get(memo_key)
        if found is None:
            rule = None
            model = route.public_model
            if model is not None:
                path = request_path(request.target)
                rule = next((r for r in self.rules if r.matches(path, model)), None)
            heads = self.gateway.heads
            passes = any(heads[d.upstream].credential is None for d in route.deployments)
            if len(self._memo) >= MEMO_SIZE:
                self._memo.clear()
            found = self._memo[memo_key] = (rule, passes)
        return found

    # --- arrivals ---------------------------------------------------------------------

    def submit(self, handler: "Handler", sink: Any, request: "RoutedRequest", body: RequestBody) -> bool:
        """Take a request a rule covers (True); False: not batched, sent as usual."""
        rule, passes_credentials = self._rule_for(request)
        if rule is None or request.method != b"POST":
            return False
        member_in = member_input(request.parsed)
        if member_in is None:
            self.stats.fallback("unbatchable")
            return False
        if too_large(member_in, rule):
            self.stats.fallback("too_large")
            self._send(None, [Member(self, handler, sink, request, body, member_in, None)])
            return True
        scope: Tuple[Any, ...] = (request.route, request.target) + tuple(
            (name, value) for name, value in request.headers if name in SCOPING_HEADERS
        )
        if passes_credentials:
            scope += tuple((name, value) for name, value in request.headers if name in _CREDENTIALS)
        key = batch_key(member_in, scope)
        member = Member(self, handler, sink, request, body, member_in, key)
        sink.exchange = member
        window = self.windows.get(key)
        if window is None:
            window = self.windows[key] = BatchWindow()
        batches = window.arrive(member, len(member_in.inputs), member_in.tokens, rule, self.loop.time())
        self._sync_timer(key, window, rule)
        for batch in batches:
            self._send(key, batch)
        return True

    def left(self, member: Member) -> None:
        """A member's caller is gone: out of its window if it still waits there."""
        key = member.key
        window = self.windows.get(key) if key is not None else None
        if window is not None and window.leave(member, len(member.input.inputs), member.input.tokens):
            self._after(key, window)  # type: ignore[arg-type]

    def _sync_timer(self, key: Tuple[Any, ...], window: BatchWindow[Member], rule: Optional[BatchRule]) -> None:
        """One timer per window with members waiting, from when the first of them came."""
        timer = self._timers.get(key)
        if timer is not None and (not window.pending or timer[1] != window.opened_at):
            timer[0].cancel()
            del self._timers[key]
            timer = None
        if timer is None and window.pending and rule is not None:
            handle = self.loop.call_at(window.opened_at + rule.max_wait_ms / 1000.0, self._expire, key)
            self._timers[key] = (handle, window.opened_at)

    def _expire(self, key: Tuple[Any, ...]) -> None:
        self._timers.pop(key, None)
        window = self.windows.get(key)
        if window is not None:
            for batch in window.expire():
                self._send(key, batch)
            self._after(key, window)

    def _after(self, key: Tuple[Any, ...], window: BatchWindow[Member]) -> None:
        self._sync_timer(key, window, None)
        if window.idle and self.windows.get(key) is window:
            del self.windows[key]

    # --- sending ----------------------------------------------------------------------

    def _send(self, key: Optional[Tuple[Any, ...]], members: List[Member]) -> None:
        """Send one batch (``key``: one of that window's; None: a member alone, outside
        any window). Members that left are dropped; nobody left: nothing is sent."""
        live = [m for m in members if not m.gone]
        if not live:
            return
        solo = len(live) == 1
        call = BatchCall(self, key, live, solo)
        now = perf_counter()
        stats = self.stats
        for member in live:
            member.sink.exchange = member
            stats.wait.observe(now - member.arrived)
        stats.batches += 1
        stats.inputs += call.inputs
        stats.inputs_per_batch.observe(call.inputs)
        if key is not None:
            window = self.windows.get(key)
            if window is not None:
                window.sent()
        first = live[0]
        if solo:
            request, body = first.request, first.body
        else:
            request = self._batch_request(live)
            body = _complete_body(self.loop)
        whole = request.whole
        assert whole is not None
        self.gateway.send(first.handler, call, request, body, [whole])

    def _batch_request(self, members: List[Member]) -> "RoutedRequest":
        from pyproxy.gateway.relay import RoutedRequest

        first = members[0].request
        headers = [(n, v) for n, v in first.headers if n not in _MEMBER_ONLY] + _BATCH_FIELDS
        body = batch_body([m.input for m in members])
        return RoutedRequest(b"POST", first.target, headers, False, None, first.route, body)

    # --- answers ------------------------------------------------------------------------

    def _returned(self, call: BatchCall) -> None:
        key = call.key
        window = self.windows.get(key) if key is not None else None
        if window is None:
            return
        for batch in window.returned():
            self._send(key, batch)
        self._after(key, window)  # type: ignore[arg-type]

    def answered(self, call: BatchCall) -> None:
        """The upstream answered a batch: each member its share, or the same answer."""
        self._returned(call)
        status = call.status
        body = b"".join(call.chunks)
        members = call.members
        if call.solo:
            self._answer(members[0], call, status, call.headers, body)
            return
        if 200 <= status < 300:
            try:
                if any(n == b"content-encoding" and v.lower() != b"identity" for n, v in call.headers):
                    raise Unsplittable("the answer came content-encoded")
                bodies = split_response(body, [m.input for m in members])
            except Unsplittable as exc:
                log.warning("the answer to a batch of %d inputs could not be split: %s", call.inputs, exc)
                self._fail_all(call, UpstreamError(f"the upstream's answer to a batch could not be split: {exc}"))
                return
            for member, own in zip(members, bodies):
                self._answer(member, call, status, call.headers, own)
            return
        if 400 <= status < 500 and status not in SHARED_CLIENT_ERRORS:
            # One bad input must fail only its caller: each goes again, alone.
            for member in members:
                if not member.gone:
                    self.stats.fallback("client_error")
                    self._send(None, [member])
            return
        for member in members:  # a 5xx after failover, a 429 ...: the same for everyone
            self._answer(member, call, status, call.headers, body)

    def failed(self, call: BatchCall, exc: ProxyError) -> None:
        self._returned(call)
        self._fail_all(call, exc)

    def _fail_all(self, call: BatchCall, exc: ProxyError) -> None:
        for member in call.members:
            if not member.gone:
                sink = member.sink
                sink.exchange = None
                sink.send_error(exc)

    def _answer(self, member: Member, call: BatchCall, status: int, headers: List[Header], body: bytes) -> None:
        if member.gone:
            return
        sink = member.sink
        sink.exchange = None
        sink.upstream_ttfb = call.upstream_ttfb
        if call.upstream:
            sink.note_upstream(call.upstream, call.attempts)
        own = [h for h in headers if h[0] != b"content-length"]
        own.append((b"x-pyproxy-batch", b"%d" % call.inputs))
        own.append((b"content-length", b"%d" % len(body)))  # last, by contract
        reason = call.reason or _phrase(status)
        sink.start_response(status, reason, own)
        if body:
            sink.send_data(body)
        sink.finish_response()

    # --- admin and shutdown ---------------------------------------------------------------

    def close(self) -> None:
        for handle, _ in self._timers.values():
            handle.cancel()
        self._timers.clear()


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def _complete_body(loop: asyncio.AbstractEventLoop) -> RequestBody:
    """The body of a request pyproxy makes itself: complete, all of it in ``whole``."""
    body = RequestBody(loop, _nothing, _nothing)
    body.feed_eof()
    return body


def _nothing() -> None:
    pass
