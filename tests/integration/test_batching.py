"""Embeddings batching ([[batching]]): many single-input requests, few upstream requests,
and every caller answered as if it had been alone.

The origin (tests/support/embeddings.py) computes each input's vector from the
input itself and lists its answer last index first, so a split by position
instead of by ``index`` gives the wrong vectors; it counts tokens its own way, so
usage shares must add up to what it reported, not to pyproxy's estimate.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, List

from tests.support.client import Client, request, wait_until
from tests.support.embeddings import EMBEDDINGS, answer, serve_embeddings, tokens_of, vector
from tests.support.gateway import running_gateway, upstreams_toml
from tests.support.origin import Origin

JSON = [(b"content-type", b"application/json")]


def batching_toml(origin: Origin, extra: str = "", max_wait_ms: int = 50) -> str:
    return upstreams_toml(emb=origin) + (
        '[[models]]\nname = "text-embedding-*"\ndeployments = [{ upstream = "emb" }]\n'
        '[[batching]]\npath = "/v1/embeddings"\nmodels = ["text-embedding-*"]\n'
        f"max_wait_ms = {max_wait_ms}\n{extra}\n"
    )


async def embed(port: int, input_: Any, **fields: Any):
    body = json.dumps(dict({"model": "text-embedding-3-small", "input": input_}, **fields)).encode()
    return await request(port, b"POST", EMBEDDINGS, JSON, body)


def alone(input_: Any, **fields: Any) -> Any:
    """What the origin answers this request when it is sent unbatched."""
    return answer(dict({"model": "text-embedding-3-small", "input": input_}, **fields))


def upstream_inputs(origin: Origin) -> List[int]:
    counts = []
    for req in origin.requests:
        raw = json.loads(req.body)["input"]
        counts.append(1 if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else len(raw))
    return counts


async def test_concurrent_single_inputs_share_few_upstream_requests_and_split_exactly() -> None:
    async with Origin() as origin:
        serve_embeddings(origin, delay=0.05)
        async with running_gateway(batching_toml(origin)) as proxy:
            texts = [f"text number {i} " + "word " * (i % 7) for i in range(64)]
            encodings = ["float" if i % 2 else "base64" for i in range(64)]
            responses = await asyncio.gather(
                *(embed(proxy.port, t, encoding_format=e) for t, e in zip(texts, encodings))
            )
            # The first goes at once; the rest collect while it is upstream.
            assert len(origin.requests) <= 6, upstream_inputs(origin)
            assert sum(upstream_inputs(origin)) == 64
            batched = 0
            for text, encoding, resp in zip(texts, encodings, responses):
                assert resp.status == 200, resp.body
                doc = resp.json()
                assert doc["object"] == "list" and doc["model"] == "text-embedding-3-small"
                assert [item["index"] for item in doc["data"]] == [0]
                expected = alone(text, encoding_format=encoding)["data"][0]["embedding"]
                # base64 byte for byte; float value for value.
                assert doc["data"][0]["embedding"] == expected
                if encoding == "float":
                    assert doc["data"][0]["embedding"] == vector(text)
                batched += int(resp.header(b"x-pyproxy-batch")) > 1
                assert int(resp.header(b"content-length")) == len(resp.body)
            assert batched >= 48
            # Usage: the shares add up to what the upstream reported, exactly.
            reported = sum(tokens_of(t) for t in texts)
            assert sum(r.json()["usage"]["prompt_tokens"] for r in responses) == reported
            assert sum(r.json()["usage"]["total_tokens"] for r in responses) == reported
            # Every batch asked the upstream for base64 and nothing of one caller's.
            for req in origin.requests[1:]:
                sent = json.loads(req.body)
                if len(upstream_inputs(origin)) and isinstance(sent["input"], list) and len(sent["input"]) > 1:
                    assert sent["encoding_format"] == "base64"
                    assert req.header(b"accept-encoding") == b"identity"
            stats = proxy.gateway.batcher.stats
            assert stats.inputs == 64 and stats.batches == len(origin.requests)
            assert proxy.gateway.batcher.windows == {}


async def test_mixed_input_shapes_keep_their_order_and_batch_by_kind() -> None:
    async with Origin() as origin:
        serve_embeddings(origin, delay=0.05)
        async with running_gateway(batching_toml(origin)) as proxy:
            # One of each kind upstream first (each kind has its own window).
            blockers = [asyncio.ensure_future(embed(proxy.port, first)) for first in ("first, alone", [0])]
            await wait_until(lambda: len(origin.requests) == 2)
            shapes: List[Any] = [
                "one string",
                ["a", "list", "of strings"],
                [1, 2, 3, 4],
                [[5, 6], [7, 8, 9]],
                ["more", "strings"],
                [10, 11],
            ]
            responses = await asyncio.gather(*(embed(proxy.port, s) for s in shapes))
            await asyncio.gather(*blockers)
            for shape, resp in zip(shapes, responses):
                assert resp.status == 200, resp.body
                want = alone(shape)
                assert resp.json()["data"] == want["data"]  # order, indices from 0, values
            # Strings with strings, token arrays with token arrays: two batches.
            kinds = [json.loads(r.body)["input"] for r in origin.requests[2:]]
            assert len(kinds) == 2
            strings = [k for k in kinds if isinstance(k[0], str)]
            tokens = [k for k in kinds if isinstance(k[0], list)]
            assert strings == [["one string", "a", "list", "of strings", "more", "strings"]]
            assert tokens == [[[1, 2, 3, 4], [5, 6], [7, 8, 9], [10, 11]]]


async def test_a_poison_input_fails_only_its_own_caller() -> None:
    async with Origin() as origin:
        serve_embeddings(origin, delay=0.05)
        async with running_gateway(batching_toml(origin)) as proxy:
            blocker = asyncio.ensure_future(embed(proxy.port, "first, alone"))
            await wait_until(lambda: len(origin.requests) == 1)
            texts = ["fine one", "POISON here", "fine two", "fine three"]
            responses = await asyncio.gather(*(embed(proxy.port, t) for t in texts))
            await blocker
            for text, resp in zip(texts, responses):
                if "POISON" in text:
                    assert resp.status == 400 and resp.json()["error"]["message"] == "bad input"
                else:
                    assert resp.status == 200 and resp.json()["data"][0]["embedding"] == vector(text)
                    assert resp.header(b"x-pyproxy-batch") == b"1"  # answered alone, after the 400
            # The batch, then each member alone.
            assert upstream_inputs(origin) == [1, 4, 1, 1, 1, 1]
            assert proxy.gateway.batcher.stats.fallbacks == {"client_error": 4}


async def test_a_caller_that_leaves_loses_its_place_and_the_batch_goes_on() -> None:
    async with Origin() as origin:
        serve_embeddings(origin, delay=0.2)
        async with running_gateway(batching_toml(origin, max_wait_ms=1000)) as proxy:
            blocker = asyncio.ensure_future(embed(proxy.port, "first, alone"))
            await wait_until(lambda: len(origin.requests) == 1)
            # One leaves while it waits for its batch, one while its batch is upstream.
            leaves_waiting = await Client.connect(proxy.port)
            await leaves_waiting.send_request(
                b"POST", EMBEDDINGS, JSON, b'{"model":"text-embedding-3-small","input":"w"}'
            )
            stays = asyncio.ensure_future(embed(proxy.port, "stays"))
            await wait_until(lambda: sum(len(w.pending) for w in proxy.gateway.batcher.windows.values()) == 2)
            await leaves_waiting.close()
            await wait_until(lambda: sum(len(w.pending) for w in proxy.gateway.batcher.windows.values()) == 1)
            await blocker  # its return sends the waiting batch: just "stays"
            await wait_until(lambda: len(origin.requests) == 2)
            assert json.loads(origin.requests[1].body)["input"] == "stays"
            resp = await stays
            assert resp.status == 200 and resp.json()["data"][0]["embedding"] == vector("stays")

            blocker = asyncio.ensure_future(embed(proxy.port, "second blocker"))
            await wait_until(lambda: len(origin.requests) == 3)
            leaves_upstream = await Client.connect(proxy.port)
            await leaves_upstream.send_request(
                b"POST", EMBEDDINGS, JSON, b'{"model":"text-embedding-3-small","input":"u"}'
            )
            others = [asyncio.ensure_future(embed(proxy.port, f"other {i}")) for i in range(3)]
            await wait_until(lambda: sum(len(w.pending) for w in proxy.gateway.batcher.windows.values()) == 4)
            await blocker
            await wait_until(lambda: len(origin.requests) == 4)  # the batch of four is upstream
            await leaves_upstream.close()
            for i, task in enumerate(others):
                resp = await task
                assert resp.status == 200 and resp.json()["data"][0]["embedding"] == vector(f"other {i}")
                assert resp.header(b"x-pyproxy-batch") == b"4"
            await wait_until(lambda: proxy.gateway.batcher.windows == {})


async def test_a_sequential_client_never_waits_and_its_request_goes_as_sent() -> None:
    async with Origin() as origin:
        serve_embeddings(origin)
        # A long max_wait_ms: a request that waited for it would show in the time.
        async with running_gateway(batching_toml(origin, max_wait_ms=2000)) as proxy:
            loop = asyncio.get_running_loop()
            started = loop.time()
            for i in range(20):
                body = b'{"model":"text-embedding-3-small",  "input": ["seq %d"], "user":"u"}' % i
                resp = await request(proxy.port, b"POST", EMBEDDINGS, JSON, body)
                assert resp.status == 200 and resp.header(b"x-pyproxy-batch") == b"1"
                assert origin.requests[-1].body == body  # byte-identical: nothing was rebuilt
                assert resp.json()["data"][0]["embedding"] == vector(f"seq {i}")
            assert loop.time() - started < 2.0  # no request waited for a batch window
            assert proxy.gateway.batcher.stats.wait.count == 20


async def test_requests_that_differ_in_parameters_or_credentials_never_share_a_batch() -> None:
    async with Origin() as origin:
        serve_embeddings(origin, delay=0.05)
        async with running_gateway(batching_toml(origin)) as proxy:
            variants = [
                (b"Bearer one", {}),
                (b"Bearer two", {}),  # pass-through credentials: only with its own
                (b"Bearer one", {"dimensions": 4}),
                (b"Bearer one", {"user": "someone"}),
            ]

            async def send(number: int, copy: int):
                key, fields = variants[number]
                text = f"variant {number} copy {copy}"
                body = json.dumps(dict({"model": "text-embedding-3-small", "input": text}, **fields)).encode()
                return await request(proxy.port, b"POST", EMBEDDINGS, JSON + [(b"authorization", key)], body)

            responses = await asyncio.gather(*(send(n, c) for n in range(len(variants)) for c in range(4)))
            assert all(r.status == 200 for r in responses)
            shared = 0
            for req in origin.requests:
                sent = json.loads(req.body)
                texts = [sent["input"]] if isinstance(sent["input"], str) else sent["input"]
                numbers = {int(t.split()[1]) for t in texts}
                assert len(numbers) == 1, texts  # one variant per upstream request
                key, fields = variants[numbers.pop()]
                assert req.header(b"authorization") == key
                assert {k: sent[k] for k in fields} == fields
                shared += len(texts) > 1
            assert shared >= len(variants)  # each variant batched, apart from the others


async def test_a_request_over_the_limits_goes_alone_and_limits_split_batches() -> None:
    async with Origin() as origin:
        serve_embeddings(origin, delay=0.05)
        async with running_gateway(batching_toml(origin, "max_inputs = 3")) as proxy:
            resp = await embed(proxy.port, ["x", "y", "z", "w"])  # four inputs: alone
            assert resp.status == 200 and resp.header(b"x-pyproxy-batch") == b"4"
            assert proxy.gateway.batcher.stats.fallbacks == {"too_large": 1}
            blocker = asyncio.ensure_future(embed(proxy.port, "first"))
            await wait_until(lambda: len(origin.requests) == 2)
            responses = await asyncio.gather(*(embed(proxy.port, f"t{i}") for i in range(7)))
            await blocker
            assert all(r.status == 200 for r in responses)
            assert sorted(upstream_inputs(origin)[2:]) == [1, 3, 3]


async def test_metrics_count_batches_inputs_waits_and_fallbacks() -> None:
    from pyproxy.metrics import merge_snapshots, render, snapshot

    async with Origin() as origin:
        serve_embeddings(origin, delay=0.05)
        async with running_gateway(batching_toml(origin, "max_inputs = 8"), admin_listen=("127.0.0.1", 0)) as proxy:
            blocker = asyncio.ensure_future(embed(proxy.port, "first"))
            await wait_until(lambda: len(origin.requests) == 1)
            await asyncio.gather(*(embed(proxy.port, f"t{i}") for i in range(3)), embed(proxy.port, ["x"] * 9))
            await blocker
            text = (await request(proxy.admin.port, b"GET", b"/metrics")).body.decode()
            one = snapshot(proxy)
        assert "proxy_batch_requests_total 3.0" in text  # first, the three together, the large one
        assert "proxy_batch_inputs_total 13.0" in text
        assert 'proxy_batch_fallbacks_total{reason="too_large"} 1.0' in text
        assert 'proxy_batch_size_inputs_bucket{le="4.0"} 2.0' in text
        assert "proxy_batch_size_inputs_count 3.0" in text
        assert "proxy_batch_wait_seconds_count 5.0" in text
        # Several workers: summed, histograms included.
        merged, _ = render(lambda: merge_snapshots([one, one]))
        assert "proxy_batch_inputs_total 26.0" in merged.decode()
        assert "proxy_batch_wait_seconds_count 10.0" in merged.decode()


async def test_identical_requests_coalesce_before_batching_and_each_answer_is_cached() -> None:
    async with Origin() as origin:
        serve_embeddings(origin, delay=0.05)
        toml = batching_toml(origin) + (
            '[[cache.rules]]\nmethods = ["POST"]\npath = "/v1/embeddings"\nttl = 60\n'
            '[[dedup.rules]]\nmethods = ["POST"]\npath = "/v1/embeddings"\n'
        )
        async with running_gateway(toml) as proxy:
            blocker = asyncio.ensure_future(embed(proxy.port, "first"))
            await wait_until(lambda: len(origin.requests) == 1)
            texts = ["a", "a", "b", "a", "c"]
            responses = await asyncio.gather(*(embed(proxy.port, t) for t in texts))
            await blocker
            assert sorted(json.loads(origin.requests[1].body)["input"]) == ["a", "b", "c"]  # "a" once
            for text, resp in zip(texts, responses):
                assert resp.status == 200 and resp.json()["data"][0]["embedding"] == vector(text)
            first = {t: r for t, r in zip(texts, responses)}
            for text in ("a", "b", "c", "first"):
                again = await embed(proxy.port, text)
                assert again.header(b"x-cache") == b"HIT", text
                if text != "first":
                    assert again.body == first[text].body  # the caller's own answer, its usage share too
            assert len(origin.requests) == 2


async def test_a_failing_deployment_fails_the_batch_over_and_a_last_error_reaches_everyone() -> None:
    async with Origin() as down, Origin() as up:

        @down.route(EMBEDDINGS)
        async def unavailable(req, reply) -> None:
            await asyncio.sleep(0.05)
            await reply.full(503, b'{"error":{"message":"overloaded"}}', [(b"content-type", b"application/json")])

        serve_embeddings(up, delay=0.05)
        toml = upstreams_toml(down=down, up=up) + (
            '[[models]]\nname = "text-embedding-*"\n'
            'deployments = [{ upstream = "down" }, { upstream = "up", priority = 1 }]\n'
            '[[batching]]\nmodels = ["text-embedding-*"]\nmax_wait_ms = 50\n'
        )
        async with running_gateway(toml) as proxy:
            blocker = asyncio.ensure_future(embed(proxy.port, "first"))
            await wait_until(lambda: len(down.requests) == 1)
            texts = [f"t{i}" for i in range(4)]
            responses = await asyncio.gather(*(embed(proxy.port, t) for t in texts))
            await blocker
            for text, resp in zip(texts, responses):
                assert resp.status == 200 and resp.json()["data"][0]["embedding"] == vector(text)
                assert resp.header(b"x-pyproxy-upstream") == b"up" and resp.header(b"x-pyproxy-attempts") == b"2"
            assert [len(json.loads(r.body)["input"]) for r in up.requests[1:]] == [4]
            assert json.loads(down.requests[1].body)["input"] == texts  # the same batch, tried there first

    async with Origin() as broken:

        @broken.route(EMBEDDINGS)
        async def failing(req, reply) -> None:
            await asyncio.sleep(0.05)
            await reply.full(500, b'{"error":{"message":"internal"}}', [(b"content-type", b"application/json")])

        toml = upstreams_toml(emb=broken) + (
            '[[models]]\nname = "text-embedding-*"\ndeployments = [{ upstream = "emb" }]\n'
            '[[batching]]\nmodels = ["text-embedding-*"]\nmax_wait_ms = 50\n'
        )
        async with running_gateway(toml) as proxy:
            blocker = asyncio.ensure_future(embed(proxy.port, "first"))
            await wait_until(lambda: len(broken.requests) == 1)
            responses = await asyncio.gather(*(embed(proxy.port, f"t{i}") for i in range(3)))
            await blocker
            assert [r.status for r in responses] == [500] * 3
            assert all(r.body == b'{"error":{"message":"internal"}}' for r in responses)
            assert len(broken.requests) == 2  # not retried alone: a 5xx is the batch's, not an input's
