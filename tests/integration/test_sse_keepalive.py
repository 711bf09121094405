"""--sse-keepalive (``: ping`` between events on a silent stream) and early_head_after
(pyproxy's own 200 event-stream head while a slow upstream prefills), on the wire."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import h11

from pyproxy.http.sse import PING
from pyproxy.rules import Rule
from tests.support.client import Client, running_proxy, wait_until
from tests.support.gateway import running_gateway, upstreams_toml
from tests.support.origin import Origin, Received, Reply
from tests.support.redis_server import free_port
from tests.support.sockets import nginx_binary, wait_listening

SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
Step = Union[bytes, asyncio.Event]


def gated_stream(origin: Origin, path: bytes, steps: Sequence[Step]) -> None:
    """An event stream that writes each bytes step and, at each Event step, waits for
    the test to set it: silences as long as the test needs, no sleeping."""

    @origin.route(path)
    async def stream(req: Received, reply: Reply) -> None:
        await reply.head(200, SSE_HEADERS)
        for step in steps:
            if isinstance(step, asyncio.Event):
                await step.wait()
            else:
                await reply.data(step)
        await reply.end()


class StreamReader:
    """Reads one response's body in the background, as it arrives."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.head: Optional[h11.Response] = None
        self.body = b""
        self.complete = False
        self.truncated = False
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        self.head = await self.client.read_head()
        try:
            while True:
                event = await self.client.next_event()
                if isinstance(event, h11.Data):
                    self.body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    self.complete = True
                    return
                else:
                    self.truncated = True
                    return
        except h11.RemoteProtocolError:
            self.truncated = True  # closed mid-body

    @property
    def pings(self) -> int:
        return self.body.count(PING)


async def open_stream(port: int, target: bytes) -> StreamReader:
    client = await Client.connect(port)
    await client.send_request(b"GET", target, [(b"accept", b"text/event-stream")])
    return StreamReader(client)


def assert_pings_between_events(body: bytes) -> None:
    """Every ping follows a blank line (or another ping): never inside an event."""
    at = body.find(PING)
    while at >= 0:
        before = body[:at]
        assert before == b"" or before.endswith(b"\n\n") or before.endswith(PING), body
        at = body.find(PING, at + 1)


async def test_pings_fill_silence_between_events_and_never_split_one() -> None:
    between, inside = asyncio.Event(), asyncio.Event()
    steps: List[Step] = [b"data: a\n\n", between, b"data: b", inside, b"\n\n", b"data: [DONE]\n\n"]
    async with Origin() as origin, running_proxy(origin.url, sse_keepalive=0.2) as proxy:
        gated_stream(origin, b"/gated", steps)
        reader = await open_stream(proxy.port, b"/gated")
        try:
            await wait_until(lambda: reader.pings >= 2, timeout=15)
            between.set()
            await wait_until(lambda: b"data: b" in reader.body, timeout=15)
            pings = reader.pings
            # Mid-event silence of four intervals: a ping here would split the event.
            await asyncio.sleep(0.8)
            assert reader.pings == pings
            inside.set()
            await asyncio.wait_for(reader.task, 15)
        finally:
            between.set()
            inside.set()
            await reader.client.close()
        assert reader.complete
        assert reader.head is not None and reader.head.status_code == 200
        assert b"data: b\n\n" in reader.body
        assert reader.body.replace(PING, b"") == b"".join(s for s in steps if isinstance(s, bytes))
        assert_pings_between_events(reader.body)
        assert proxy.stats_sse_pings == reader.pings


async def test_pings_do_not_reset_the_upstream_read_timeout() -> None:
    never = asyncio.Event()
    async with Origin() as origin, running_proxy(origin.url, sse_keepalive=0.2, read_timeout=1.0) as proxy:
        gated_stream(origin, b"/stalls", [b"data: a\n\n", never])
        reader = await open_stream(proxy.port, b"/stalls")
        try:
            # The upstream is silent after one event: pings go out, yet the read timeout
            # still cuts the stream (a ping is not upstream data).
            await asyncio.wait_for(reader.task, 30)
        finally:
            never.set()
            await reader.client.close()
        assert reader.truncated and not reader.complete
        assert reader.pings >= 1
        assert reader.body.startswith(b"data: a\n\n")


