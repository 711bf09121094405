"""Several upstreams: routing by model, failover, cooling, ejection, keys, isolation.

Three in-test origins on 127.0.0.1 record what they receive; the gateway is built
from a real TOML file the way the CLI builds it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Dict

from pyproxy._compat import json_loads
from tests.support.client import Client, request, wait_until
from tests.support.gateway import running_gateway, upstreams_toml
from tests.support.origin import Origin, Received, Reply
from tests.support.sockets import free_port

JSON = [(b"content-type", b"application/json")]
CHAT = b"/v1/chat/completions"


def answer_as(origin: Origin, name: str, status: int = 200, headers=None) -> None:
    """The origin answers chat requests with its name and the body it received."""

    @origin.route(CHAT)
    async def chat(req: Received, reply: Reply) -> None:
        body = json.dumps({"from": name, "got": req.body.decode()}).encode()
        await reply.full(status, body, [(b"content-type", b"application/json")] + list(headers or []))


def models_toml(deployments: str, extra: str = "") -> str:
    return f'[[models]]\nname = "m"\ndeployments = [{deployments}]\n{extra}\n'


async def chat(port: int, body: bytes = b'{"model": "m", "messages": []}', headers=None):
    return await request(port, b"POST", CHAT, JSON + list(headers or []), body)


async def test_routes_by_model_with_aliases_and_renames_only_the_model() -> None:
    async with Origin() as a, Origin() as b, Origin() as c:
        for origin, name in ((a, "a"), (b, "b"), (c, "c")):
            answer_as(origin, name)
        toml = upstreams_toml(a=a, b=b, c=c) + (
            '[[models]]\nname = "llama"\ndeployments = [{ upstream = "a" }]\n'
            '[[models]]\nname = "gpt-*"\ndeployments = [{ upstream = "b", model = "gpt-4o-mini" }]\n'
            '[[models]]\nname = "emb"\ndeployments = [{ upstream = "c" }]\n'
            '[model_aliases]\n"big" = "llama"\n'
        )
        # Odd spacing, key order, escapes and unicode: all of it must arrive byte-identical.
        body = b'{ "messages" : [{"role":"user","content":"model: \\"x\\" \xc3\xa9"}],\n "model":"big" , "n":1.50}'
        async with running_gateway(toml) as proxy:
            resp = await chat(proxy.port, body)
            assert resp.status == 200 and resp.header(b"x-pyproxy-upstream") == b"a"
            assert resp.header(b"x-pyproxy-attempts") == b"1"
            assert a.requests[-1].body == body.replace(b'"model":"big"', b'"model":"llama"')
            resp = await chat(proxy.port, b'{"model":"gpt-4","stream":false}')
            assert resp.header(b"x-pyproxy-upstream") == b"b"
            assert b.requests[-1].body == b'{"model":"gpt-4o-mini","stream":false}'
            # Unchanged name: the body is forwarded exactly as sent.
            resp = await chat(proxy.port, b'{"model":"emb",  "input":"hi"}')
            assert resp.header(b"x-pyproxy-upstream") == b"c"
            assert c.requests[-1].body == b'{"model":"emb",  "input":"hi"}'
            assert c.requests[-1].header(b"content-length") == b"%d" % len(c.requests[-1].body)
            assert c.requests[-1].header(b"host") == b"127.0.0.1:%d" % c.port
            # GET /v1/models is pyproxy's own answer: the public names and aliases.
            models = await request(proxy.port, b"GET", b"/v1/models")
            assert models.status == 200
            assert [m["id"] for m in models.json()["data"]] == ["llama", "emb", "big"]
            assert not any(r.target == b"/v1/models" for o in (a, b, c) for r in o.requests)


async def test_bad_model_requests_get_precise_errors() -> None:
    async with Origin() as a:
        answer_as(a, "a")
        async with running_gateway(upstreams_toml(a=a) + models_toml('{ upstream = "a" }'), route_body_bytes=1000) as p:
            resp = await chat(p.port, b'{"model": "unknown"}')
            assert resp.status == 404 and resp.json()["error"]["code"] == "model_not_found"
            for body in (b"not json", b'{"messages": []}', b'["m"]', b'{"model": 7}'):
                resp = await chat(p.port, body)
                assert resp.status == 400, body
            resp = await chat(p.port, b'{"model": "m", "x": "' + b"y" * 2000 + b'"}')
            assert resp.status == 413
            # A path without a model still goes to the default (first) upstream.
            assert (await request(p.port, b"GET", b"/v1/files")).status == 404  # the origin's own 404
            assert not any(r.target == CHAT for r in a.requests)


async def test_dead_upstream_fails_over_with_zero_client_errors() -> None:
    async with Origin() as live:
        answer_as(live, "live")
        dead = f"http://127.0.0.1:{free_port()}"
        toml = upstreams_toml(dead=dead, live=live) + models_toml('{ upstream = "dead" }, { upstream = "live" }')
        async with running_gateway(toml) as proxy:
            seen: Dict[bytes, int] = {}
            for _ in range(40):
                resp = await chat(proxy.port)
                assert resp.status == 200
                attempts = resp.header(b"x-pyproxy-attempts")
                seen[attempts] = seen.get(attempts, 0) + 1
            # Some requests chose the dead one first and went on to the live one.
            assert seen.get(b"2", 0) >= 1 and set(seen) <= {b"1", b"2"}
            assert proxy.gateway.states["dead"].failures + 5 * proxy.gateway.states["dead"].ejections >= 1


async def test_a_burst_against_a_dead_upstream_is_not_stopped_by_the_retry_budget() -> None:
    """Connect failures reached no upstream: they fail over outside the retry budget
    (20 % of the requests in flight), which would otherwise refuse most of a burst."""
    async with Origin() as live:
        release = asyncio.Event()

        @live.route(CHAT)
        async def slow(req: Received, reply: Reply) -> None:
            await release.wait()  # the whole burst is in flight at once
            await reply.full(200, b"{}")

        dead = f"http://127.0.0.1:{free_port()}"
        toml = upstreams_toml(dead=dead, live=live) + models_toml('{ upstream = "dead" }, { upstream = "live" }')
        async with running_gateway(toml) as proxy:
            burst = asyncio.gather(*(chat(proxy.port) for _ in range(40)))
            await wait_until(lambda: len(live.requests) == 40, timeout=10)
            release.set()
            statuses = [resp.status for resp in await burst]
        assert statuses == [200] * 40


async def test_429_cools_the_upstream_for_its_retry_after() -> None:
    async with Origin() as a, Origin() as b:
        answer_as(b, "b")
        throttled = asyncio.Event()

        @a.route(CHAT)
        async def limited(req: Received, reply: Reply) -> None:
            if not throttled.is_set():
                throttled.set()
                await reply.full(429, b'{"error":"slow down"}', [(b"retry-after", b"2")])
            else:
                await reply.full(200, b'{"from":"a"}')

        toml = upstreams_toml(a=a, b=b) + models_toml('{ upstream = "a" }, { upstream = "b", priority = 1 }')
        async with running_gateway(toml) as proxy:
            resp = await chat(proxy.port)
            # a answered 429 and was retried on b, the fallback tier.
            assert resp.status == 200 and resp.header(b"x-pyproxy-upstream") == b"b"
            assert resp.header(b"x-pyproxy-attempts") == b"2"
            cooled_at = time.monotonic()
            before = len(a.requests)
            while time.monotonic() - cooled_at < 1.5:  # well inside the 2 s
                resp = await chat(proxy.port)
                assert resp.header(b"x-pyproxy-upstream") == b"b"
            assert len(a.requests) == before
            # After the 2 s, a (priority 0) gets traffic again.
            deadline = time.monotonic() + 10
            while True:
                resp = await chat(proxy.port)
                if resp.header(b"x-pyproxy-upstream") == b"a":
                    break
                assert time.monotonic() < deadline, "the cooled upstream never came back"
                await asyncio.sleep(0.05)
            assert time.monotonic() - cooled_at >= 1.9


async def test_no_retry_starts_past_the_requests_retry_deadline() -> None:
    async with Origin() as a, Origin() as b, Origin() as c:
        for origin in (a, b, c):

            @origin.route(CHAT)
            async def unavailable(req: Received, reply: Reply) -> None:
                await asyncio.sleep(0.5)  # a floor: the deadline below has always passed
                await reply.full(503, b'{"error":"busy"}')

        three = '{ upstream = "a" }, { upstream = "b" }, { upstream = "c" }'
        for deadline, attempts in (("retry_deadline = 0.3", 1), ("", 3)):
            toml = upstreams_toml(a=a, b=b, c=c) + models_toml(three, deadline)
            async with running_gateway(toml) as proxy:
                before = len(a.requests) + len(b.requests) + len(c.requests)
                resp = await chat(proxy.port)
                assert resp.status == 503  # the last upstream's answer, relayed
                assert resp.header(b"x-pyproxy-attempts") == str(attempts).encode()
                assert len(a.requests) + len(b.requests) + len(c.requests) - before == attempts


async def test_all_deployments_cooling_is_503_with_retry_after() -> None:
    async with Origin() as a:

        @a.route(CHAT)
        async def limited(req: Received, reply: Reply) -> None:
            await reply.full(429, b'{"error":"slow down"}', [(b"retry-after", b"30")])

        async with running_gateway(upstreams_toml(a=a) + models_toml('{ upstream = "a" }')) as proxy:
            first = await chat(proxy.port)
            assert first.status == 429  # nowhere else to go: the upstream's answer is relayed
            second = await chat(proxy.port)
            assert second.status == 503
            assert 28 <= int(second.header(b"retry-after")) <= 30
            assert second.json()["error"]["type"] == "overloaded_error"
            assert len(a.requests) == 1


async def test_upstream_dying_after_the_head_is_a_visible_truncation_not_a_retry() -> None:
    async with Origin() as a, Origin() as b:
        for origin in (a, b):

            @origin.route(CHAT)
            async def dies(req: Received, reply: Reply) -> None:
                await reply.head(200, [(b"content-length", b"100")])
                await reply.data(b"partial")
                await reply.raw(b"")  # then the connection drops

        toml = upstreams_toml(a=a, b=b) + models_toml('{ upstream = "a" }, { upstream = "b" }')
        async with running_gateway(toml) as proxy:
            async with await Client.connect(proxy.port) as client:
                await client.send_request(b"POST", CHAT, JSON, b'{"model":"m"}')
                resp = await client.read_response()
            assert resp.status == 200 and not resp.complete
            assert len(a.requests) + len(b.requests) == 1


async def test_reset_after_the_request_was_written_is_retried_only_when_opted_in() -> None:
    for opt_in in (False, True):
        async with Origin() as a, Origin() as b:
            for origin in (a, b):

                @origin.route(CHAT)
                async def resets(req: Received, reply: Reply) -> None:
                    await reply.raw(b"")

            extra = 'retry_on = ["reset"]' if opt_in else ""
            toml = upstreams_toml(a=a, b=b) + models_toml('{ upstream = "a" }, { upstream = "b" }', extra)
            async with running_gateway(toml) as proxy:
                resp = await chat(proxy.port)
                assert resp.status == 502
                assert len(a.requests) + len(b.requests) == (2 if opt_in else 1)
                assert resp.header(b"x-pyproxy-attempts") == (b"2" if opt_in else b"1")


async def test_ejection_after_five_failures_and_return_through_the_active_check() -> None:
    async with Origin() as a, Origin() as b:
        answer_as(b, "b")
        healthy = {"on": False}

        @a.route(CHAT)
        async def broken(req: Received, reply: Reply) -> None:
            await reply.full(500, b'{"error":"boom"}')

        @a.route(b"/healthz")
        async def health(req: Received, reply: Reply) -> None:
            await reply.full(200 if healthy["on"] else 503, b"{}")

        toml = upstreams_toml(a=a, b=b).replace(
            f'url = "{a.url}"', f'url = "{a.url}"\nhealth_path = "/healthz"'
        ) + models_toml('{ upstream = "a" }, { upstream = "b", priority = 1 }')
        async with running_gateway(toml, health_interval=0.2) as proxy:
            state = proxy.gateway.states["a"]
            statuses = [(await chat(proxy.port)).status for _ in range(5)]
            assert statuses == [500] * 5  # a 500 is not retried by default: the client sees it
            assert state.ejected(proxy.loop.time()) and state.ejections == 1
            before = len(a.requests)
            for _ in range(10):
                resp = await chat(proxy.port)
                assert resp.status == 200 and resp.header(b"x-pyproxy-upstream") == b"b"
            assert len(a.requests) == before
            healthy["on"] = True
            await wait_until(lambda: not state.ejected(proxy.loop.time()), timeout=5)
            assert (await chat(proxy.port)).header(b"x-pyproxy-upstream") == b"a"


async def test_never_more_than_half_of_a_models_deployments_ejected() -> None:
    async with Origin() as a, Origin() as b:
        for origin in (a, b):

            @origin.route(CHAT)
            async def broken(req: Received, reply: Reply) -> None:
                await reply.full(500, b"{}")

        toml = upstreams_toml(a=a, b=b) + models_toml('{ upstream = "a" }, { upstream = "b" }')
        async with running_gateway(toml) as proxy:
            for _ in range(30):
                assert (await chat(proxy.port)).status == 500
            now = proxy.loop.time()
            ejected = [name for name, s in proxy.gateway.states.items() if s.ejected(now)]
            assert len(ejected) == 1


async def test_a_slow_origin_receives_a_much_smaller_share() -> None:
    async with Origin() as fast1, Origin() as fast2, Origin() as slow:
        for origin, delay in ((fast1, 0.005), (fast2, 0.005), (slow, 0.05)):

            @origin.route(CHAT)
            async def answer(req: Received, reply: Reply, delay: float = delay) -> None:
                await asyncio.sleep(delay)
                await reply.full(200, b"{}")

        toml = upstreams_toml(f1=fast1, f2=fast2, slow=slow) + models_toml(
            '{ upstream = "f1" }, { upstream = "f2" }, { upstream = "slow" }'
        )
        async with running_gateway(toml) as proxy:

            async def worker() -> None:
                async with await Client.connect(proxy.port) as client:
                    for _ in range(40):
                        resp = await client.request(b"POST", CHAT, JSON, b'{"model":"m"}')
                        assert resp.status == 200

            await asyncio.gather(*(worker() for _ in range(8)))
        fast = min(len(fast1.requests), len(fast2.requests))
        # Round robin would give each a third (107); the slow one must get far less.
        counts = (len(fast1.requests), len(fast2.requests), len(slow.requests))
        assert len(slow.requests) * 3 < fast, counts


async def test_injected_key_replaces_the_clients_and_is_never_shown(caplog) -> None:
    async with Origin() as a, Origin() as b:
        answer_as(a, "a")

        @b.route(CHAT)
        async def broken(req: Received, reply: Reply) -> None:
            await reply.full(503, b"{}")

        toml = upstreams_toml(a=a, b=b).replace(f'url = "{a.url}"', f'url = "{a.url}"\napi_key = "env:KEY_A"').replace(
            f'url = "{b.url}"', f'url = "{b.url}"\napi_key = "env:KEY_B"\nauth_header = "x-api-key"'
        ) + models_toml('{ upstream = "a" }, { upstream = "b" }')
        environ = {"KEY_A": "sk-upstream-a-SECRET", "KEY_B": "sk-upstream-b-SECRET"}
        client_creds = [(b"authorization", b"Bearer client-key"), (b"x-api-key", b"client-2"), (b"api-key", b"c3")]
        caplog.set_level(logging.DEBUG)
        async with running_gateway(toml, environ, admin_listen=("127.0.0.1", 0)) as proxy:
            # Until the balancer has tried both (a tie between two unmeasured upstreams
            # is a coin flip): bounded, and a run of 200 heads is not a thing.
            for _ in range(200):
                assert (await chat(proxy.port, headers=client_creds)).status == 200
                if a.requests and b.requests:
                    break
            admin = await request(proxy.admin.port, b"GET", b"/upstreams")
            metrics = await request(proxy.admin.port, b"GET", b"/metrics")
        for got in a.requests:
            assert got.header_list(b"authorization") == [b"Bearer sk-upstream-a-SECRET"]
            assert got.header(b"x-api-key") is None and got.header(b"api-key") is None
        assert b.requests, "the balancer never tried b"
        for got in b.requests:
            assert got.header_list(b"x-api-key") == [b"sk-upstream-b-SECRET"]
            assert got.header(b"authorization") is None and got.header(b"api-key") is None
        assert admin.status == 200 and set(admin.json()) == {"a", "b"}
        assert admin.json()["a"]["key_injected"] is True
        for text in (admin.body, metrics.body, caplog.text.encode(), repr(proxy.settings).encode()):
            assert b"SECRET" not in text


async def test_tenants_behind_one_injected_key_never_share_cache_or_coalesced_streams() -> None:
    async with Origin() as a:
        release = asyncio.Event()

        @a.route(CHAT)
        async def answer(req: Received, reply: Reply) -> None:
            arrived = len(a.requests)  # which upstream request this is
            await release.wait()
            await reply.full(200, b'{"n":%d}' % arrived, [(b"cache-control", b"max-age=60")])

        toml = (
            upstreams_toml(a=a).replace(f'url = "{a.url}"', f'url = "{a.url}"\napi_key = "env:K"')
            + models_toml('{ upstream = "a" }')
            + '[[cache.rules]]\nmethods = ["POST"]\npath = "/v1/chat/completions"\nttl = 60\n'
            + '[[dedup.rules]]\nmethods = ["POST"]\npath = "/v1/chat/completions"\n'
        )
        async with running_gateway(toml, {"K": "sk-shared"}) as proxy:
            alice = [(b"authorization", b"Bearer alice")]
            bob = [(b"authorization", b"Bearer bob")]
            body = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
            both = asyncio.gather(
                chat(proxy.port, body, alice), chat(proxy.port, body, bob), chat(proxy.port, body, alice)
            )
            await wait_until(lambda: len(a.requests) >= 2)
            release.set()
            first_alice, first_bob, second_alice = await both
            assert len(a.requests) == 2  # alice's two coalesced; bob's alone
            assert first_alice.body == second_alice.body != first_bob.body
            # Cached per tenant too: each gets its own entry back, nobody else's.
            again_bob = await chat(proxy.port, body, bob)
            again_alice = await chat(proxy.port, body, alice)
            assert again_bob.header(b"x-cache") == b"HIT" and again_bob.body == first_bob.body
            assert again_alice.header(b"x-cache") == b"HIT" and again_alice.body == first_alice.body
            # An alias of the same model is the same public model: the same entry.
            assert len(a.requests) == 2


async def test_metrics_and_admin_upstreams_describe_each_upstream() -> None:
    async with Origin() as a, Origin() as b:
        answer_as(a, "a")
        answer_as(b, "b", status=503)
        toml = upstreams_toml(a=a, b=b) + models_toml('{ upstream = "a", priority = 1 }, { upstream = "b" }')
        async with running_gateway(toml, admin_listen=("127.0.0.1", 0)) as proxy:
            resp = await chat(proxy.port)
            assert resp.header(b"x-pyproxy-upstream") == b"a" and resp.header(b"x-pyproxy-attempts") == b"2"
            text = (await request(proxy.admin.port, b"GET", b"/metrics")).body.decode()
            view = (await request(proxy.admin.port, b"GET", b"/upstreams")).json()
        assert 'proxy_upstream_requests_total{status="503",upstream="b"} 1.0' in text
        assert 'proxy_upstream_requests_total{status="200",upstream="a"} 1.0' in text
        assert 'proxy_upstream_attempts_total{outcome="retried",upstream="b"} 1.0' in text
        assert 'proxy_upstream_up{upstream="a"} 1.0' in text
        assert 'proxy_upstream_in_flight{upstream="a"} 0.0' in text
        assert 'proxy_upstream_ejections_total{upstream="b"} 0.0' in text
        assert 'proxy_upstream_ttfb_seconds_count{endpoint="/v1/chat/completions",upstream="a"} 1.0' in text
        assert view["b"]["state"] == "up" and view["b"]["recent_errors"][0]["error"] == "answered 503"
        assert view["a"]["latency_ewma_ms"] > 0 and view["a"]["pool"]["idle"] == 1


async def test_path_routes_and_default_upstream_none() -> None:
    async with Origin() as a, Origin() as b:
        toml = (
            'default_upstream = "none"\n'
            + upstreams_toml(a=a, b=b)
            + ('[[routes]]\npath = "/v1/files*"\nupstream = "b"\n[[routes]]\npath = "/echo"\nupstream = "a"\n')
        )
        async with running_gateway(toml) as proxy:
            resp = await request(proxy.port, b"POST", b"/v1/files/upload", [], b"multipart-ish body")
            assert resp.status == 404 and resp.header(b"x-pyproxy-upstream") == b"b"  # the origin's 404
            assert b.requests[-1].body == b"multipart-ish body"
            resp = await request(proxy.port, b"GET", b"/echo?x=1")
            assert resp.status == 200 and resp.header(b"x-pyproxy-upstream") == b"a"
            resp = await request(proxy.port, b"GET", b"/other")
            assert resp.status == 404 and resp.header(b"x-pyproxy-upstream") is None
            assert resp.json()["error"]["code"] == "not_found"


async def test_a_path_route_balances_over_deployments_and_fails_over() -> None:
    async with Origin() as a, Origin() as b:
        dead = f"http://127.0.0.1:{free_port()}"
        toml = upstreams_toml(a=a, b=b, dead=dead) + (
            '[[routes]]\nmethods = ["GET"]\npath = "/echo"\n'
            'deployments = [{ upstream = "a" }, { upstream = "b" }, { upstream = "dead" }]\n'
        )
        async with running_gateway(toml) as proxy:
            seen = set()
            for _ in range(30):
                resp = await request(proxy.port, b"GET", b"/echo")
                assert resp.status == 200
                seen.add(resp.header(b"x-pyproxy-upstream"))
            assert seen == {b"a", b"b"}


async def test_upstream_headers_off_hides_them_from_clients() -> None:
    async with Origin() as a:
        answer_as(a, "a")
        async with running_gateway(
            upstreams_toml(a=a) + models_toml('{ upstream = "a" }'), upstream_headers=False
        ) as p:
            resp = await chat(p.port)
            assert resp.status == 200 and resp.header(b"x-pyproxy-upstream") is None
            assert resp.header(b"x-pyproxy-attempts") is None


async def test_streamed_body_on_a_path_route_fails_over_when_unsent() -> None:
    """A body larger than the retry buffer still fails over on a connect failure."""
    async with Origin() as live:
        dead = f"http://127.0.0.1:{free_port()}"
        toml = upstreams_toml(dead=dead, live=live) + '[[routes]]\npath = "/echo"\nupstream = "dead"\n'
        body = b"x" * 300_000
        async with running_gateway(toml, retry_buffer_bytes=1000) as proxy:
            resp = await request(proxy.port, b"POST", b"/echo", [], body)
        # One deployment: nothing to fail over to, and the connect failure is a 502.
        assert resp.status == 502 and json_loads(resp.body)["error"]["type"] == "upstream_error"
        assert resp.header(b"x-pyproxy-attempts") == b"1"
