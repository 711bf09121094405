"""pytest-benchmark regression checks of the hot units, without sockets.

Not part of the normal test run (they live outside ``tests/``). CI runs them
once with ``--benchmark-disable`` so they never rot; to guard against a
slowdown, save a baseline per interpreter and compare against it:

    tox -e bench-pypy3 -- --benchmark-save=baseline
    tox -e bench-pypy3 -- --benchmark-compare --benchmark-compare-fail=mean:20%

(pytest-benchmark keeps one storage folder per interpreter and machine.)
"""

from __future__ import annotations

import asyncio
from typing import Any, List

import h11
import pytest

from pyproxy.cache.entry import FRESH
from pyproxy.cache.layer import Cache
from pyproxy.cache.policy import decide_storage
from pyproxy.config import Settings, parse_upstream
from pyproxy.http.fastpath import (
    parse_request_head,
    parse_response_head,
    serialize_request_head,
    serialize_response_head,
)
from pyproxy.http.headers import RequestFraming, client_response_headers, upstream_request_headers
from pyproxy.http.messages import RequestHead
from pyproxy.metrics import DURATION_BUCKETS, RequestMetrics
from pyproxy.routing import Router
from pyproxy.upstream.connection import ACTIVE, UpstreamConnection
from pyproxy.upstream.pool import ConnectionPool

REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: OpenAI/Python 1.55.0\r\n"
    b"Accept: application/json\r\nContent-Type: application/json\r\nAuthorization: Bearer sk-test-0123456789\r\n"
    b"X-Stainless-Lang: python\r\nX-Stainless-Package-Version: 1.55.0\r\nContent-Length: 120\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nDate: Fri, 27 Nov 2026 10:00:00 GMT\r\nContent-Type: application/json\r\n"
    b"Content-Length: 600\r\nConnection: keep-alive\r\nopenai-processing-ms: 120\r\nx-request-id: req_123\r\n"
    b"x-ratelimit-remaining-requests: 9999\r\n\r\n"
)
FRAMING = RequestFraming(120, False)


def relay_request_fast() -> bytes:
    head = parse_request_head(REQUEST)
    assert not isinstance(head, str)
    headers = upstream_request_headers(
        head.headers, upstream_host=b"upstream:8000", client_ip=b"127.0.0.1", scheme=b"http", framing=FRAMING
    )
    return serialize_request_head(head.method, head.target, headers)


def relay_request_h11() -> bytes:
    """The reference: the same work done with h11 on both sides."""
    server = h11.Connection(h11.SERVER)
    server.receive_data(REQUEST)
    request = server.next_event()
    headers = upstream_request_headers(
        list(request.headers), upstream_host=b"upstream:8000", client_ip=b"127.0.0.1", scheme=b"http", framing=FRAMING
    )
    client = h11.Connection(h11.CLIENT)
    return client.send(h11.Request(method=request.method, target=request.target, headers=headers))  # type: ignore


def relay_response_fast() -> bytes:
    head = parse_response_head(RESPONSE, b"POST")
    assert not isinstance(head, str)
    return serialize_response_head(head.status, head.reason, client_response_headers(head.headers))


def test_request_parse_and_reframe_fast(benchmark: Any) -> None:
    out = benchmark(relay_request_fast)
    assert out.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nhost: upstream:8000\r\n")


def test_request_parse_and_reframe_h11_reference(benchmark: Any) -> None:
    out = benchmark(relay_request_h11)
    assert out.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")


def test_response_head_relay_fast(benchmark: Any) -> None:
    out = benchmark(relay_response_fast)
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 600" in out


def test_header_rewrite(benchmark: Any) -> None:
    head = parse_request_head(REQUEST)
    assert not isinstance(head, str)
    out = benchmark(
        upstream_request_headers,
        head.headers,
        upstream_host=b"upstream:8000",
        client_ip=b"127.0.0.1",
        scheme=b"http",
        framing=FRAMING,
    )
    assert (b"via", b"1.1 pyproxy") in out


class _Transport(asyncio.Transport):
    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