async def test_keepalive_off_and_non_stream_responses_get_no_pings() -> None:
    gate = asyncio.Event()
    async with Origin() as origin, running_proxy(origin.url, sse_keepalive=None) as proxy:
        gated_stream(origin, b"/quiet", [b"data: a\n\n", gate, b"data: b\n\n"])

        @origin.route(b"/slow-text")
        async def slow_text(req: Received, reply: Reply) -> None:
            await reply.head(200, [(b"content-type", b"text/plain")])
            await reply.data(b"line 1\n\n")
            await gate.wait()
            await reply.data(b"line 2\n")
            await reply.end()

        readers = [await open_stream(proxy.port, b"/quiet"), await open_stream(proxy.port, b"/slow-text")]
        try:
            await wait_until(lambda: all(r.body for r in readers), timeout=15)
            await asyncio.sleep(0.6)  # the silence a ping would fill (were it on)
            gate.set()
            await asyncio.gather(*(asyncio.wait_for(r.task, 15) for r in readers))
        finally:
            gate.set()
            for r in readers:
                await r.client.close()
        assert readers[0].body == b"data: a\n\ndata: b\n\n"
        assert readers[1].body == b"line 1\n\nline 2\n"
        assert proxy.stats_sse_pings == 0
    # On, a text/plain stream still gets none: only text/event-stream is an event stream.
    gate = asyncio.Event()
    async with Origin() as origin, running_proxy(origin.url, sse_keepalive=0.2) as proxy:

        @origin.route(b"/slow-text")
        async def slow_text_again(req: Received, reply: Reply) -> None:
            await reply.head(200, [(b"content-type", b"text/plain")])
            await reply.data(b"line 1\n\n")
            await gate.wait()
            await reply.end()

        reader = await open_stream(proxy.port, b"/slow-text")
        try:
            await wait_until(lambda: reader.body, timeout=15)
            await asyncio.sleep(0.6)
            gate.set()
            await asyncio.wait_for(reader.task, 15)
        finally:
            gate.set()
            await reader.client.close()
        assert reader.body == b"line 1\n\n"


async def test_pings_are_neither_stored_nor_replayed_to_a_joiner() -> None:
    """A recorded stream (cache, stream = true) coalesces a joiner mid-stream: the leader's
    pings are its own; the joiner's replay and the stored entry carry upstream bytes only."""
    gate = asyncio.Event()
    steps: List[Step] = [b"data: 1\n\n", gate, b"data: 2\n\n"]
    rules = (Rule(methods=frozenset({b"GET"}), path=b"/ticks", prefix=False, name="/ticks", ttl=60.0, stream=True),)
    async with Origin() as origin, running_proxy(origin.url, sse_keepalive=0.2, cache_rules=rules) as proxy:
        gated_stream(origin, b"/ticks", steps)
        leader = await open_stream(proxy.port, b"/ticks")
        joiner: Optional[StreamReader] = None
        try:
            await wait_until(lambda: leader.pings >= 5, timeout=20)
            joiner = await open_stream(proxy.port, b"/ticks")
            await wait_until(lambda: joiner is not None and joiner.body.startswith(b"data: 1\n\n"), timeout=15)
            gate.set()
            await asyncio.gather(asyncio.wait_for(leader.task, 15), asyncio.wait_for(joiner.task, 15))
        finally:
            gate.set()
            await leader.client.close()
            if joiner is not None:
                await joiner.client.close()
        assert joiner is not None
        upstream_bytes = b"data: 1\n\ndata: 2\n\n"
        for reader in (leader, joiner):
            assert reader.complete and reader.body.replace(PING, b"") == upstream_bytes
            assert_pings_between_events(reader.body)
        # Had the leader's five pings been recorded, the joiner's replay would hold them.
        assert joiner.pings < leader.pings
        assert sum(1 for r in origin.requests if r.target == b"/ticks") == 1
        hit = await open_stream(proxy.port, b"/ticks")
        try:
            await asyncio.wait_for(hit.task, 15)
        finally:
            await hit.client.close()
        assert hit.head is not None and dict(hit.head.headers).get(b"x-cache") == b"HIT"
        assert hit.body == upstream_bytes


