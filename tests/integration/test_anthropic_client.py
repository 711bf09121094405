"""Anthropic's own client through pyproxy's client keys: x-api-key is pyproxy's key,
the upstream gets its own, and the Messages API's usage -- JSON and streamed
(message_start's input, message_delta's cumulative output) -- is counted."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Dict

import pytest

from tests.support.gateway import running_gateway
from tests.support.origin import Origin, Received, Reply

anthropic = pytest.importorskip("anthropic", reason="the anthropic package does not install on this interpreter")

MESSAGE: Dict[str, Any] = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-test",
    "content": [{"type": "text", "text": "Hello!"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 10, "output_tokens": 3},
}


def sse(event: str, data: Dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + json.dumps(data).encode() + b"\n\n"


def messages_route(origin: Origin) -> None:
    @origin.route(b"/v1/messages")
    async def messages(req: Received, reply: Reply) -> None:
        if not json.loads(req.body).get("stream"):
            await reply.full(200, json.dumps(MESSAGE).encode(), [(b"content-type", b"application/json")])
            return
        await reply.head(200, [(b"content-type", b"text/event-stream")])
        start = dict(MESSAGE, content=[], stop_reason=None, usage={"input_tokens": 20, "output_tokens": 1})
        await reply.data(sse("message_start", {"type": "message_start", "message": start}))
        block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        await reply.data(sse("content_block_start", block))
        for word in ("Hel", "lo", "!"):
            delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}}
            await reply.data(sse("content_block_delta", delta))
        await reply.data(sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
        for output in (2, 5):  # cumulative: the last one is the count
            end = {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                   "usage": {"output_tokens": output}}  # fmt: skip
            await reply.data(sse("message_delta", end))
        await reply.data(sse("message_stop", {"type": "message_stop"}))
        await reply.end()


async def test_anthropic_client_through_client_keys() -> None:
    from pyproxy.gateway.keys import key_hash, new_key

    async with Origin() as origin:
        messages_route(origin)
        alice = new_key()
        folder = tempfile.mkdtemp(prefix="pyproxy-keys-")
        keys_file = os.path.join(folder, "keys.toml")
        with open(keys_file, "w") as fh:
            fh.write(f'[[keys]]\nname = "alice"\nhash = "{key_hash(alice)}"\ntpm = 100000\n')
        toml = (
            f'[[upstreams]]\nname = "claude"\nurl = "{origin.url}"\napi_key = "sk-ant-upstream"\n'
            'auth_header = "x-api-key"\n'
            '[[models]]\nname = "claude-*"\ndeployments = [{ upstream = "claude" }]\n'
            f'[auth]\nmode = "keys"\nkeys_file = "{keys_file}"\n'
        )
        async with running_gateway(toml) as proxy:
            base = f"http://127.0.0.1:{proxy.port}"
            client = anthropic.AsyncAnthropic(base_url=base, api_key=alice, max_retries=0)
            messages = [{"role": "user", "content": "hi"}]
            try:
                done = await client.messages.create(model="claude-test", max_tokens=50, messages=messages)
                assert done.content[0].text == "Hello!" and done.usage.output_tokens == 3
                async with client.messages.stream(model="claude-test", max_tokens=50, messages=messages) as stream:
                    text = "".join([piece async for piece in stream.text_stream])
                    final = await stream.get_final_message()
                assert text == "Hello!" and final.usage.output_tokens == 5
            finally:
                await client.close()
            stranger = anthropic.AsyncAnthropic(base_url=base, api_key="sk-ant-not-a-key", max_retries=2)
            try:
                with pytest.raises(anthropic.AuthenticationError):
                    await stranger.messages.create(model="claude-test", max_tokens=5, messages=messages)
            finally:
                await stranger.close()
            assert len(origin.requests) == 2  # the refused one never went upstream, nor was retried
            for received in origin.requests:
                assert received.header(b"x-api-key") == b"sk-ant-upstream"
                assert received.header(b"anthropic-version") is not None  # the client's own fields pass
            usage = proxy.gateway.admission.snapshot()["per_key"]["alice"]  # type: ignore[union-attr]
            assert usage == {"requests": 2, "input_tokens": 30, "output_tokens": 8, "estimated": 0}
            dump = json.dumps(proxy.gateway.admission.snapshot())  # type: ignore[union-attr]
            assert alice not in dump and hashlib.sha256(alice.encode()).hexdigest() not in dump
