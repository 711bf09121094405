"""Client keys, rate limits and usage reading, without sockets (a fake clock throughout)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import List

import pytest

from pyproxy.config import ConfigError
from pyproxy.gateway import limits as gcra
from pyproxy.gateway.keys import (
    ClientKey,
    KeysError,
    Limits,
    key_entry_toml,
    key_hash,
    new_key,
    parse_keys,
    parse_time,
    presented_key,
)
from pyproxy.gateway.usage import MAX_JSON_BODY, UsageMeter, usage_member_at
from tests.support.gateway import gateway_settings

SSE = [(b"content-type", b"text/event-stream")]
JSON = [(b"content-type", b"application/json")]


def digest_of(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


# --- keys ----------------------------------------------------------------------------------


def test_new_keys_are_random_urlsafe_and_found_by_their_hash_only() -> None:
    key = new_key()
    assert key.startswith("pp-") and len(key) >= 3 + 43 and new_key() != key
    assert all(c.isalnum() or c in "-_" for c in key[3:])
    table = parse_keys({"keys": [{"name": "alice", "hash": key_hash(key), "rpm": 5}]}, "k.toml")
    found = table.lookup(key.encode())
    assert found is not None and found.name == "alice" and found.tenant == "alice" and found.limits.rpm == 5
    assert table.lookup(key[:-1].encode()) is None and table.lookup(b"") is None


def test_found_keys_are_remembered_per_table_and_unknown_ones_never() -> None:
    alice, bob = new_key(), new_key()
    entries = [{"name": "alice", "hash": key_hash(alice)}, {"name": "bob", "hash": key_hash(bob)}]
    table = parse_keys({"keys": entries}, "k.toml")
    for _ in range(3):
        assert table.lookup(alice.encode()).name == "alice"  # type: ignore[union-attr]
    for i in range(100):  # a client trying keys grows nothing
        assert table.lookup(b"pp-guess-%d" % i) is None
    assert table.lookup(bob.encode()).name == "bob"  # type: ignore[union-attr]
    assert sorted(k.name for k in table._found.values()) == ["alice", "bob"]
    # A reload is a new table: a key removed from the file is not found from the old one's.
    reloaded = parse_keys({"keys": entries[1:]}, "k.toml")
    assert reloaded.lookup(alice.encode()) is None and reloaded.lookup(bob.encode()).name == "bob"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "headers,expected",
    [
        ([(b"authorization", b"Bearer pp-abc")], b"pp-abc"),
        ([(b"authorization", b"bearer  pp-abc ")], b"pp-abc"),
        ([(b"x-api-key", b"pp-x")], b"pp-x"),
        ([(b"api-key", b"pp-y")], b"pp-y"),
        ([(b"authorization", b"Basic dXNlcg==")], None),
        ([(b"authorization", b"Bearer ")], None),
        ([], None),
    ],
)
def test_presented_key(headers: List, expected: object) -> None:
    assert presented_key(headers) == expected


@pytest.mark.parametrize(
    "tables,message",
    [
        ({"keys": [{"name": "a", "key": "pp-plain"}]}, "plaintext key is not stored"),
        ({"keys": [{"name": "a", "hash": "pp-plain"}]}, "plaintext key is not stored"),
        ({"keys": [{"name": "a", "hash": "sha256:abc"}]}, "expected sha256:<64 lowercase hex>"),
        ({"keys": [{"name": "A b", "hash": digest_of("x")}]}, "keys[0].name"),
        ({"keys": [{"name": "a", "hash": digest_of("x")}, {"name": "a", "hash": digest_of("y")}]}, "used twice"),
        ({"keys": [{"name": "a", "hash": digest_of("x")}, {"name": "b", "hash": digest_of("x")}]}, "same key as 'a'"),
        ({"keys": [{"name": "a", "hash": digest_of("x"), "rpm": 0}]}, "rpm: expected an integer >= 1"),
        ({"keys": [{"name": "a", "hash": digest_of("x"), "expires": "tomorrow"}]}, "RFC 3339"),
        ({"keys": [{"name": "a", "hash": digest_of("x"), "colour": 1}]}, "unknown field 'colour'"),
        ({"users": []}, "unknown table 'users'"),
        ({"tenants": [{"name": "t", "rpm": -1}]}, "tenants[0].rpm"),
    ],
)
def test_bad_keys_files_are_one_line_without_key_material(tables: dict, message: str) -> None:
    with pytest.raises(KeysError) as info:
        parse_keys(tables, "k.toml")
    text = str(info.value)
    assert message in text and "\n" not in text
    assert "pp-plain" not in text and hashlib.sha256(b"x").hexdigest() not in text


def test_expiry_models_and_model_limits() -> None:
    assert parse_time("2027-01-01T00:00:00Z", "e") == 1798761600.0
    assert parse_time("2027-01-01T01:00:00+01:00", "e") == 1798761600.0
    assert parse_time("2027-01-01T00:00:00.5Z", "e") == 1798761600.5
    with pytest.raises(KeysError):
        parse_time("2027-13-01T00:00:00Z", "e")
    table = parse_keys(
        {
            "keys": [
                {
                    "name": "bob",
                    "hash": digest_of("b"),
                    "tenant": "acme",
                    "models": ["gpt-*", "llama"],
                    "expires": "2027-01-01T00:00:00Z",
                    "model_limits": {"gpt-4*": {"rpm": 2}},
                }
            ],
            "tenants": [{"name": "acme", "tpm": 100}],
        },
        "k",
    )
    key = table.lookup(b"b")
    assert key is not None and key.allows("gpt-4o") and key.allows("llama") and not key.allows("claude")
    assert key.limits_on("gpt-4o") == ("gpt-4*", Limits(rpm=2)) and key.limits_on("gpt-3.5") is None
    assert key.usable(1798761599.0) and not key.usable(1798761600.0)
    assert table.tenants["acme"].tpm == 100 and table.tenant_names == ("acme",)


def test_the_entry_keys_new_writes_parses_back() -> None:
    from pyproxy.config import load_toml

    fd, path = tempfile.mkstemp(suffix=".toml")
    key = new_key()
    with os.fdopen(fd, "w") as fh:
        fh.write(key_entry_toml("ci-bot", key_hash(key), "team", ["gpt-*"], Limits(60, 1000, None)))
    try:
        table = parse_keys(load_toml(path), path)
    finally:
        os.unlink(path)
    found = table.lookup(key.encode())
    assert found == ClientKey("ci-bot", found.digest, "team", ("gpt-*",), Limits(60, 1000, None))  # type: ignore[union-attr]


def test_keys_mode_needs_an_upstream_key_everywhere_and_a_loadable_file() -> None:
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "keys.toml"), "w") as fh:
            fh.write(f'[[keys]]\nname = "a"\nhash = "{digest_of("x")}"\n')
        up = '[[upstreams]]\nname = "u"\nurl = "http://127.0.0.1:9"\n'
        with pytest.raises(ConfigError, match="needs an api_key on every upstream; 'u' has none"):
            gateway_settings(up + f'[auth]\nmode = "keys"\nkeys_file = "{d}/keys.toml"\n')
        up_key = up + 'api_key = "k"\n'
        settings = gateway_settings(up_key + f'[auth]\nmode = "keys"\nkeys_file = "{d}/keys.toml"\n')
        assert settings.gateway.auth.table.lookup(b"x").name == "a"  # type: ignore[union-attr]
        with pytest.raises(ConfigError, match="cannot read"):
            gateway_settings(up_key + f'[auth]\nmode = "keys"\nkeys_file = "{d}/missing.toml"\n')
        with pytest.raises(ConfigError, match="auth.mode"):
            gateway_settings(up_key + '[auth]\nmode = "on"\n')
        with pytest.raises(ConfigError, match="needs \\[\\[upstreams\\]\\]"):
            gateway_settings(f'upstream = "http://127.0.0.1:9"\n[auth]\nmode = "keys"\nkeys_file = "{d}/keys.toml"\n')
        auth = f'[auth]\nmode = "keys"\nkeys_file = "{d}/keys.toml"\n'
        models = '[[models]]\nname = "m"\ndeployments = [{ upstream = "u" }]\n'
        inject = up_key + 'stream_usage = "inject"\n'
        assert gateway_settings(inject + models + auth).gateway.upstreams[0].stream_usage == "inject"  # type: ignore[union-attr]
        with pytest.raises(ConfigError, match="upstreams\\[0\\].stream_usage: expected one of off, inject"):
            gateway_settings(up_key + 'stream_usage = "yes"\n' + models + auth)
        shared = gateway_settings(up_key + auth + 'limits_backend = "redis://127.0.0.1:9/0"\ninstances = 4\n')
        assert shared.gateway.auth.limits_local_share == 0.25  # type: ignore[union-attr]
        for bad, message in (
            ('limits_backend = "memcached://x"', "auth.limits_backend: expected 'memory' or a redis:// URL"),
            ("limits_local_share = 1.5", "auth.limits_local_share: expected a fraction in \\(0, 1\\]"),
            ("limits_local_share = 0", "auth.limits_local_share"),
            ("instances = 0", "auth.instances: expected an integer >= 1"),
            ("limits_redis_timeout = -1", "auth.limits_redis_timeout"),
        ):
            with pytest.raises(ConfigError, match=message):
                gateway_settings(up_key + auth + bad + "\n")
        for without in (inject + models, inject + auth):  # no keys, no model routing: nothing to count
            with pytest.raises(ConfigError, match='"inject" is for usage accounting'):
                gateway_settings(without)


# --- limits --------------------------------------------------------------------------------


def bucket(**limits: int) -> gcra.Bucket:
    return gcra.Bucket("k:a", Limits(**limits))


def test_rpm_admits_exactly_the_limit_at_once_then_refills_smoothly() -> None:
    b = bucket(rpm=60)
    now = 1000.0
    results = [gcra.admit([b], 0, now) for _ in range(100)]  # 100 at the same instant
    admitted = [r for r in results if type(r) is gcra.Ticket]
    refused = [r for r in results if type(r) is gcra.Refusal]
    assert len(admitted) == 60 and len(refused) == 40
    assert all(r.reason == gcra.REQUESTS and r.retry_after == pytest.approx(1.0) for r in refused)
    assert gcra.remaining(b, now) == (0, None)
    # One more a second, never a burst at a window's edge.
    assert type(gcra.admit([b], 0, now + 0.99)) is gcra.Refusal
    assert type(gcra.admit([b], 0, now + 1.0)) is gcra.Ticket
    assert type(gcra.admit([b], 0, now + 1.0)) is gcra.Refusal
    assert sum(type(gcra.admit([b], 0, now + 31.0)) is gcra.Ticket for _ in range(100)) == 30
    # Idle for a minute: the whole budget again, no more.
    assert sum(type(gcra.admit([b], 0, now + 200.0)) is gcra.Ticket for _ in range(100)) == 60


def test_a_refusal_by_one_scope_costs_the_others_nothing() -> None:
    key, tenant = bucket(rpm=10), gcra.Bucket("t:acme", Limits(rpm=1))
    assert type(gcra.admit([key, tenant], 0, 0.0)) is gcra.Ticket
    refusal = gcra.admit([key, tenant], 0, 0.0)
    assert type(refusal) is gcra.Refusal and refusal.scope == "t:acme" and refusal.retry_after == pytest.approx(60.0)
    assert gcra.remaining(key, 0.0) == (9, None)  # the key was charged once, not twice


def test_tpm_reserves_then_refunds_or_charges_the_difference() -> None:
    b = bucket(tpm=1000)
    t1 = gcra.admit([b], 600, 0.0)
    assert type(t1) is gcra.Ticket and gcra.remaining(b, 0.0) == (None, 400)
    assert type(gcra.admit([b], 500, 0.0)) is gcra.Refusal  # 600 + 500 > 1000
    gcra.reconcile(t1, 100, 0.0)  # used 100 of the 600 reserved: 500 back
    assert gcra.remaining(b, 0.0) == (None, 900)
    t2 = gcra.admit([b], 500, 0.0)
    assert type(t2) is gcra.Ticket
    gcra.reconcile(t2, 1400, 0.0)  # used far more than reserved: charged, over the limit
    refusal = gcra.admit([b], 1, 0.0)
    assert type(refusal) is gcra.Refusal and refusal.reason == gcra.TOKENS
    assert refusal.retry_after == pytest.approx(30.06)  # 1501 tokens ahead at 1000/min
    gcra.reconcile(t2, 0, 0.0)  # once per ticket
    assert type(gcra.admit([b], 1, 30.06)) is gcra.Ticket


def test_a_refund_after_the_bucket_drained_gives_nothing_twice() -> None:
    b = bucket(tpm=600)
    t = gcra.admit([b], 600, 0.0)
    gcra.reconcile(t, 0, 120.0)  # the stream ended two minutes later
    assert gcra.remaining(b, 120.0) == (None, 600)
    assert sum(type(gcra.admit([b], 100, 120.0)) is gcra.Ticket for _ in range(10)) == 6


def test_max_parallel_and_release_is_idempotent() -> None:
    b = bucket(max_parallel=2)
    t1, t2 = gcra.admit([b], 0, 0.0), gcra.admit([b], 0, 0.0)
    refusal = gcra.admit([b], 0, 0.0)
    assert type(refusal) is gcra.Refusal and refusal.reason == gcra.CONCURRENCY
    gcra.release(t1)  # type: ignore[arg-type]
    gcra.release(t1)  # type: ignore[arg-type]
    assert b.in_flight == 1
    assert type(gcra.admit([b], 0, 0.0)) is gcra.Ticket
    gcra.release(t2)  # type: ignore[arg-type]
    assert b.in_flight == 1


def test_an_estimate_counts_prompt_bytes_and_the_completion_asked_for() -> None:
    assert gcra.estimate_tokens(400, {"max_tokens": 50}, 10_000) == 150
    assert gcra.estimate_tokens(400, {"max_completion_tokens": 7, "max_tokens": 50}, 10_000) == 107
    assert gcra.estimate_tokens(400, {"max_tokens": True}, 10_000) == 100
    assert gcra.estimate_tokens(4_000_000, None, 32_768) == 32_768
    assert gcra.estimate_tokens(0, None, 10) == 1


def test_reset_durations_read_like_openais() -> None:
    assert gcra.duration_bytes(0.0201) == b"21ms"
    assert gcra.duration_bytes(1.0) == b"1s"
    assert gcra.duration_bytes(1.5) == b"1.5s"
    assert gcra.duration_bytes(360) == b"6m0s"


# --- usage ---------------------------------------------------------------------------------


def meter_of(headers: List, chunks: List[bytes], status: int = 200) -> UsageMeter:
    meter = UsageMeter()
    if meter.start(status, headers):
        for chunk in chunks:
            meter.feed(chunk)
        meter.finish()
    return meter


def split_everywhere(data: bytes) -> List[List[bytes]]:
    return [[data[:i], data[i:]] for i in range(1, len(data))]


OPENAI_JSON = json.dumps(
    {
        "id": "c",
        "choices": [{"message": {"content": "usage: none"}}],
        "usage": {
            "prompt_tokens": 12,
            "completion_tokens": 34,
            "total_tokens": 46,
            "prompt_tokens_details": {"cached_tokens": 2},
        },
    }  # fmt: skip
).encode()
ANTHROPIC_JSON = json.dumps(
    {"type": "message", "content": [{"type": "text", "text": "hi"}],
     "usage": {"input_tokens": 10, "cache_creation_input_tokens": 5, "cache_read_input_tokens": 3, "output_tokens": 7}}
).encode()  # fmt: skip
OPENAI_STREAM = (
    b'data: {"choices":[{"delta":{"content":"the usage of"}}]}\n\n'
    b'data: {"choices":[{"delta":{}}],"usage":null}\n\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":21,"total_tokens":30}}\n\n'
    b"data: [DONE]\n\n"
)
ANTHROPIC_STREAM = (
    b"event: message_start\r\n"
    b'data: {"type":"message_start","message":{"usage":{"input_tokens":25,"cache_read_input_tokens":100,"output_tokens":1}}}\r\n\r\n'
    b'event: content_block_delta\r\ndata: {"type":"content_block_delta","delta":{"text":"usage"}}\r\n\r\n'
    b'event: message_delta\r\ndata: {"type":"message_delta","usage":{"output_tokens":15}}\r\n\r\n'
    b'event: message_delta\r\ndata: {"type":"message_delta","usage":{"output_tokens":40}}\r\n\r\n'
    b'event: message_stop\r\ndata: {"type":"message_stop"}\r\n\r\n'
)
RESPONSES_STREAM = (
    b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"x"}\n\n'
    b'event: response.completed\ndata: {"type":"response.completed","response":{"usage":{"input_tokens":3,"output_tokens":4}}}\n\n'
)


@pytest.mark.parametrize(
    "headers,body,expected",
    [
        (JSON, OPENAI_JSON, (12, 34)),
        (JSON, ANTHROPIC_JSON, (18, 7)),
        ([(b"content-type", b"application/json; charset=utf-8")], b'{"object":"list","data":[],"usage":{"prompt_tokens":8,"total_tokens":8}}', (8, None)),
        (SSE, OPENAI_STREAM, (9, 21)),
        (SSE, ANTHROPIC_STREAM, (125, 40)),
        (SSE, RESPONSES_STREAM, (3, 4)),
        (JSON, b'{"id":"no usage here"}', (None, None)),
        (JSON, b"not json", (None, None)),
    ],
)  # fmt: skip
def test_usage_of_both_api_shapes_streamed_and_not_however_the_bytes_are_split(headers, body, expected) -> None:
    for chunks in [[body]] + split_everywhere(body):
        meter = meter_of(headers, chunks)
        assert (meter.input, meter.output) == expected, chunks


def test_usage_of_one_byte_chunks() -> None:
    meter = meter_of(SSE, [bytes([b]) for b in ANTHROPIC_STREAM])
    assert (meter.input, meter.output) == (125, 40)


def test_responses_not_read_for_usage() -> None:
    gz = [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")]
    for headers, status in ((gz, 200), (JSON, 429), ([(b"content-type", b"text/plain")], 200)):
        assert not UsageMeter().start(status, headers)


@pytest.mark.parametrize(
    "body,isolated,expected",
    [
        (OPENAI_JSON, True, (12, 34)),  # nested details: the braces balance further on
        (b'{"usage" :\n {"prompt_tokens":1,"completion_tokens":2}}', True, (1, 2)),
        # A brace inside a string of the usage object: not isolated, the whole is parsed.
        (b'{"usage":{"note":"}{","prompt_tokens":5,"completion_tokens":6}}', False, (5, 6)),
        # "usage" as a string value, then as a member name in a string (escaped quotes).
        (b'{"type":"usage","text":"\\"usage\\": {\\"prompt_tokens\\": 99}","usage":{"prompt_tokens":3}}', True, (3, None)),
        # A later "usage" member that reports nothing (a tool's schema): the whole body.
        (b'{"usage":{"input_tokens":7,"output_tokens":8},"tools":[{"parameters":{"properties":{"usage":{"type":"string"}}}}]}', None, (7, 8)),
        (b'{"usage":null,"x":{"a":1}}', False, (None, None)),
        (b'{"usage":{"prompt_tokens":4', False, (None, None)),  # truncated: no parse, no crash
    ],
)  # fmt: skip
def test_the_usage_object_is_parsed_alone_when_it_can_be_isolated(body: bytes, isolated: object, expected) -> None:
    found = usage_member_at(body, body.rfind(b'"usage"'))
    if isolated is True:
        assert found == json.loads(body)["usage"]
    elif isolated is False:
        assert found is None
    meter = meter_of(JSON, [body])
    assert (meter.input, meter.output) == expected


def test_a_large_body_keeps_only_its_tail_and_still_finds_usage() -> None:
    data = [[0.123456789] * 1536 for _ in range(120)]
    body = json.dumps(
        {"object": "list", "data": data, "model": "e", "usage": {"prompt_tokens": 640, "total_tokens": 640}}
    ).encode()
    assert len(body) > 2 * MAX_JSON_BODY
    meter = UsageMeter()
    meter.start(200, JSON)
    for i in range(0, len(body), 16384):
        meter.feed(body[i : i + 16384])
    assert sum(len(p) for p in meter._parts) <= MAX_JSON_BODY + 64 * 1024 + 16384
    meter.finish()
    assert (meter.input, meter.output) == (640, None)


def test_admission_takes_new_limits_on_reload_and_its_scope_memo_stays_bounded(tmp_path) -> None:
    """Admission keeps each (key, model)'s buckets at hand: a reload must drop them
    (the new caps apply at once), and clients inventing model names must not grow it."""
    import asyncio

    from pyproxy.errors import RateLimited
    from pyproxy.gateway import admission as admission_module
    from pyproxy.gateway.admission import Admission
    from pyproxy.gateway.config import AuthConfig
    from pyproxy.gateway.keys import load_keys

    key = "pp-" + "r" * 43
    path = tmp_path / "keys.toml"

    def write(rpm: int) -> None:
        path.write_text(f'[[keys]]\nname = "alice"\nhash = "{key_hash(key)}"\nrpm = {rpm}\n')

    write(1)
    loop = asyncio.new_event_loop()
    try:
        now = [100.0]
        admission = Admission(AuthConfig("keys", str(path), load_keys(str(path))), loop, clock=lambda: now[0])
        client_key = admission.authenticate([(b"authorization", b"Bearer " + key.encode())])
        admission.admit(client_key, "m", "m", 10, None)
        with pytest.raises(RateLimited):
            admission.admit(client_key, "m", "m", 10, None)
        write(600)  # ten a second: the next request is 0.1 s after the last one's slot
        assert admission.reload("test")
        client_key = admission.authenticate([(b"authorization", b"Bearer " + key.encode())])
        now[0] += 0.1
        admission.admit(client_key, "m", "m", 10, None)
        for i in range(admission_module.MAX_SCOPE_MEMO + 100):
            admission._scopes_of(client_key, f"model-{i}")
        assert len(admission._scopes) <= admission_module.MAX_SCOPE_MEMO
    finally:
        loop.close()
