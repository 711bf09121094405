"""limits_backend = "redis://...": two instances against one real redis-server
(started by the test on a free port) enforce one limit; in-flight leases free
themselves when their holder dies; Redis killed mid-test leaves each instance its
local share and no request fails; usage totals come from Redis."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, List

import pytest

from pyproxy.gateway import shared_limits
from pyproxy.resp import RespClient
from tests.integration.test_keys import KEYS, Fixture, chat, error_of, keys_toml, usage_origin
from tests.support.client import request, wait_until
from tests.support.gateway import running_gateway
from tests.support.origin import Origin, Received, Reply
from tests.support.redis_server import RedisServer

CHAT = b"/v1/chat/completions"


def shared(fx: Fixture, url: str, **extra: Any) -> str:
    lines = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in extra.items())
    return fx.toml + f'limits_backend = "{url}"\n' + lines


async def redis_call(server: RedisServer, *args: Any) -> Any:
    client = RespClient(server.url, 2.0, asyncio.get_running_loop())
    try:
        return await client.call(*args)
    finally:
        client.close()


async def test_two_instances_share_one_rpm_limit_and_usage_totals() -> None:
    async with RedisServer() as server, Origin() as origin:
        usage_origin(origin, prompt=3, completion=4)
        fx = Fixture(origin, keys_toml(alice="rpm = 10", bob=""))
        toml = shared(fx, server.url)
        async with running_gateway(toml, admin_listen=("127.0.0.1", 0)) as a, running_gateway(toml) as b:
            ports = [a.port, b.port]
            responses = await asyncio.gather(*(chat(ports[i % 2], "alice") for i in range(16)))
            ok = [r for r in responses if r.status == 200]
            limited = [r for r in responses if r.status == 429]
            assert len(ok) == 10 and len(limited) == 6, [r.status for r in responses]
            assert sorted(int(r.header(b"x-ratelimit-remaining-requests")) for r in ok) == list(range(10))
            for resp in limited:
                assert error_of(resp)["code"] == "rate_limit_exceeded" and int(resp.header(b"retry-after")) >= 1
            # Both instances admitted some: the limit is one, not one each.
            admitted = [p.gateway.admission.shared.admitted for p in (a, b)]  # type: ignore[union-attr]
            assert sum(admitted) == 10 and min(admitted) >= 1, admitted
            assert (await chat(b.port, "bob")).status == 200  # no limits: no Redis admission
            # /usage: every instance's totals, from Redis.
            admin = a.admin.port  # type: ignore[union-attr]

            async def totals() -> Any:
                return (await request(admin, b"GET", b"/usage")).json()

            deadline = time.monotonic() + 5.0
            while (await totals())["keys"].get("alice", {}).get("requests") != 10:
                assert time.monotonic() < deadline, await totals()
                await asyncio.sleep(0.05)
            usage = await totals()
            assert usage["source"] == "redis"
            assert usage["keys"]["alice"] == {"requests": 10, "input_tokens": 30, "output_tokens": 40, "estimated": 0}
            assert usage["keys"]["bob"]["requests"] == 1 and usage["tenants"]["alice"]["requests"] == 10
            dump = str(await redis_call(server, b"KEYS", b"*"))
            assert KEYS["alice"] not in dump


def gated_stream(origin: Origin, gate: asyncio.Event) -> None:
    @origin.route(CHAT)
    async def chat_route(req: Received, reply: Reply) -> None:
        if not json.loads(req.body).get("stream"):
            await reply.full(200, b'{"choices": []}', [(b"content-type", b"application/json")])
            return
        await reply.head(200, [(b"content-type", b"text/event-stream")])
        await reply.data(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n')
        await gate.wait()
        await reply.data(b"data: [DONE]\n\n")
        await reply.end()


async def test_in_flight_leases_are_shared_refreshed_by_their_holder_and_expire_when_it_dies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shared_limits, "LEASE_TTL", 1.0)  # refreshed every 1/3 s
    gate = asyncio.Event()
    async with RedisServer() as server, Origin() as origin:
        gated_stream(origin, gate)
        fx = Fixture(origin, keys_toml(alice="max_parallel = 2"))
        toml = shared(fx, server.url)
        async with running_gateway(toml, dedup_enabled=False) as a, running_gateway(toml, dedup_enabled=False) as b:
            body = b'{"model": "m", "stream": true}'
            streams = [asyncio.ensure_future(chat(p, "alice", body)) for p in (a.port, b.port)]
            await wait_until(lambda: len(origin.requests) == 2)
            # Past the lease TTL: alive because their holders refresh them.
            await asyncio.sleep(2.5)
            refused = await chat(a.port, "alice", body)
            assert refused.status == 429 and "2 requests in flight" in error_of(refused)["message"]
            gate.set()
            assert [r.status for r in await asyncio.gather(*streams)] == [200, 200]

            async def admitted_on(port: int) -> bool:
                return (await chat(port, "alice")).status == 200

            # Freed at the end: both instances admit again.
            deadline = time.monotonic() + 5.0
            while not (await admitted_on(b.port) and await admitted_on(a.port)):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            # An instance that dies holding slots: nobody ends or refreshes its leases.
            gate.clear()
            before = len(origin.requests)
            held = [asyncio.ensure_future(chat(a.port, "alice", body)) for _ in range(2)]
            await wait_until(lambda: len(origin.requests) == before + 2)
            assert (await chat(b.port, "alice", body)).status == 429
            a.gateway.admission.shared.close()  # type: ignore[union-attr]  # as a crash: no end, no refresh
            started = time.monotonic()
            while (await chat(b.port, "alice")).status != 200:
                assert time.monotonic() - started < 5.0, "a dead instance's leases did not expire"
                await asyncio.sleep(0.1)
            assert time.monotonic() - started >= 0.3  # freed by expiry, not before
            gate.set()
            await asyncio.gather(*held)


async def test_redis_killed_mid_test_each_instance_keeps_its_share_and_recovers() -> None:
    async with RedisServer() as server, Origin() as origin:
        usage_origin(origin)
        fx = Fixture(origin, keys_toml(alice="rpm = 10"))
        toml = shared(fx, server.url, limits_local_share=0.5)
        async with running_gateway(toml) as proxy:
            limits = proxy.gateway.admission.shared  # type: ignore[union-attr]
            assert [(await chat(proxy.port, "alice")).status for _ in range(2)] == [200, 200]
            assert limits.admitted == 2
            server.kill()
            statuses: List[int] = []
            for _ in range(10):
                statuses.append((await chat(proxy.port, "alice")).status)
            # Locally, half of rpm 10: five at once, then one every 12 s.
            assert statuses.count(200) == 5 and statuses.count(429) == 5, statuses
            assert limits.circuit.failures >= 1 and not limits.available
            await server.start()
            deadline = time.monotonic() + 10.0
            while limits.admitted == 2:
                assert time.monotonic() < deadline, "admissions did not go back to redis"
                resp = await chat(proxy.port, "alice")
                assert resp.status in (200, 429)
                await asyncio.sleep(0.1)
            assert limits.available


async def test_redis_that_never_answers_costs_one_timeout_then_admits_locally() -> None:
    accepted: List[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda r, w: accepted.append(w), "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        async with Origin() as origin:
            usage_origin(origin)
            fx = Fixture(origin, keys_toml(alice="rpm = 100"))
            toml = shared(fx, f"redis://127.0.0.1:{port}/0", limits_redis_timeout=0.2)
            async with running_gateway(toml) as proxy:
                started = time.monotonic()
                statuses = [(await chat(proxy.port, "alice")).status for _ in range(20)]
                assert statuses == [200] * 20
                assert time.monotonic() - started < 3.0  # one timeout, not twenty
                assert proxy.gateway.admission.shared.circuit.failures == 1  # type: ignore[union-attr]
    finally:
        for writer in accepted:
            writer.close()
        silent.close()
        await silent.wait_closed()


async def test_shared_tpm_reserves_then_settles_with_the_real_usage_across_instances() -> None:
    async with RedisServer() as server, Origin() as origin:
        usage_origin(origin, prompt=30, completion=70)  # 100 tokens really used
        fx = Fixture(origin, keys_toml(alice="tpm = 1000"))
        toml = shared(fx, server.url)
        async with running_gateway(toml) as a, running_gateway(toml) as b:
            body = json.dumps({"model": "m", "max_tokens": 600, "messages": []}).encode()
            reserved = 600 + len(body) // 4
            first = await chat(a.port, "alice", body)
            assert first.status == 200
            assert int(first.header(b"x-ratelimit-remaining-tokens")) == 1000 - reserved
            # Only the refund of what was reserved and not used makes room for a second
            # reservation, on the other instance: it comes with the request's end.
            deadline = time.monotonic() + 5.0
            while True:
                second = await chat(b.port, "alice", body)
                if second.status == 200:
                    break
                assert second.status == 429 and error_of(second)["type"] == "tokens"
                assert time.monotonic() < deadline, "the reservation was never settled"
                await asyncio.sleep(0.05)
            left = int(second.header(b"x-ratelimit-remaining-tokens"))
            assert 1000 - 100 - reserved <= left <= 1000 - 100 - reserved + 100  # plus what drained meanwhile
            # A charge beyond the reservation: the scope is over its limit for a while.
            usage_origin(origin, prompt=500, completion=2000)
            stream = json.dumps({"model": "m", "stream": True, "max_tokens": 1}).encode()
            deadline = time.monotonic() + 5.0
            while (await chat(a.port, "alice", stream)).status != 200:  # room for its small reservation
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            deadline = time.monotonic() + 5.0
            while True:
                refused = await chat(b.port, "alice", b'{"model": "m"}')
                if refused.status == 429:
                    break
                assert time.monotonic() < deadline, "the charge never reached the shared scope"
                await asyncio.sleep(0.05)
            assert error_of(refused)["type"] == "tokens" and int(refused.header(b"retry-after")) >= 60