# --- early_head_after ---------------------------------------------------------------------------

CHAT = "/v1/chat/completions"


def chat_chunks(words: Sequence[str]) -> List[bytes]:
    out = []
    for i, word in enumerate(words):
        chunk = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "slow-model",
            "choices": [
                {"index": 0, "delta": {"content": word}, "finish_reason": None if i < len(words) - 1 else "stop"}
            ],
        }
        out.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


def slow_chat(origin: Origin, head_gate: Any, status: int = 200, body: Optional[bytes] = None) -> List[bytes]:
    """/v1/chat/completions that answers once ``head_gate()`` returns (awaited): a
    prefill as long as the test says. Non-200: ``body`` as JSON."""
    chunks = chat_chunks(["hello", " ", "world"])

    @origin.route(CHAT.encode())
    async def chat(req: Received, reply: Reply) -> None:
        await head_gate()
        if status != 200:
            await reply.full(status, body or b"", [(b"content-type", b"application/json")])
            return
        await reply.head(200, SSE_HEADERS)
        for chunk in chunks:
            await reply.data(chunk)
        await reply.end()

    return chunks


def early_toml(origin: Origin, after: Optional[float], **model: Any) -> str:
    extra = f"early_head_after = {after}\n" if after is not None else ""
    for key, value in model.items():
        extra += f"{key} = {json.dumps(value)}\n"
    return upstreams_toml(slow=origin) + (
        f'[[models]]\nname = "slow-model"\ndeployments = [{{ upstream = "slow" }}]\n{extra}'
    )


async def post_chat(port: int, stream: bool = True, model: str = "slow-model") -> StreamReader:
    client = await Client.connect(port)
    body = json.dumps({"model": model, "stream": stream, "messages": [{"role": "user", "content": "x"}]})
    await client.send_request(b"POST", CHAT.encode(), [(b"content-type", b"application/json")], body.encode())
    return StreamReader(client)


async def test_early_head_then_pings_then_the_upstream_stream() -> None:
    answer = asyncio.Event()
    async with Origin() as origin:
        chunks = slow_chat(origin, answer.wait)
        async with running_gateway(early_toml(origin, 0.2), sse_keepalive=0.2) as proxy:
            reader = await post_chat(proxy.port)
            try:
                await wait_until(lambda: reader.pings >= 2, timeout=15)
                assert reader.head is not None and reader.head.status_code == 200
                headers = dict(reader.head.headers)
                assert headers[b"content-type"].startswith(b"text/event-stream")
                assert headers[b"x-pyproxy-early-head"] == b"1"
                answer.set()
                await asyncio.wait_for(reader.task, 15)
            finally:
                answer.set()
                await reader.client.close()
            assert reader.complete
            assert reader.body.replace(PING, b"") == b"".join(chunks)
            assert_pings_between_events(reader.body)
            assert proxy.gateway is not None and proxy.gateway.early_heads == 1


async def test_an_upstream_that_answers_in_time_is_relayed_as_it_is() -> None:
    async def at_once() -> None:
        return None

    async with Origin() as origin:
        chunks = slow_chat(origin, at_once)
        async with running_gateway(early_toml(origin, 5.0)) as proxy:
            reader = await post_chat(proxy.port)
            try:
                await asyncio.wait_for(reader.task, 15)
            finally:
                await reader.client.close()
            assert reader.complete and reader.body == b"".join(chunks)
            assert reader.head is not None and b"x-pyproxy-early-head" not in dict(reader.head.headers)
            assert dict(reader.head.headers)[b"x-pyproxy-upstream"] == b"slow"
            assert proxy.gateway is not None and proxy.gateway.early_heads == 0