@pytest.fixture
def pool() -> Any:
    loop = asyncio.new_event_loop()
    settings = Settings(upstream=parse_upstream("http://127.0.0.1:9"))
    assert settings.upstream is not None
    pool = ConnectionPool(settings.upstream, settings, loop)
    conns: List[UpstreamConnection] = []
    for _ in range(8):
        conn = UpstreamConnection(pool, loop, 300.0)
        conn.transport = _Transport()
        conn.state = ACTIVE
        pool.active.add(conn)
        conns.append(conn)
    for conn in conns:
        pool.release(conn)
    yield pool
    pool.close()
    loop.close()


def test_pool_checkout_checkin(benchmark: Any, pool: ConnectionPool) -> None:
    def cycle() -> None:
        conn = pool.take_idle()
        assert conn is not None
        pool.release(conn)

    benchmark(cycle)
    assert len(pool.idle) == 8


@pytest.fixture
def warm_cache() -> Any:
    loop = asyncio.new_event_loop()
    settings = Settings(upstream=parse_upstream("http://127.0.0.1:9"))
    cache = Cache(settings, loop)
    router = Router(settings)
    request = RequestHead(b"GET", b"/v1/models", [(b"host", b"x"), (b"authorization", b"Bearer sk-test-0123456789")])
    plan = router.plan(request, False)
    assert plan is not None
    recording = cache.recording(plan.cache_key, plan.method, plan.cache_rule, plan.headers)
    assert recording.begin(200, b"OK", [(b"content-type", b"application/json"), (b"content-length", b"600")])
    recording.finish(b"x" * 600)
    yield router, cache, request
    loop.close()


def test_cache_hit_path(benchmark: Any, warm_cache: Any) -> None:
    """What a hit costs besides the socket write: plan, lookup, judge, the response bytes."""
    router, cache, request = warm_cache

    def hit() -> bytes:
        plan = router.plan(request, False)
        entry = cache.lookup_now(plan.cache_key, plan.headers)
        assert cache.judge(entry, plan.headers) is FRESH
        return entry.response_head(b"HIT", int(entry.age(cache.clock())), False) + entry.wire

    out = benchmark(hit)
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"x" * 600)


def test_storage_decision(benchmark: Any) -> None:
    headers = client_response_headers(parse_response_head(RESPONSE, b"GET").headers)  # type: ignore[union-attr]
    headers.insert(0, (b"cache-control", b"public, max-age=60, stale-while-revalidate=30"))
    freshness, _ = benchmark(
        lambda: decide_storage(
            method=b"GET", status=200, request_headers=[], response_headers=headers, rule=None, now=1.8e9
        )
    )
    assert freshness is not None and freshness.lifetime == 60.0


def test_request_metrics(benchmark: Any) -> None:
    """What each finished request costs the metrics: plain dicts and lists."""
    metrics = RequestMetrics()
    benchmark(metrics.request_done, "/v1/chat/completions", "POST", 200, 0.0123, 0.0101, 512, 2048)
    assert sum(metrics.requests.values()) >= 1


def test_request_metrics_prometheus_client_reference(benchmark: Any) -> None:
    """The same observations through prometheus_client's own metric objects (the
    reference the choice above was measured against)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    registry = CollectorRegistry()
    requests = Counter("r", "r", ["endpoint", "method", "status"], registry=registry)
    duration = Histogram("d", "d", ["endpoint", "method"], registry=registry, buckets=DURATION_BUCKETS)
    ttfb = Histogram("t", "t", ["endpoint"], registry=registry, buckets=DURATION_BUCKETS)
    bytes_in = Counter("bi", "bi", registry=registry)
    bytes_out = Counter("bo", "bo", registry=registry)

    def observe() -> None:
        requests.labels("/v1/chat/completions", "POST", "200").inc()
        duration.labels("/v1/chat/completions", "POST").observe(0.0123)
        ttfb.labels("/v1/chat/completions").observe(0.0101)
        bytes_in.inc(512)
        bytes_out.inc(2048)

    benchmark(observe)


# --- the gateway's and the cache's newer hot units ---------------------------------------


def test_gateway_choose_uniform(benchmark: Any) -> None:
    """P2C over three equal deployments: the draw-two-first path every request takes."""
    import random

    from pyproxy.gateway.balancer import choose
    from pyproxy.gateway.config import Deployment
    from pyproxy.gateway.state import UpstreamState

    deployments = (Deployment("a"), Deployment("b"), Deployment("c"))
    states = {d.upstream: UpstreamState(d.upstream, 100) for d in deployments}
    rng = random.Random(1)
    assert benchmark(choose, deployments, states, 0.0, rng, (), True) is not None


def test_http_date_parse(benchmark: Any) -> None:
    from pyproxy.http.dates import parse_http_date

    assert benchmark(parse_http_date, b"Sun, 06 Nov 1994 08:49:37 GMT") == 784111777.0


def test_revalidation_fields(benchmark: Any) -> None:
    """The conditional fields made for a stale entry, and the 304's field update."""
    from pyproxy.cache.validation import conditional_headers, freshened_headers

    stored = [(b"content-type", b"text/plain"), (b"etag", b'"v1"'), (b"cache-control", b"max-age=1")]
    not_modified = [(b"cache-control", b"max-age=60"), (b"etag", b'"v1"')]

    def both() -> Any:
        return conditional_headers(stored, ()), freshened_headers(stored, not_modified)

    fields, merged = benchmark(both)
    assert fields == [(b"if-none-match", b'"v1"')] and (b"cache-control", b"max-age=60") in merged


