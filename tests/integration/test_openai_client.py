"""A real client nobody here wrote: the official ``openai`` package through pyproxy."""

from __future__ import annotations

import asyncio
import json
from typing import Any, List

import pytest

from pyproxy._compat import json_loads
from tests.support.client import running_proxy
from tests.support.gateway import running_gateway, upstreams_toml
from tests.support.origin import Origin, Received, Reply

openai = pytest.importorskip("openai", reason="the openai package does not install on this interpreter")

COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "gpt-test",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there!"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
}
WORDS = ["Hel", "lo", " there", "!"]


def _add_chat_route(origin: Origin) -> None:
    @origin.route(b"/v1/chat/completions")
    async def chat(req: Received, reply: Reply) -> None:
        body = json.loads(req.body)
        if not body.get("stream"):
            await reply.full(200, json.dumps(COMPLETION).encode())
            return
        await reply.head(200, [(b"content-type", b"text/event-stream")])
        for word in WORDS:
            chunk = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "gpt-test",
                "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
            }
            await reply.data(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await asyncio.sleep(0.01)
        await reply.data(b"data: [DONE]\n\n")
        await reply.end()


async def test_openai_package_models_chat_and_stream() -> None:
    async with Origin() as origin, running_proxy(origin.url) as proxy:
        _add_chat_route(origin)

        def use_openai() -> List[Any]:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{proxy.port}/v1", api_key="sk-test", max_retries=0)
            try:
                models = [m.id for m in client.models.list()]
                completion = client.chat.completions.create(
                    model="gpt-test", messages=[{"role": "user", "content": "hi"}]
                )
                stream = client.chat.completions.create(
                    model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True
                )
                pieces = [chunk.choices[0].delta.content for chunk in stream if chunk.choices[0].delta.content]
                return [models, completion.choices[0].message.content, pieces]
            finally:
                client.close()

        models, content, pieces = await asyncio.get_running_loop().run_in_executor(None, use_openai)
        assert models == ["gpt-test"]
        assert content == "Hello there!"
        assert pieces == WORDS
        assert [r.target for r in origin.requests] == [b"/v1/models", b"/v1/chat/completions", b"/v1/chat/completions"]
        assert all(r.header(b"authorization") == b"Bearer sk-test" for r in origin.requests)


async def test_openai_client_against_two_upstreams() -> None:
    """Routed by model, renamed per deployment; the client sees the upstream's own model."""
    async with Origin() as a, Origin() as b:
        for origin, name in ((a, "a"), (b, "b")):

            @origin.route(b"/v1/chat/completions")
            async def answer(req: Received, reply: Reply, name: str = name) -> None:
                got = json_loads(req.body)
                body = {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 1,
                    "model": got["model"],
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": name}, "finish_reason": "stop"}
                    ],
                }
                await reply.full(200, json.dumps(body).encode(), [(b"content-type", b"application/json")])

        toml = upstreams_toml(a=a, b=b) + (
            '[[models]]\nname = "m"\ndeployments = [{ upstream = "a", model = "ma" }, { upstream = "b", model = "mb" }]\n'
        )
        async with running_gateway(toml) as proxy:
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{proxy.port}/v1", api_key="sk-test", max_retries=0)
            try:
                seen: List[str] = []
                for _ in range(4):
                    done = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
                    seen.append(done.choices[0].message.content)
                    assert done.model == {"a": "ma", "b": "mb"}[seen[-1]]
                listed = await client.models.list()
                assert [m.id for m in listed.data] == ["m"]
            finally:
                await client.close()


