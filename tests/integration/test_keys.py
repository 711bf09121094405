"""Client keys through real sockets: 401/403/429, exact limits under concurrency (a
fake clock), token reserve and reconcile, in-flight slots under an abort storm,
reloading the keys file, usage from both API shapes, tenant-scoped caching, and no
key material anywhere it could leak."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import tempfile
import time
from typing import Any, Dict, List, Optional

import pytest

from pyproxy.admin import AdminServer
from pyproxy.proxy import ProxyAdmin
from tests.support.client import Client, request, wait_until
from tests.support.gateway import running_gateway
from tests.support.origin import Origin, Received, Reply

CHAT = b"/v1/chat/completions"
JSON = [(b"content-type", b"application/json")]
UPSTREAM_KEY = "upstream-secret-0123456789"
KEYS = {
    name: f"pp-test-{name}-" + hashlib.sha256(name.encode()).hexdigest()[:32]
    for name in ("alice", "bob", "carol", "dave", "eve")
}


def bearer(name: str) -> List:
    return [(b"authorization", b"Bearer " + KEYS[name].encode())]


def keys_toml(**entries: str) -> str:
    """[[keys]] for name="extra TOML lines"."""
    out = []
    for name, extra in entries.items():
        digest = hashlib.sha256(KEYS[name].encode()).hexdigest()
        out.append(f'[[keys]]\nname = "{name}"\nhash = "sha256:{digest}"\n{extra}\n')
    return "\n".join(out)


class Fixture:
    def __init__(self, origin: Origin, keys: str, extra: str = "") -> None:
        self.dir = tempfile.mkdtemp(prefix="pyproxy-keys-")
        self.keys_file = os.path.join(self.dir, "keys.toml")
        self.write_keys(keys)
        self.toml = (
            f'[[upstreams]]\nname = "up"\nurl = "{origin.url}"\napi_key = "{UPSTREAM_KEY}"\n'
            '[[models]]\nname = "m"\ndeployments = [{ upstream = "up" }]\n'
            '[[models]]\nname = "gpt-*"\ndeployments = [{ upstream = "up" }]\n'
            f'{extra}\n[auth]\nmode = "keys"\nkeys_file = "{self.keys_file}"\n'
        )

    def write_keys(self, text: str) -> None:
        tmp = self.keys_file + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, self.keys_file)  # a new inode: seen even within one mtime tick


def usage_origin(origin: Origin, prompt: int = 11, completion: int = 7, delay: float = 0.0) -> None:
    """Chat answers reporting usage: JSON, or OpenAI's stream with a usage chunk."""

    @origin.route(CHAT)
    async def chat(req: Received, reply: Reply) -> None:
        body = json.loads(req.body)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if delay:
            await asyncio.sleep(delay)
        if not body.get("stream"):
            await reply.full(200, json.dumps({"id": "c", "choices": [], "usage": usage}).encode(), JSON)
            return
        await reply.head(200, [(b"content-type", b"text/event-stream")])
        await reply.data(b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n')
        await reply.data(b'data: {"choices":[],"usage":' + json.dumps(usage).encode() + b"}\n\n")
        await reply.data(b"data: [DONE]\n\n")
        await reply.end()


async def chat(port: int, who: Optional[str], body: bytes = b'{"model": "m"}', headers: Any = ()):
    return await request(port, b"POST", CHAT, JSON + (bearer(who) if who else []) + list(headers), body)


def read_text(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except FileNotFoundError:
        return ""


def error_of(resp: Any) -> Dict[str, Any]:
    return json.loads(resp.body)["error"]


async def test_401_and_403_in_openai_shape_the_connection_kept_and_the_key_never_sent_upstream() -> None:
    async with Origin() as origin:
        usage_origin(origin)
        fx = Fixture(
            origin,
            keys_toml(
                alice="",
                bob='models = ["gpt-*"]',
                carol="disabled = true",
                dave='expires = "2001-01-01T00:00:00Z"',
            ),
        )
        async with running_gateway(fx.toml) as proxy:
            async with await Client.connect(proxy.port) as client:
                cases = [
                    ([], 401, "missing_api_key"),
                    ([(b"authorization", b"Bearer pp-nope")], 401, "invalid_api_key"),
                    ([(b"authorization", b"Basic " + KEYS["alice"].encode())], 401, "missing_api_key"),
                    (bearer("carol"), 401, "invalid_api_key"),
                    (bearer("dave"), 401, "invalid_api_key"),
                    (bearer("bob"), 403, "model_not_allowed"),
                ]
                for headers, status, code in cases:
                    resp = await client.request(b"POST", CHAT, JSON + headers, b'{"model": "m"}')
                    assert resp.status == status, (headers, resp.body)
                    err = error_of(resp)
                    assert err["code"] == code and err["message"]
                    assert resp.header(b"x-should-retry") == b"false"
                    assert resp.header(b"x-request-id")  # an id the client can quote
                    assert KEYS["carol"] not in resp.body.decode() and "pp-nope" not in resp.body.decode()
                # The same connection, still open: 401/403 keep it (they are not malformed input).
                resp = await client.request(
                    b"POST", CHAT, JSON + [(b"x-api-key", KEYS["alice"].encode())], b'{"model": "m"}'
                )
                assert resp.status == 200
                resp = await client.request(
                    b"POST", CHAT, JSON + [(b"api-key", KEYS["bob"].encode())], b'{"model": "gpt-4o"}'
                )
                assert resp.status == 200
            assert len(origin.requests) == 2
            for received in origin.requests:
                assert received.header(b"authorization") == b"Bearer " + UPSTREAM_KEY.encode()
                assert received.header(b"x-api-key") is None and received.header(b"api-key") is None
                assert all(
                    KEYS["alice"].encode() not in v and KEYS["bob"].encode() not in v for _, v in received.headers
                )
            # /v1/models is answered by pyproxy, but only to a key.
            assert (await request(proxy.port, b"GET", b"/v1/models")).status == 401
            assert (await request(proxy.port, b"GET", b"/v1/models", bearer("alice"))).status == 200


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_rpm_60_with_100_concurrent_requests_admits_exactly_60() -> None:
    async with Origin() as origin:
        usage_origin(origin)
        fx = Fixture(origin, keys_toml(alice="rpm = 60"))
        async with running_gateway(fx.toml) as proxy:
            clock = proxy.gateway.admission.clock = FakeClock()  # type: ignore[union-attr]
            responses = await asyncio.gather(*(chat(proxy.port, "alice") for _ in range(100)))
            ok = [r for r in responses if r.status == 200]
            limited = [r for r in responses if r.status == 429]
            assert len(ok) == 60 and len(limited) == 40
            assert len(origin.requests) == 60
            assert len({r.header(b"x-request-id") for r in responses}) == 100  # 429s too, each its own
            own = await chat(proxy.port, "alice", headers=[(b"x-request-id", b"client-id-1")])
            assert own.status == 429 and own.header(b"x-request-id") == b"client-id-1"
            for resp in limited:
                err = error_of(resp)
                assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests"
                assert resp.header(b"retry-after") == b"1"  # one request a second comes back
                assert resp.header(b"x-ratelimit-limit-requests") == b"60"
                assert resp.header(b"x-ratelimit-remaining-requests") == b"0"
            remaining = sorted(int(r.header(b"x-ratelimit-remaining-requests")) for r in ok)
            assert remaining == list(range(60))  # each success says how many are left
            # Refill at the right rate: one a second, exactly.
            clock.now += 0.99
            assert (await chat(proxy.port, "alice")).status == 429
            clock.now += 0.01
            assert (await chat(proxy.port, "alice")).status == 200
            assert (await chat(proxy.port, "alice")).status == 429
            clock.now += 10.0
            results = await asyncio.gather(*(chat(proxy.port, "alice") for _ in range(20)))
            assert sum(r.status == 200 for r in results) == 10
            snap = proxy.gateway.admission.snapshot()  # type: ignore[union-attr]
            assert (
                dict((tuple(k), v) for k, v in snap["rate_limited"])[("alice", "requests", "proxy")] == 40 + 1 + 2 + 10
            )


async def test_tpm_reserves_at_admission_and_settles_with_the_real_usage() -> None:
    async with Origin() as origin:
        usage_origin(origin, prompt=30, completion=70)  # 100 tokens really used
        fx = Fixture(origin, keys_toml(alice="tpm = 1000"))
        async with running_gateway(fx.toml) as proxy:
            proxy.gateway.admission.clock = FakeClock()  # type: ignore[union-attr]
            body = json.dumps({"model": "m", "max_tokens": 600, "messages": []}).encode()
            first = await chat(proxy.port, "alice", body)
            reserved = 600 + len(body) // 4
            assert first.status == 200
            # The head went out before the usage was known: the reservation shows.
            assert int(first.header(b"x-ratelimit-remaining-tokens")) == 1000 - reserved
            assert first.header(b"x-ratelimit-limit-tokens") == b"1000"
            second = await chat(proxy.port, "alice", body)  # fits only because 600 came back
            assert second.status == 200
            assert int(second.header(b"x-ratelimit-remaining-tokens")) == 1000 - 100 - reserved
            # A stream whose usage is far more than reserved is charged: over the limit.
            origin_usage = json.dumps({"model": "m", "stream": True, "max_tokens": 1}).encode()
            usage_origin(origin, prompt=500, completion=2000)
            assert (await chat(proxy.port, "alice", origin_usage)).status == 200
            refused = await chat(proxy.port, "alice", b'{"model": "m"}')
            assert refused.status == 429 and error_of(refused)["type"] == "tokens"
            assert int(refused.header(b"retry-after")) >= 60  # 2,700 tokens ahead at 1,000/min
            usage = proxy.gateway.admission.snapshot()["per_key"]["alice"]  # type: ignore[union-attr]
            assert usage == {"requests": 3, "input_tokens": 560, "output_tokens": 2140, "estimated": 0}


async def test_a_response_without_usage_keeps_its_estimate() -> None:
    async with Origin() as origin:

        @origin.route(CHAT)
        async def chat_route(req: Received, reply: Reply) -> None:
            await reply.full(200, b'{"choices": []}', JSON)

        fx = Fixture(origin, keys_toml(alice="tpm = 1000"))
        async with running_gateway(fx.toml) as proxy:
            proxy.gateway.admission.clock = FakeClock()  # type: ignore[union-attr]
            body = b'{"model": "m", "max_tokens": 400}'
            assert (await chat(proxy.port, "alice", body)).status == 200
            resp = await chat(proxy.port, "alice", body)
            assert int(resp.header(b"x-ratelimit-remaining-tokens")) == 1000 - 2 * (400 + len(body) // 4)
            snap = proxy.gateway.admission.snapshot()  # type: ignore[union-attr]
            assert snap["unknown"] == 2 and snap["per_key"]["alice"]["estimated"] == 2


def streaming_origin(origin: Origin) -> None:
    """Long streams: an event every few milliseconds, for a second or so."""

    @origin.route(CHAT)
    async def chat_route(req: Received, reply: Reply) -> None:
        await asyncio.sleep(random.random() * 0.02)  # some abort before the head
        await reply.head(200, [(b"content-type", b"text/event-stream")])
        for _ in range(200):
            await reply.data(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n')
            await asyncio.sleep(0.005)
        await reply.data(
            b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":200}}\n\ndata: [DONE]\n\n'
        )
        await reply.end()


async def test_in_flight_slots_return_to_exactly_zero_after_1000_aborted_streams() -> None:
    rng = random.Random(7)
    async with Origin() as origin:
        streaming_origin(origin)
        fx = Fixture(
            origin,
            keys_toml(alice='tenant = "acme"\nmax_parallel = 40', bob='tenant = "acme"\nmax_parallel = 40')
            + '\n[[tenants]]\nname = "acme"\nmax_parallel = 60\n',
        )
        async with running_gateway(fx.toml, dedup_enabled=False) as proxy:
            admission = proxy.gateway.admission  # type: ignore[union-attr]
            statuses: Dict[int, int] = {}
            body = b'{"model": "m", "stream": true}'

            async def one(i: int) -> None:
                who = "alice" if i % 2 else "bob"
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                try:
                    head = (
                        b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
                        b"authorization: Bearer " + KEYS[who].encode() + b"\r\ncontent-length: %d\r\n\r\n" % len(body)
                    )
                    moment = rng.random()
                    if moment < 0.1:  # gone with the body half sent: the request never completed
                        writer.write(head + body[:5])
                        await writer.drain()
                        await asyncio.sleep(rng.random() * 0.01)
                        return
                    writer.write(head + body)
                    await writer.drain()
                    if moment < 0.3:  # gone before any answer
                        await asyncio.sleep(rng.random() * 0.02)
                        return
                    line = await reader.readline()
                    status = int(line.split()[1]) if line else 0
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:  # mid-stream, at a random moment
                        deadline = time.monotonic() + rng.random() * 0.3
                        while time.monotonic() < deadline and await reader.read(4096):
                            pass
                finally:
                    writer.transport.abort()  # a reset, not a polite close

            pending = [one(i) for i in range(1000)]
            for start in range(0, 1000, 100):  # 100 at a time: some meet the limits
                await asyncio.gather(*pending[start : start + 100])
            assert statuses.get(200, 0) > 300 and statuses.get(429, 0) > 0, statuses
            assert set(statuses) <= {200, 429}, statuses

            def all_free() -> bool:
                return all(v == 0 for v in admission.limiter.in_flight().values())

            await wait_until(all_free, timeout=20.0)
            assert admission.limiter.in_flight() == {"k:alice": 0, "k:bob": 0, "t:acme": 0}
            await wait_until(lambda: not any(c.busy for c in proxy.connections), timeout=20.0)
            assert proxy.gateway.states["up"].in_flight == 0  # type: ignore[union-attr]


async def test_a_disabled_or_removed_key_stops_working_within_5_s_and_a_bad_file_keeps_the_old_keys(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with Origin() as origin:
        usage_origin(origin)
        fx = Fixture(origin, keys_toml(alice="", bob=""))
        async with running_gateway(fx.toml) as proxy:
            assert (await chat(proxy.port, "alice")).status == 200
            caplog.set_level(logging.INFO, logger="pyproxy.keys")
            fx.write_keys(keys_toml(alice="disabled = true", bob=""))
            started = time.monotonic()

            async def refused() -> bool:
                return (await chat(proxy.port, "alice")).status == 401

            while not await refused():
                assert time.monotonic() - started < 5.0, "the disabled key still works after 5 s"
                await asyncio.sleep(0.05)
            # A file that does not parse is logged, and the keys in force stay.
            reloads = proxy.gateway.admission.reloads  # type: ignore[union-attr]
            fx.write_keys(keys_toml(bob="") + '\n[[keys]]\nname = "x"\nkey = "pp-plaintext-in-the-file"\n')
            await wait_until(lambda: proxy.gateway.admission.reload_errors == 1, timeout=6.0)  # type: ignore[union-attr]
            assert proxy.gateway.admission.reloads == reloads  # type: ignore[union-attr]
            assert (await chat(proxy.port, "bob")).status == 200
            assert (await chat(proxy.port, "alice")).status == 401
            assert "previous keys stay in force" in caplog.text and "pp-plaintext-in-the-file" not in caplog.text
            # Removed from a valid file: gone too.
            fx.write_keys(keys_toml(alice=""))
            await wait_until(lambda: proxy.gateway.admission.reloads == reloads + 1, timeout=6.0)  # type: ignore[union-attr]
            assert (await chat(proxy.port, "bob")).status == 401
            assert (await chat(proxy.port, "alice")).status == 200


ANTHROPIC_EVENTS = (
    b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":25,"output_tokens":1}}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"text":"hi"}}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":15}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)


async def test_usage_is_counted_per_key_and_model_from_both_api_shapes_and_keys_never_leak() -> None:
    async with Origin() as origin:
        usage_origin(origin, prompt=5, completion=9)

        @origin.route(b"/v1/messages")
        async def messages(req: Received, reply: Reply) -> None:
            if json.loads(req.body).get("stream"):
                await reply.head(200, [(b"content-type", b"text/event-stream")])
                for i in range(0, len(ANTHROPIC_EVENTS), 7):  # split anywhere
                    await reply.data(ANTHROPIC_EVENTS[i : i + 7])
                await reply.end()
                return
            usage = {"input_tokens": 20, "cache_read_input_tokens": 4, "output_tokens": 6}
            await reply.full(200, json.dumps({"type": "message", "usage": usage}).encode(), JSON)

        fx = Fixture(origin, keys_toml(alice='tenant = "acme"\nrpm = 1000\ntpm = 100000', bob='tenant = "acme"'))
        log_path = os.path.join(fx.dir, "access.log")
        async with running_gateway(fx.toml, access_log=log_path, admin_listen=("127.0.0.1", 0)) as proxy:
            assert (await chat(proxy.port, "alice")).status == 200
            assert (await chat(proxy.port, "alice", b'{"model": "m", "stream": true}')).status == 200
            anthropic = [(b"x-api-key", KEYS["bob"].encode())]
            assert (
                await request(proxy.port, b"POST", b"/v1/messages", JSON + anthropic, b'{"model": "gpt-x"}')
            ).status == 200
            resp = await request(
                proxy.port, b"POST", b"/v1/messages", JSON + anthropic, b'{"model": "gpt-x", "stream": true}'
            )
            assert resp.status == 200 and resp.body == ANTHROPIC_EVENTS
            assert (await chat(proxy.port, None)).status == 401
            admin = proxy.admin.port  # type: ignore[union-attr]
            usage = (await request(admin, b"GET", b"/usage")).json()
            assert usage["keys"]["alice"] == {"requests": 2, "input_tokens": 10, "output_tokens": 18, "estimated": 0}
            assert usage["keys"]["bob"] == {"requests": 2, "input_tokens": 49, "output_tokens": 21, "estimated": 0}
            assert usage["tenants"]["acme"] == {"requests": 4, "input_tokens": 59, "output_tokens": 39, "estimated": 0}
            metrics = (await request(admin, b"GET", b"/metrics")).body.decode()
            assert 'proxy_tokens_total{key="alice",model="m",type="input"} 10.0' in metrics
            assert 'proxy_tokens_total{key="bob",model="gpt-*",type="output"} 21.0' in metrics
            assert (
                'gen_ai_client_token_usage_bucket{gen_ai_request_model="m",gen_ai_token_type="output",le="16"} 2.0'
                in metrics
            )
            assert 'gen_ai_server_time_to_first_token_seconds_count{gen_ai_request_model="m"} 2.0' in metrics
            assert 'gen_ai_server_time_per_output_token_seconds_count{gen_ai_request_model="gpt-*"} 1.0' in metrics
            await wait_until(lambda: len(read_text(log_path).splitlines()) == 5)
            lines = [json.loads(line) for line in read_text(log_path).splitlines()]
            assert [(x["key"], x["model"], x["input_tokens"], x["output_tokens"], x["usage"]) for x in lines[:4]] == [
                ("alice", "m", 5, 9, "reported"),
                ("alice", "m", 5, 9, "reported"),
                ("bob", "gpt-x", 24, 6, "reported"),
                ("bob", "gpt-x", 25, 15, "reported"),
            ]
            assert lines[0]["tenant"] == "acme" and "key" not in lines[4]
            everything = read_text(log_path) + metrics + json.dumps(usage)
            everything += (await request(admin, b"GET", b"/upstreams")).body.decode()
            for key in KEYS.values():
                assert key not in everything and hashlib.sha256(key.encode()).hexdigest() not in everything
            assert UPSTREAM_KEY not in everything


async def test_cache_entries_are_shared_within_a_tenant_never_across() -> None:
    async with Origin() as origin:
        calls: List[bytes] = []

        @origin.route(b"/v1/files")
        async def files(req: Received, reply: Reply) -> None:
            calls.append(req.header(b"authorization") or b"")
            await reply.full(200, b'{"data": []}', JSON + [(b"cache-control", b"max-age=60")])

        fx = Fixture(
            origin,
            keys_toml(alice='tenant = "acme"', bob='tenant = "acme"', carol='tenant = "other"'),
            extra='[[cache.rules]]\nname = "files"\nmethods = ["GET"]\npath = "/v1/files"\nttl = 60\nshared = true\n',
        )
        async with running_gateway(fx.toml) as proxy:
            first = await request(proxy.port, b"GET", b"/v1/files", bearer("alice"))
            second = await request(proxy.port, b"GET", b"/v1/files", bearer("bob"))
            third = await request(proxy.port, b"GET", b"/v1/files", bearer("carol"))
            assert [first.status, second.status, third.status] == [200, 200, 200]
            assert first.header(b"x-cache") == b"MISS" and second.header(b"x-cache") == b"HIT"
            assert third.header(b"x-cache") == b"MISS"  # a shared rule is shared within the tenant only
            assert len(calls) == 2 and all(c == b"Bearer " + UPSTREAM_KEY.encode() for c in calls)
            # A cache hit spends none of the key's tokens or usage.
            assert proxy.gateway.admission.snapshot()["per_key"].get("bob") is None  # type: ignore[union-attr]


async def test_the_admin_token_guards_everything_but_health_and_ready() -> None:
    class Source(ProxyAdmin):
        def __init__(self) -> None:
            pass

        def health(self) -> Dict[str, Any]:
            return {"status": "ok"}

        def ready(self) -> bool:
            return True

        def snapshot(self) -> Dict[str, Any]:
            return {"usage": {"per_key": {}, "per_tenant": {}, "unknown": 0}}

        def auth_config(self) -> Any:
            return None

    server = AdminServer(Source(), b"admin-token-123")
    await server.start("127.0.0.1", 0)
    try:
        assert (await request(server.port, b"GET", b"/health")).status == 200
        assert (await request(server.port, b"GET", b"/ready")).status == 200
        for path in (b"/usage", b"/metrics", b"/upstreams", b"/nothing"):
            resp = await request(server.port, b"GET", path)
            assert resp.status == 401 and resp.header(b"www-authenticate")
            wrong = await request(server.port, b"GET", path, [(b"authorization", b"Bearer admin-token-12")])
            assert wrong.status == 401
        resp = await request(server.port, b"GET", b"/usage", [(b"authorization", b"Bearer admin-token-123")])
        assert resp.status == 200 and resp.json()["keys"] == {}
    finally:
        await server.stop()


def openai_like_stream(
    origin: Origin,
    words: List[str],
    usage: Dict[str, int],
    spaced: bool = False,
    gate: Optional[asyncio.Event] = None,
) -> None:
    """A chat route that streams as OpenAI does: include_usage adds "usage": null to
    every chunk and a last chunk with the usage and no choices. Cacheable for a
    minute; ``gate``: the answer waits for it."""
    separators = (", ", ": ") if spaced else (",", ":")

    @origin.route(CHAT)
    async def chat_route(req: Received, reply: Reply) -> None:
        body = json.loads(req.body)
        asked = (body.get("stream_options") or {}).get("include_usage") is True
        if gate is not None:
            await gate.wait()
        await reply.head(200, [(b"content-type", b"text/event-stream"), (b"cache-control", b"max-age=60")])
        for word in words:
            chunk: Dict[str, Any] = {"id": "c", "choices": [{"index": 0, "delta": {"content": word}}]}
            if asked:
                chunk["usage"] = None
            await reply.data(b"data: " + json.dumps(chunk, separators=separators).encode() + b"\n\n")
        if asked:
            last = {"id": "c", "choices": [], "usage": usage}
            await reply.data(b"data: " + json.dumps(last, separators=separators).encode() + b"\n\n")
        await reply.data(b"data: [DONE]\n\n")
        await reply.end()


async def expected_stream(origin: Origin, body: bytes) -> bytes:
    """What the origin itself sends for ``body`` (no pyproxy in between)."""
    resp = await request(origin.port, b"POST", CHAT, JSON, body)
    assert resp.status == 200
    return resp.body


@pytest.mark.parametrize("spaced", [False, True])
async def test_stream_usage_inject_counts_usage_and_the_client_gets_the_bytes_it_asked_for(spaced: bool) -> None:
    usage = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    async with Origin() as origin:
        openai_like_stream(origin, ["a", "b", "c"], usage, spaced)
        fx = Fixture(origin, keys_toml(alice="tpm = 100000", bob=""))
        fx.toml = fx.toml.replace(
            f'api_key = "{UPSTREAM_KEY}"\n', f'api_key = "{UPSTREAM_KEY}"\nstream_usage = "inject"\n'
        )
        async with running_gateway(fx.toml, dedup_enabled=False) as proxy:
            plain = b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
            want = await expected_stream(origin, plain)
            resp = await chat(proxy.port, "alice", plain)
            assert resp.status == 200 and resp.body == want  # byte for byte
            sent = origin.requests[-1].body
            assert json.loads(sent) == dict(json.loads(plain), stream_options={"include_usage": True})
            assert sent.startswith(plain[:-1])  # only the member added
            # A client that asks gets the usage chunk, and its body goes unchanged.
            asking = b'{"model": "m", "stream": true, "stream_options": {"include_usage": true}}'
            want_usage = await expected_stream(origin, asking)
            resp = await chat(proxy.port, "bob", asking)
            assert resp.status == 200 and resp.body == want_usage and b'"choices":' in resp.body
            assert origin.requests[-1].body == asking
            # Not a stream: nothing added.
            usage_json = b'{"model": "m"}'
            await chat(proxy.port, "bob", usage_json)
            assert origin.requests[-1].body == usage_json
            snap = proxy.gateway.admission.snapshot()  # type: ignore[union-attr]
            assert snap["per_key"]["alice"] == {"requests": 1, "input_tokens": 12, "output_tokens": 3, "estimated": 0}
            assert snap["per_key"]["bob"]["input_tokens"] == 12 and snap["unknown"] == 1  # the JSON has none


async def test_stream_usage_inject_through_coalescing_and_the_cache_stays_stripped() -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    gate = asyncio.Event()
    async with Origin() as origin:
        openai_like_stream(origin, ["x", "y"], usage, gate=gate)
        fx = Fixture(
            origin,
            keys_toml(alice=""),
            '[[cache.rules]]\nmethods = ["POST"]\npath = "/v1/chat/completions"\nttl = 60\nstream = true\n'
            '[[dedup.rules]]\nmethods = ["POST"]\npath = "/v1/chat/completions"\n',
        )
        fx.toml = fx.toml.replace(
            f'api_key = "{UPSTREAM_KEY}"\n', f'api_key = "{UPSTREAM_KEY}"\nstream_usage = "inject"\n'
        )
        async with running_gateway(fx.toml) as proxy:
            body = b'{"model": "m", "stream": true, "temperature": 0}'
            both = asyncio.gather(chat(proxy.port, "alice", body), chat(proxy.port, "alice", body))
            await wait_until(lambda: len(origin.requests) >= 1)
            gate.set()
            first, follower = await both
            again = await chat(proxy.port, "alice", body)
            assert len(origin.requests) == 1  # one leader, one follower, one hit
            assert again.header(b"x-cache") == b"HIT"
            want = await expected_stream(origin, body)
            assert first.body == want and follower.body == want and again.body == want
            snap = proxy.gateway.admission.snapshot()  # type: ignore[union-attr]
            assert snap["per_key"]["alice"] == {"requests": 1, "input_tokens": 5, "output_tokens": 2, "estimated": 0}