@pytest.fixture
def varied_cache() -> Any:
    """A key with four stored Vary variants (the per-key bound), by Accept-Language."""
    loop = asyncio.new_event_loop()
    settings = Settings(upstream=parse_upstream("http://127.0.0.1:9"))
    cache = Cache(settings, loop)
    router = Router(settings)
    requests = []
    for language in (b"en", b"de", b"fr", b"ja"):
        request = RequestHead(b"GET", b"/v1/models", [(b"host", b"x"), (b"accept-language", language)])
        plan = router.plan(request, False)
        assert plan is not None
        recording = cache.recording(plan.cache_key, plan.method, plan.cache_rule, plan.headers)
        headers = [(b"content-type", b"application/json"), (b"vary", b"accept-language"), (b"content-length", b"600")]
        assert recording.begin(200, b"OK", headers)
        recording.finish(language * 300)
        requests.append(request)
    yield router, cache, requests[1]
    loop.close()


def test_cache_vary_hit_path(benchmark: Any, varied_cache: Any) -> None:
    """A hit on one of several variants: the marker, the variant key, the Vary check."""
    router, cache, request = varied_cache

    def hit() -> bytes:
        plan = router.plan(request, False)
        entry = cache.lookup_now(plan.cache_key, plan.headers)
        assert cache.judge(entry, plan.headers) is FRESH
        return entry.wire

    assert benchmark(hit).endswith(b"de" * 300)


def test_range_decision(benchmark: Any) -> None:
    """The Range field found, parsed against the stored length, and its Content-Range."""
    from pyproxy.cache.ranges import content_range, range_field, single_byte_range

    headers = [(b"host", b"x"), (b"accept", b"*/*"), (b"range", b"bytes=1024-2047")]

    def decide() -> bytes:
        wanted = single_byte_range(range_field(headers), 1 << 20)  # type: ignore[arg-type]
        assert type(wanted) is tuple
        return content_range(wanted[0], wanted[1], 1 << 20)

    assert benchmark(decide) == b"bytes 1024-2047/1048576"


# --- client keys: what [auth] mode = "keys" adds to a request ----------------------------


def _admission() -> Any:
    from pyproxy.gateway.admission import Admission
    from pyproxy.gateway.config import AuthConfig
    from pyproxy.gateway.keys import key_hash, parse_keys

    key = "pp-" + "k" * 43
    table = parse_keys(
        {"keys": [{"name": "alice", "hash": key_hash(key), "rpm": 10**9, "tpm": 10**12, "max_parallel": 10**6}]},
        "keys.toml",
    )
    admission = Admission(AuthConfig("keys", "/nonexistent/keys.toml", table), asyncio.new_event_loop())
    return admission, [(b"authorization", b"Bearer " + key.encode())]


def test_client_key_admission_json(benchmark: Any) -> None:
    """One chat request under a key with rpm, tpm and max_parallel: authenticate,
    admit (reserve), meter a JSON answer's usage, release and reconcile."""
    admission, headers = _admission()
    body_value = {"model": "m", "max_tokens": 16}
    answer = b'{"id":"c","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":9,"completion_tokens":3}}'
    head = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]

    def one() -> Any:
        key = admission.authenticate(headers)
        admitted = admission.admit(key, "m", "m", 120, body_value)
        meter = admitted.on_head(200, list(head))
        meter.feed(answer)
        return admission.done(admitted, 200, b"", b"")

    fields = benchmark(one)
    assert fields["usage"] == "reported" and fields["output_tokens"] == 3
    admission.loop.close()