async def test_openai_embeddings_through_batching() -> None:
    """The client asks for base64 by default and decodes it itself: concurrent calls,
    batched upstream, each get their own input's vector."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.support.embeddings import serve_embeddings, vector

    async with Origin() as origin:
        serve_embeddings(origin, delay=0.05)
        toml = upstreams_toml(emb=origin) + (
            '[[models]]\nname = "text-embedding-*"\ndeployments = [{ upstream = "emb" }]\n'
            '[[batching]]\npath = "/v1/embeddings"\nmodels = ["text-embedding-*"]\nmax_wait_ms = 50\n'
        )
        async with running_gateway(toml) as proxy:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{proxy.port}/v1", api_key="sk-test", max_retries=0)
            texts = [f"document {i}" for i in range(12)]

            def embed(text: str) -> Any:
                return client.embeddings.create(model="text-embedding-3-small", input=text)

            loop = asyncio.get_running_loop()
            with ThreadPoolExecutor(len(texts)) as pool:
                results = await asyncio.gather(*(loop.run_in_executor(pool, embed, t) for t in texts))
            client.close()
        for text, result in zip(texts, results):
            assert [item.index for item in result.data] == [0]
            assert result.data[0].embedding == vector(text)
            assert result.usage.prompt_tokens >= 1
        assert len(origin.requests) < len(texts)  # some were batched
        # A batch of several callers asks the upstream for base64 whatever the callers
        # asked (openai 1.x without numpy asks for floats); a request that went alone
        # is the caller's own, byte for byte.
        bodies = [json.loads(r.body) for r in origin.requests]
        batched = [b for b in bodies if isinstance(b["input"], list) and len(b["input"]) > 1]
        assert batched
        assert all(b["encoding_format"] == "base64" for b in batched)


async def test_openai_stream_through_keepalive_pings_and_an_early_head() -> None:
    """The client parses ``: ping`` comments as the comments they are: between every two
    chunks the upstream falls silent until pyproxy has pinged, and before the first one
    it takes long enough for pyproxy's own early head."""
    async with Origin() as origin:
        proxies: List[Any] = []

        def pinged() -> int:
            return proxies[0].stats_sse_pings if proxies else 0

        async def pings_past(count: int) -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while pinged() < count:
                assert loop.time() < deadline, "no ping came"
                await asyncio.sleep(0.01)

        @origin.route(b"/v1/chat/completions")
        async def chat(req: Received, reply: Reply) -> None:
            await pings_past(1)  # prefill: the early head and a ping go out meanwhile
            await reply.head(200, [(b"content-type", b"text/event-stream")])
            for word in WORDS:
                chunk = {
                    "id": "chatcmpl-1",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": "gpt-test",
                    "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
                }
                await reply.data(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                await pings_past(pinged() + 1)
            await reply.data(b"data: [DONE]\n\n")
            await reply.end()

        toml = upstreams_toml(llm=origin) + (
            '[[models]]\nname = "gpt-test"\nearly_head_after = 0.2\ndeployments = [{ upstream = "llm" }]\n'
        )
        async with running_gateway(toml, sse_keepalive=0.2) as proxy:
            proxies.append(proxy)
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{proxy.port}/v1", api_key="sk-test", max_retries=0)
            try:
                stream = await client.chat.completions.create(
                    model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True
                )
                pieces = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices[0].delta.content]
            finally:
                await client.close()
        assert pieces == WORDS
        assert proxy.stats_sse_pings >= len(WORDS) + 1
        assert proxy.gateway is not None and proxy.gateway.early_heads == 1


async def test_openai_client_through_client_keys() -> None:
    """Keys mode with the real client: its key is accepted, usage from a stream with
    include_usage is counted, and pyproxy's 401/403/429 raise the client's own error
    types without a retry (x-should-retry: false on 401/403; 429 is retried by the
    client only when asked to, so max_retries=0 there)."""
    import hashlib
    import os
    import tempfile

    from pyproxy.gateway.keys import key_hash, new_key

    async with Origin() as origin:

        @origin.route(b"/v1/chat/completions")
        async def chat(req: Received, reply: Reply) -> None:
            body = json.loads(req.body)
            usage = {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
            if not body.get("stream"):
                await reply.full(200, json.dumps(dict(COMPLETION, usage=usage)).encode())
                return
            await reply.head(200, [(b"content-type", b"text/event-stream")])
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
            for word in WORDS:
                delta = dict(chunk, choices=[{"index": 0, "delta": {"content": word}, "finish_reason": None}])
                await reply.data(b"data: " + json.dumps(delta).encode() + b"\n\n")
            if (body.get("stream_options") or {}).get("include_usage"):
                await reply.data(b"data: " + json.dumps(dict(chunk, choices=[], usage=usage)).encode() + b"\n\n")
            await reply.data(b"data: [DONE]\n\n")
            await reply.end()

        alice, bob = new_key(), new_key()
        folder = tempfile.mkdtemp(prefix="pyproxy-keys-")
        keys_file = os.path.join(folder, "keys.toml")
        with open(keys_file, "w") as fh:
            fh.write(f'[[keys]]\nname = "alice"\nhash = "{key_hash(alice)}"\nrpm = 2\n')
            fh.write(f'[[keys]]\nname = "bob"\nhash = "{key_hash(bob)}"\nmodels = ["other"]\n')
        toml = (
            f'[[upstreams]]\nname = "up"\nurl = "{origin.url}"\napi_key = "sk-upstream"\n'
            '[[models]]\nname = "gpt-test"\ndeployments = [{ upstream = "up" }]\n'
            f'[auth]\nmode = "keys"\nkeys_file = "{keys_file}"\n'
        )
        async with running_gateway(toml) as proxy:
            base = f"http://127.0.0.1:{proxy.port}/v1"
            messages = [{"role": "user", "content": "hi"}]
            client = openai.AsyncOpenAI(base_url=base, api_key=alice, max_retries=0)
            try:
                done = await client.chat.completions.create(model="gpt-test", messages=messages)
                assert done.usage.total_tokens == 6
                stream = await client.chat.completions.create(
                    model="gpt-test", messages=messages, stream=True, stream_options={"include_usage": True}
                )
                chunks = [chunk async for chunk in stream]
                assert chunks[-1].usage.completion_tokens == 2
                assert [c.choices[0].delta.content for c in chunks if c.choices] == WORDS
                await client.models.list()  # answered by pyproxy: not a request of the limit
                with pytest.raises(openai.RateLimitError) as limited:
                    await client.chat.completions.create(model="gpt-test", messages=messages)
                assert limited.value.code == "rate_limit_exceeded"
                assert int(limited.value.response.headers["retry-after"]) >= 1
            finally:
                await client.close()
            answered = sum(proxy.metrics.requests.values())
            for key, error in (("pp-not-a-key", openai.AuthenticationError), (bob, openai.PermissionDeniedError)):
                retrying = openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=2)
                try:
                    with pytest.raises(error):
                        await retrying.chat.completions.create(model="gpt-test", messages=messages)
                finally:
                    await retrying.close()
            assert sum(proxy.metrics.requests.values()) == answered + 2  # no retries
            usage = proxy.gateway.admission.snapshot()["per_key"]["alice"]  # type: ignore[union-attr]
            assert usage == {"requests": 2, "input_tokens": 8, "output_tokens": 4, "estimated": 0}
            assert all(r.header(b"authorization") == b"Bearer sk-upstream" for r in origin.requests)
            assert hashlib.sha256(alice.encode()).hexdigest() not in json.dumps(proxy.gateway.admission.snapshot())  # type: ignore[union-attr]