async def test_an_upstream_error_after_the_early_head_is_one_error_event() -> None:
    answer = asyncio.Event()
    error = {"error": {"message": "context too long", "type": "invalid_request_error", "param": None, "code": None}}
    async with Origin() as origin:
        slow_chat(origin, answer.wait, status=400, body=json.dumps(error).encode())
        async with running_gateway(early_toml(origin, 0.2), sse_keepalive=0.2) as proxy:
            reader = await post_chat(proxy.port)
            try:
                await wait_until(lambda: reader.head is not None, timeout=15)
                answer.set()
                await asyncio.wait_for(reader.task, 15)
            finally:
                answer.set()
                await reader.client.close()
            assert reader.head is not None and reader.head.status_code == 200
            assert reader.complete  # the stream ends properly, after the one event
            (event,) = [e for e in reader.body.replace(PING, b"").split(b"\n\n") if e]
            assert event.startswith(b"data: ")
            assert json.loads(event[len(b"data: ") :]) == error  # the upstream's own error object


async def test_a_failed_upstream_after_the_early_head_fails_over_then_reports() -> None:
    """Pings are not upstream bytes: a retryable failure before the upstream's head
    still goes to the next deployment; when none is left, one error event."""
    answer = asyncio.Event()
    async with Origin() as bad, Origin() as good:
        slow_chat(bad, answer.wait, status=503, body=b'{"error": {"message": "overloaded"}}')
        chunks = slow_chat(good, answer.wait)
        toml = upstreams_toml(bad=bad, good=good) + (
            '[[models]]\nname = "slow-model"\nearly_head_after = 0.2\n'
            'deployments = [{ upstream = "bad" }, { upstream = "good", priority = 1 }]\n'
        )
        async with running_gateway(toml, sse_keepalive=0.2) as proxy:
            reader = await post_chat(proxy.port)
            try:
                await wait_until(lambda: reader.pings >= 1, timeout=15)
                answer.set()
                await asyncio.wait_for(reader.task, 15)
            finally:
                answer.set()
                await reader.client.close()
            assert reader.complete and reader.body.replace(PING, b"") == b"".join(chunks)
            assert len(bad.requests) == 1 and len(good.requests) == 1
    # Only a failing one: the client learns it in the stream.
    answer = asyncio.Event()
    async with Origin() as bad:
        slow_chat(bad, answer.wait, status=503, body=b'{"error": {"message": "overloaded"}}')
        toml = upstreams_toml(bad=bad) + (
            '[[models]]\nname = "slow-model"\nearly_head_after = 0.2\ndeployments = [{ upstream = "bad" }]\n'
        )
        async with running_gateway(toml, sse_keepalive=0.2) as proxy:
            reader = await post_chat(proxy.port)
            try:
                await wait_until(lambda: reader.head is not None, timeout=15)
                answer.set()
                await asyncio.wait_for(reader.task, 15)
            finally:
                answer.set()
                await reader.client.close()
            assert reader.complete and reader.head is not None and reader.head.status_code == 200
            (event,) = [e for e in reader.body.replace(PING, b"").split(b"\n\n") if e]
            assert event.startswith(b"data: ")
            assert json.loads(event[len(b"data: ") :]) == {"error": {"message": "overloaded"}}


async def test_no_early_head_without_stream_true() -> None:
    answer = asyncio.Event()
    async with Origin() as origin:

        @origin.route(CHAT.encode())
        async def chat(req: Received, reply: Reply) -> None:
            await answer.wait()
            await reply.full(200, b'{"ok": true}')

        async with running_gateway(early_toml(origin, 0.1), sse_keepalive=0.1) as proxy:
            reader = await post_chat(proxy.port, stream=False)
            try:
                await wait_until(lambda: len(origin.requests) == 1, timeout=15)
                await asyncio.sleep(0.5)  # five times early_head_after: no head may come
                assert reader.head is None
                answer.set()
                await asyncio.wait_for(reader.task, 15)
            finally:
                answer.set()
                await reader.client.close()
            assert reader.head is not None and reader.head.status_code == 200 and reader.body == b'{"ok": true}'
            assert proxy.gateway is not None and proxy.gateway.early_heads == 0