def test_client_key_admission_sse(benchmark: Any) -> None:
    """The same for a 20-event stream whose last event carries usage."""
    admission, headers = _admission()
    body_value = {"model": "m", "stream": True, "max_tokens": 16}
    events = [b'data: {"choices":[{"delta":{"content":"tok"}}]}\n\n'] * 19
    events.append(b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":19}}\n\ndata: [DONE]\n\n')
    head = [(b"content-type", b"text/event-stream")]

    def one() -> Any:
        key = admission.authenticate(headers)
        admitted = admission.admit(key, "m", "m", 120, body_value)
        meter = admitted.on_head(200, list(head))
        for event in events:
            meter.feed(event)
        return admission.done(admitted, 200, b"", b"")

    fields = benchmark(one)
    assert fields["usage"] == "reported" and fields["output_tokens"] == 19
    admission.loop.close()


def test_shared_admission_batch_command(benchmark: Any) -> None:
    """limits_backend = Redis: one loop iteration's 20 admissions as one script call
    (the scopes' parts encoded once per key and model), and its reply parsed."""
    from pyproxy.gateway.keys import Limits
    from pyproxy.gateway.shared_limits import LEASE_TTL, ScopeSet
    from pyproxy.resp import Command, RespParser

    scopes = ScopeSet([("k:alice", Limits(600, 200000, 8)), ("t:acme", Limits(3000, 10**6, None))])
    reply = (
        b"*20\r\n"
        + b"*4\r\n:1\r\n$16\r\n1796409165123456\r\n$16\r\n1796409166123456\r\n$16\r\n1796409165123456\r\n" * 20
    )

    def one() -> Any:
        command = Command()
        command.arg(int(LEASE_TTL * 1e6))
        command.arg(20)
        for i in range(20):
            command.arg(2)
            command.arg(150)
            command.arg(b"0123456789ab:%d" % i)
            command.encoded_args(scopes.admit_args, 6)
            command.encoded_keys(scopes.admit_keys, 6)
        wire = command.wire(b"EVALSHA", b"0" * 40)
        return wire, RespParser().feed(reply)

    wire, replies = benchmark(one)
    # verb, sha, key count; 6 keys and 3 + 6 arguments an admission; TTL and count
    assert wire.startswith(b"*%d\r\n" % (3 + 6 * 20 + 2 + (3 + 6) * 20)) and len(replies[0]) == 20


def test_usage_strip_of_an_injected_stream(benchmark: Any) -> None:
    """stream_usage = "inject": a 20-event stream with "usage": null in every chunk
    and the usage chunk at its end, stripped as it passes."""
    from pyproxy.gateway.stream_usage import UsageChunkStrip

    chunk = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"tok"}}],"usage":null}\n\n'
    last = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":19}}\n\ndata: [DONE]\n\n'
    events = [chunk] * 19 + [last]
    taken: List[bytes] = []

    def one() -> int:
        strip = UsageChunkStrip(taken.append)
        return sum(len(strip.feed(event)) for event in events) + len(strip.finish())

    size = benchmark(one)
    assert size == 19 * (len(chunk) - len(b',"usage":null')) + len(b"data: [DONE]\n\n") and taken


# --- idle deadlines: one shared timer instead of one per connection ---------------------


class _Swept:
    __slots__ = ("sweep_slot",)

    def __init__(self) -> None:
        self.sweep_slot = None

    def swept(self) -> None:  # pragma: no cover - not reached: every item is forgotten
        pass


def test_idle_deadlines_of_1000_connections(benchmark: Any) -> None:
    """1,000 connections given their --client-timeout deadline (spread over a few
    slots, as connections going idle at different moments are), then closed."""
    from pyproxy.server.idle import IdleSweeper

    loop = asyncio.new_event_loop()
    sweeper = IdleSweeper(loop, 1.0)
    items = [_Swept() for _ in range(1000)]

    def one() -> int:
        now = loop.time()
        for i, item in enumerate(items):
            sweeper.at(now + 60 + (i % 7), item)
        held = len(sweeper)
        for item in items:
            sweeper.forget(item)
        return held

    assert benchmark(one) == 1000 and not sweeper.slots
    sweeper.close()
    loop.close()