async def test_openai_client_stream_with_usage_injected_sees_no_usage_chunk() -> None:
    """stream_usage = "inject": the client streams without stream_options, pyproxy asks
    the upstream for usage and counts it, and the client's chunks are those it would
    get without pyproxy (no usage chunk, no usage field)."""
    import os
    import tempfile

    from pyproxy.gateway.keys import key_hash, new_key

    async with Origin() as origin:
        asked: List[Any] = []

        @origin.route(b"/v1/chat/completions")
        async def chat(req: Received, reply: Reply) -> None:
            body = json.loads(req.body)
            asked.append(body.get("stream_options"))
            include = (body.get("stream_options") or {}).get("include_usage") is True
            await reply.head(200, [(b"content-type", b"text/event-stream")])
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-test"}
            for word in WORDS:
                delta = dict(chunk, choices=[{"index": 0, "delta": {"content": word}, "finish_reason": None}])
                if include:
                    delta["usage"] = None
                await reply.data(b"data: " + json.dumps(delta).encode() + b"\n\n")
            if include:
                usage = {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}
                await reply.data(b"data: " + json.dumps(dict(chunk, choices=[], usage=usage)).encode() + b"\n\n")
            await reply.data(b"data: [DONE]\n\n")
            await reply.end()

        alice = new_key()
        keys_file = os.path.join(tempfile.mkdtemp(prefix="pyproxy-keys-"), "keys.toml")
        with open(keys_file, "w") as fh:
            fh.write(f'[[keys]]\nname = "alice"\nhash = "{key_hash(alice)}"\n')
        toml = (
            f'[[upstreams]]\nname = "up"\nurl = "{origin.url}"\napi_key = "sk-upstream"\nstream_usage = "inject"\n'
            '[[models]]\nname = "gpt-test"\ndeployments = [{ upstream = "up" }]\n'
            f'[auth]\nmode = "keys"\nkeys_file = "{keys_file}"\n'
        )
        async with running_gateway(toml) as proxy:
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{proxy.port}/v1", api_key=alice, max_retries=0)
            try:
                stream = await client.chat.completions.create(
                    model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True
                )
                chunks = [chunk async for chunk in stream]
            finally:
                await client.close()
            assert [c.choices[0].delta.content for c in chunks] == WORDS  # every chunk has its choice
            assert all(c.usage is None and "usage" not in (c.model_extra or {}) for c in chunks)
            assert all("usage" not in c.model_dump(exclude_unset=True) for c in chunks)
            assert asked == [{"include_usage": True}]
            usage = proxy.gateway.admission.snapshot()["per_key"]["alice"]  # type: ignore[union-attr]
            assert usage == {"requests": 1, "input_tokens": 4, "output_tokens": 4, "estimated": 0}