# --- behind nginx with a 2 s read timeout: the reason early_head_after exists ----------------


def nginx_in_front(workdir: Path, listen: int, backend: int) -> subprocess.Popen:
    """nginx as an operator puts it in front of an SSE API: buffering off, keep-alive
    upstream, and a proxy_read_timeout (2 s here, 30-60 s in the field)."""
    temp = workdir / "temp"
    temp.mkdir(exist_ok=True)
    temp.chmod(0o777)
    paths = "".join(f"  {k}_temp_path {temp}/{k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = f"""daemon off;
master_process off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 64; }}
http {{
{paths}  access_log off;
  upstream pyproxy {{ server 127.0.0.1:{backend}; keepalive 8; }}
  server {{
    listen 127.0.0.1:{listen};
    location / {{
      proxy_pass http://pyproxy;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 2s;
    }}
  }}
}}
"""
    path = workdir / "nginx.conf"
    path.write_text(conf)
    return subprocess.Popen([nginx_binary(), "-c", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def test_behind_nginx_a_5s_prefill_survives_only_with_an_early_head(tmp_path: Path) -> None:
    """Two streams at once through nginx (proxy_read_timeout 2s) to an upstream that takes
    5 s before its head: one on a model with early_head_after, one on a model without."""

    async def prefill() -> None:
        await asyncio.sleep(5.0)  # the upstream's time before its head: the scenario itself

    async with Origin() as origin:
        chunks = slow_chat(origin, prefill)
        toml = early_toml(origin, 0.5) + '[[models]]\nname = "plain-model"\ndeployments = [{ upstream = "slow" }]\n'
        async with running_gateway(toml, sse_keepalive=0.5) as proxy:
            lb_port = free_port()
            nginx = nginx_in_front(tmp_path, lb_port, proxy.port)
            try:
                await wait_listening(lb_port)
                early = await post_chat(lb_port)
                plain = await post_chat(lb_port, model="plain-model")
                try:
                    await asyncio.wait_for(asyncio.gather(early.task, plain.task), 30)
                finally:
                    await early.client.close()
                    await plain.client.close()
            finally:
                nginx.send_signal(signal.SIGQUIT)
                try:
                    nginx.wait(15)
                except subprocess.TimeoutExpired:
                    nginx.kill()
                    nginx.wait()
        assert early.head is not None and early.head.status_code == 200 and early.complete
        assert early.body.replace(PING, b"") == b"".join(chunks)
        assert early.pings >= 1
        assert plain.head is not None and plain.head.status_code == 504  # nginx gave up on the silence


async def test_a_route_can_give_the_early_head_too() -> None:
    """[[routes]] without [[models]]: the body that came with the head says "stream"."""
    answer = asyncio.Event()
    async with Origin() as origin:
        chunks = slow_chat(origin, answer.wait)
        toml = (
            upstreams_toml(slow=origin) + '[[routes]]\npath = "/v1/chat/*"\nupstream = "slow"\nearly_head_after = 0.2\n'
        )
        async with running_gateway(toml, sse_keepalive=0.2) as proxy:
            reader = await post_chat(proxy.port)
            try:
                await wait_until(lambda: reader.head is not None, timeout=15)
                assert dict(reader.head.headers)[b"x-pyproxy-early-head"] == b"1"  # type: ignore[union-attr]
                answer.set()
                await asyncio.wait_for(reader.task, 15)
            finally:
                answer.set()
                await reader.client.close()
            assert reader.complete and reader.body.replace(PING, b"") == b"".join(chunks)
