"""The gateway's deciding parts, without sockets: config, model table, body rewrite,
deployment choice, ejection, cooling and the retry budget (a fake clock throughout)."""

from __future__ import annotations

import json
import random
from typing import Any, Dict, List, Tuple

import pytest

from pyproxy.config import ConfigError, build_settings
from pyproxy.gateway import outlier
from pyproxy.gateway.balancer import (
    DEFAULT_RTT,
    _two_by_weight,
    choose,
    cost,
    is_uniform,
    observe_latency,
    soonest_recovery,
)
from pyproxy.gateway.config import Deployment, Secret
from pyproxy.gateway.models import (
    BY_MODEL,
    MODEL_LIST,
    NO_ROUTE,
    TO_UPSTREAM,
    GatewayRoutes,
    ModelNotFound,
    model_value_span,
    rewrite_model,
)
from pyproxy.gateway.state import UpstreamState
from tests.support.gateway import gateway_settings

BASE = """
[[upstreams]]
name = "a"
url = "http://127.0.0.1:9001"
[[upstreams]]
name = "b"
url = "https://b.example/prefix/"
api_key = "env:B_KEY"
auth_header = "x-api-key"
"""


def settings(toml: str, environ: Any = None) -> Any:
    return gateway_settings(toml, {"B_KEY": "sk-b"} if environ is None else environ)


# --- config ---------------------------------------------------------------------------


def test_config_reads_upstreams_models_aliases_and_routes() -> None:
    s = settings(
        BASE
        + """
[[models]]
name = "llama"
deployments = [{ upstream = "a", weight = 2 }, { upstream = "b", model = "x", priority = 1 }]
retry_on = ["500", "reset"]
max_attempts = 2
retry_deadline = 2.5
[model_aliases]
"big" = "llama"
[[routes]]
path = "/v1/files*"
upstream = "b"
"""
    )
    gw = s.gateway
    assert [u.name for u in gw.upstreams] == ["a", "b"]
    assert s.upstream == gw.upstreams[0].upstream  # single-upstream code reads the first
    b = gw.upstream("b")
    assert b.upstream.prefix == b"/prefix" and b.credential_header() == (b"x-api-key", b"sk-b")
    assert gw.upstream("a").credential_header() is None
    model = gw.models[0]
    assert model.deployments == (Deployment("a", 2.0, 0, None), Deployment("b", 1.0, 1, "x"))
    assert model.retry_on == frozenset({"500", "reset"}) and model.max_attempts == 2
    assert model.retry_deadline == 2.5
    assert gw.aliases == (("big", "llama"),) and gw.routes[0].upstream == "b"
    assert gw.default_upstream == "a"
    assert "sk-b" not in repr(s) and repr(b.api_key) == "Secret('***')"


def test_config_reads_keys_from_files(tmp_path: Any) -> None:
    key = tmp_path / "key"
    key.write_text("sk-from-file\n")
    s = settings(BASE.replace("env:B_KEY", f"file:{key}"))
    assert s.gateway.upstream("b").api_key == Secret("sk-from-file")
    assert s.gateway.upstream("b").credential_header() == (b"x-api-key", b"sk-from-file")


@pytest.mark.parametrize(
    "toml, environ, expected",
    [
        (BASE, {}, "upstreams[1].api_key: environment variable B_KEY is not set"),
        (BASE.replace("env:B_KEY", "file:/nonexistent/key"), None, "upstreams[1].api_key: cannot read"),
        (BASE.replace('name = "b"', 'name = "a"'), None, "upstreams[1].name: 'a' is used twice"),
        (BASE.replace('name = "b"', 'name = "B!"'), None, "upstreams[1].name: expected a name of [a-z0-9_-]"),
        (BASE.replace("x-api-key", "cookie"), None, "upstreams[1].auth_header: expected one of"),
        (BASE.replace("https://b.example/prefix/", "ftp://b"), None, "upstreams[1].url: must start with http"),
        (BASE + '[[models]]\nname = "m"\ndeployments = [{ upstream = "c" }]\n', None,
         "models[0].deployments[0].upstream: no upstream named 'c'"),
        (BASE + '[[models]]\nname = "m"\ndeployments = []\n', None, "models[0].deployments: expected a non-empty"),
        (BASE + '[[models]]\nname = "m"\ndeployments = [{ upstream = "a", weight = 0 }]\n', None,
         "models[0].deployments[0].weight"),
        (BASE + '[[models]]\nname = "m"\ndeployments = [{ upstream = "a" }]\nretry_on = ["404"]\n', None,
         "models[0].retry_on"),
        (BASE + '[[models]]\nname = "m"\ndeployments = [{ upstream = "a" }]\nretry_deadline = 0\n', None,
         "models[0].retry_deadline: expected seconds > 0"),
        (BASE + '[[models]]\nname = "m"\ndeployments = [{ upstream = "a", region = "eu" }]\n', None,
         "models[0].deployments[0]: unknown key 'region'"),
        ('default_upstream = "c"\n' + BASE, None, "default_upstream: no upstream named 'c'"),
        (BASE + '[[routes]]\npath = "/x"\nupstream = "c"\n', None, "routes[0].upstream: no upstream named 'c'"),
        (BASE + '[[routes]]\npath = "/x"\ndeployments = [{ upstream = "c" }]\n', None,
         "routes[0].deployments[0].upstream: no upstream named 'c'"),
        (BASE + '[[routes]]\npath = "/x"\nupstream = "a"\ndeployments = [{ upstream = "a" }]\n', None,
         "routes[0]: give upstream or deployments, not both"),
        ('[[routes]]\npath = "/x"\nupstream = "a"\n', None, "routes[0].upstream: needs [[upstreams]]"),
        (BASE + '[model_aliases]\n"x" = "y"\n"y" = "z"\n', None, "model_aliases.x: points at another alias"),
        (BASE + '[[batching]]\npath = "/v1/embeddings"\n', None, "batching: needs [[models]]"),
        (BASE + '[[models]]\nname = "m"\ndeployments = [{ upstream = "a" }]\nearly_head_after = 0\n', None,
         "models[0].early_head_after: expected seconds > 0"),
        (BASE + '[[models]]\nname = "m"\ndeployments = [{ upstream = "a" }]\nearly_head_after = "soon"\n', None,
         "models[0].early_head_after: expected seconds > 0"),
        (BASE + '[[routes]]\npath = "/x"\nupstream = "a"\nearly_head_after = true\n', None,
         "routes[0].early_head_after: expected seconds > 0"),
        (BASE + '[[routes]]\npath = "/x"\nearly_head_after = 5\n', None,
         "routes[0].early_head_after: needs upstream or deployments"),
        ('[[routes]]\npath = "/x"\nearly_head_after = 5\n', None, "routes[0].early_head_after: needs [[upstreams]]"),
        ('[[batching]]\npath = "/v1/embeddings"\n', None, "batching: needs [[upstreams]]"),
        (BASE + '[[models]]\nname = "m"\ndeployments = [{ upstream = "a" }]\n[[batching]]\nmax_tokens = 0\n', None,
         "batching[0].max_tokens: expected an integer >= 1"),
    ],
)  # fmt: skip
def test_config_errors_are_one_line_naming_the_key(toml: str, environ: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings(toml, environ)
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_upstream_flag_and_upstreams_table_are_exclusive(tmp_path: Any) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(BASE)
    with pytest.raises(ConfigError, match="--upstream and \\[\\[upstreams\\]\\]"):
        build_settings({"config": str(path), "upstream": "http://127.0.0.1:1"}, {"B_KEY": "k"})


# --- the model table --------------------------------------------------------------------


def routes(extra: str) -> GatewayRoutes:
    return GatewayRoutes(settings(BASE + extra).gateway)


MODELS = """
[[models]]
name = "gpt-4o"
deployments = [{ upstream = "a" }]
[[models]]
name = "gpt-*"
deployments = [{ upstream = "b" }]
[model_aliases]
"gpt-4" = "gpt-4o"
[[routes]]
path = "/v1/files*"
upstream = "b"
"""


def test_routing_by_head() -> None:
    table = routes(MODELS)
    assert table.by_head(b"POST", b"/v1/chat/completions") == (BY_MODEL, None)
    assert table.by_head(b"GET", b"/v1/models") == (MODEL_LIST, None)
    assert table.by_head(b"GET", b"/v1/models?limit=5") == (MODEL_LIST, None)  # the path decides
    kind, target = table.by_head(b"POST", b"/v1/files/x")
    assert kind == TO_UPSTREAM and target.deployments == (Deployment("b"),)
    kind, target = table.by_head(b"GET", b"/v1/batches")
    assert kind == TO_UPSTREAM and target.deployments == (Deployment("a"),)  # the default: the first
    no_default = GatewayRoutes(settings('default_upstream = "none"\n' + BASE).gateway)
    assert no_default.by_head(b"GET", b"/x") == (NO_ROUTE, None)
    # Without [[models]], POSTs are not routed by body and /v1/models goes upstream.
    plain = routes("")
    assert plain.by_head(b"POST", b"/v1/chat/completions")[0] == TO_UPSTREAM
    assert plain.by_head(b"GET", b"/v1/models")[0] == TO_UPSTREAM


def test_model_resolution_aliases_exact_before_globs() -> None:
    table = routes(MODELS)
    target = table.by_model({"model": "gpt-4"})
    assert target.public_model == "gpt-4o" and target.deployments == (Deployment("a"),)
    assert target.model_for(Deployment("a")) == "gpt-4o"  # the alias is resolved upstream too
    target = table.by_model({"model": "gpt-4o"})
    assert target.model_for(Deployment("a")) is None  # unchanged: the body goes as sent
    target = table.by_model({"model": "gpt-3.5-turbo"})
    assert target.deployments == (Deployment("b"),) and target.public_model == "gpt-3.5-turbo"
    with pytest.raises(ModelNotFound) as info:
        table.by_model({"model": "claude"})
    assert info.value.status == 404 and info.value.code == "model_not_found"
    listed = json.loads(table.models_body)
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == ["gpt-4o", "gpt-4"]


BODIES = [
    b'{"model":"a"}',
    b'{ "model" : "a" , "x": 1}',
    b'{"messages":[{"model":"inner","content":"\\"model\\": \\"no\\""}],"model":"a","z":{"model":"deep"}}',
    b'{"mod\\u0065l":"a"}',
    b'{"x":"}{][,:","model":"a"}',
    b'{"list":[1,[2,{"model":"n"}]],"model" :\n"a"}',
    '{"content":"é ü 漢字","model":"a"}'.encode(),
]


@pytest.mark.parametrize("body", BODIES)
def test_rewrite_changes_only_the_top_level_model(body: bytes) -> None:
    out = rewrite_model(body, 'new "name"')
    parsed, original = json.loads(out), json.loads(body)
    assert parsed.pop("model") == 'new "name"'
    original.pop("model")
    assert parsed == original
    start, end = model_value_span(body)
    assert out[:start] == body[:start] and out[len(out) - (len(body) - end) :] == body[end:]


def test_rewrite_agrees_with_json_on_random_documents() -> None:
    rng = random.Random(7)

    def value(depth: int) -> Any:
        kind = rng.randrange(6 if depth < 3 else 3)
        if kind == 0:
            return rng.choice(["model", "", "}{", '"', "\\", "é", 'model":"x'])
        if kind == 1:
            return rng.randrange(-5, 5)
        if kind == 2:
            return rng.choice([None, True, 1.5])
        if kind == 3:
            return [value(depth + 1) for _ in range(rng.randrange(3))]
        return {rng.choice(["model", "a", "b", 'm"odel']): value(depth + 1) for _ in range(rng.randrange(3))}

    for _ in range(300):
        doc: Dict[str, Any] = {k: value(0) for k in rng.sample(["a", "b", "c", "d"], rng.randrange(4))}
        doc["model"] = "orig"
        items = list(doc.items())
        rng.shuffle(items)
        body = json.dumps(dict(items), ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1])).encode()
        out = json.loads(rewrite_model(body, "renamed"))
        assert out == dict(doc, model="renamed")


# --- choosing a deployment ------------------------------------------------------------------


def states(*names: str, bound: int = 100) -> Dict[str, UpstreamState]:
    return {name: UpstreamState(name, bound) for name in names}


def test_choose_filters_ejected_cooling_full_and_tried() -> None:
    st = states("a", "b", "c")
    deps = [Deployment("a"), Deployment("b"), Deployment("c")]
    rng = random.Random(1)
    st["a"].ejected_until = 50.0
    st["b"].cooling_until = 20.0
    assert {choose(deps, st, 10.0, rng).upstream for _ in range(50)} == {"c"}
    st["c"].in_flight = 100  # at its bound
    assert choose(deps, st, 10.0, rng) is None
    assert soonest_recovery(deps, st, 10.0) == pytest.approx(1.0)
    st["c"].in_flight = 0
    assert choose(deps, st, 10.0, rng, tried=["c"]) is None
    assert soonest_recovery(deps, st, 10.0, tried=["c"]) == pytest.approx(10.0)  # b cools until 20
    assert choose(deps, st, 25.0, rng, tried=["c"]).upstream == "b"


def test_choose_takes_the_lowest_priority_tier_left() -> None:
    st = states("a", "b", "fallback")
    deps = [Deployment("a"), Deployment("b"), Deployment("fallback", priority=1)]
    rng = random.Random(2)
    assert {choose(deps, st, 0.0, rng).upstream for _ in range(100)} == {"a", "b"}
    st["a"].cooling_until = st["b"].ejected_until = 10.0
    assert choose(deps, st, 0.0, rng).upstream == "fallback"


def test_p2c_follows_weights_when_loads_are_equal() -> None:
    st = states("a", "b", "c")
    deps = [Deployment("a", weight=2), Deployment("b"), Deployment("c")]
    rng = random.Random(3)
    counts = {"a": 0, "b": 0, "c": 0}
    for _ in range(4000):
        counts[choose(deps, st, 0.0, rng).upstream] += 1
    # Equal cost per weight unit: the cheaper of two is the heavier one, a wins more than its 2/4.
    assert counts["a"] > counts["b"] + counts["c"]
    assert counts["b"] > 200 and counts["c"] > 200  # each still gets traffic


def test_equal_weights_draw_every_ordered_pair_of_distinct_deployments_alike() -> None:
    deps = [Deployment("a"), Deployment("b"), Deployment("c")]
    rng = random.Random(5)
    pairs: Dict[Tuple[str, str], int] = {}
    for _ in range(6000):
        first, second = _two_by_weight(deps, rng)
        pairs[(first.upstream, second.upstream)] = pairs.get((first.upstream, second.upstream), 0) + 1
    assert all(a != b for a, b in pairs)
    assert len(pairs) == 6 and all(800 < n < 1200 for n in pairs.values())  # 1000 each expected


@pytest.mark.parametrize("uniform", [False, True])
def test_the_draw_two_first_path_decides_as_the_full_pass_does(uniform: bool) -> None:
    st = states("a", "b", "c")
    deps = [Deployment("a"), Deployment("b"), Deployment("c")]
    assert is_uniform(deps) and not is_uniform(deps[:1])
    assert not is_uniform([Deployment("a"), Deployment("b", weight=2)])
    assert not is_uniform([Deployment("a"), Deployment("b", priority=1)])
    rng = random.Random(6)

    def shares() -> Dict[str, int]:
        counts = {"a": 0, "b": 0, "c": 0}
        for _ in range(3000):
            counts[choose(deps, st, 0.0, rng, uniform=uniform).upstream] += 1
        return counts

    assert all(800 < n < 1200 for n in shares().values())  # equal loads: a third each
    st["a"].in_flight = 5
    assert shares()["a"] == 0  # the busiest of three is never the cheaper of two
    st["a"].in_flight = 0
    st["b"].ejected_until = 10.0
    counts = shares()
    assert counts["b"] == 0 and 1250 < counts["a"] < 1750  # the other two share it
    assert choose(deps, st, 0.0, rng, tried=["a"], uniform=uniform).upstream == "c"


def test_p2c_prefers_less_loaded_and_faster_deployments() -> None:
    st = states("a", "b")
    deps = [Deployment("a"), Deployment("b")]
    rng = random.Random(4)
    st["a"].in_flight = 5
    assert choose(deps, st, 0.0, rng).upstream == "b"
    st["a"].in_flight = 0
    observe_latency(st["a"], 0.100, 0.0)
    observe_latency(st["b"], 0.010, 0.0)
    assert choose(deps, st, 0.0, rng).upstream == "b"
    st["b"].in_flight = 20  # 0.010 * 21 > 0.100 * 1
    assert choose(deps, st, 0.0, rng).upstream == "a"


def test_peak_ewma_jumps_up_and_decays_down() -> None:
    st = UpstreamState("a", 10)
    observe_latency(st, 0.010, 0.0)
    assert st.ewma == 0.010
    observe_latency(st, 0.200, 1.0)
    assert st.ewma == 0.200  # a slower observation is taken at once
    observe_latency(st, 0.010, 1.1)
    assert 0.19 < st.ewma < 0.2  # a faster one only a little, 0.1 s later
    for t in range(2, 60):
        observe_latency(st, 0.010, float(t))
    assert st.ewma < 0.012
    assert cost(UpstreamState("new", 1), 1.0) == DEFAULT_RTT


# --- ejection, cooling, budget ------------------------------------------------------------------


def test_five_consecutive_failures_eject_for_longer_each_time() -> None:
    st = states("a", "b", "c")
    groups: List[List[UpstreamState]] = [list(st.values())]
    a = st["a"]
    for _ in range(4):
        assert outlier.record_failure(a, groups, 0.0, "boom") is None
    outlier.record_success(a)  # one success resets the count
    for _ in range(4):
        assert outlier.record_failure(a, groups, 1.0, "boom") is None
    assert outlier.record_failure(a, groups, 1.0, "boom") == 30.0
    assert a.ejected(30.9) and not a.ejected(31.0)
    for _ in range(5):
        length = outlier.record_failure(a, groups, 40.0, "boom")
    assert length == 60.0  # 30 s x times ejected
    a.times_ejected = 20
    for _ in range(5):
        length = outlier.record_failure(a, groups, 200.0, "boom")
    assert length == outlier.EJECTION_MAX
    assert outlier.end_ejection(a) and not a.ejected(200.0)


def test_at_most_half_of_a_group_is_ejected() -> None:
    st = states("a", "b", "c", "d")
    every = list(st.values())
    pair = [st["a"], st["b"]]
    groups = [every, pair]
    for _ in range(5):
        outlier.record_failure(st["a"], groups, 0.0, "x")
    assert st["a"].ejected(0.0)
    for _ in range(10):
        outlier.record_failure(st["b"], groups, 0.0, "x")
    assert not st["b"].ejected(0.0)  # the pair would have none left
    for _ in range(5):
        outlier.record_failure(st["c"], groups, 0.0, "x")
    assert st["c"].ejected(0.0)  # two of four
    for _ in range(5):
        outlier.record_failure(st["d"], groups, 0.0, "x")
    assert not st["d"].ejected(0.0)
    lone = states("only")
    for _ in range(20):
        outlier.record_failure(lone["only"], [[lone["only"]]], 0.0, "x")
    assert not lone["only"].ejected(0.0)  # one upstream is never ejected


def test_which_failures_are_retried_and_counted() -> None:
    none: frozenset = frozenset()
    assert outlier.retryable(outlier.CONNECT, 0, none) and outlier.retryable(outlier.UNSENT, 0, none)
    for status in (429, 502, 503, 504, 529):
        assert outlier.retryable(outlier.STATUS, status, none)
    for status in (400, 401, 404, 500, 501):
        assert not outlier.retryable(outlier.STATUS, status, none)
    assert outlier.retryable(outlier.STATUS, 500, frozenset({"500"}))
    assert not outlier.retryable(outlier.TIMEOUT, 0, none) and outlier.retryable(outlier.TIMEOUT, 0, {"timeout"})
    assert not outlier.retryable(outlier.RESET, 0, none) and outlier.retryable(outlier.RESET, 0, {"reset"})
    assert not outlier.counts_as_failure(outlier.STATUS, 429)
    assert not outlier.counts_as_failure(outlier.STATUS, 404)
    assert outlier.counts_as_failure(outlier.STATUS, 503) and outlier.counts_as_failure(outlier.CONNECT, 0)


def test_retry_budget_is_a_fifth_of_requests_in_flight_with_a_floor() -> None:
    assert outlier.budget_allows(1, 0) and outlier.budget_allows(1, 2) and not outlier.budget_allows(1, 3)
    assert outlier.budget_allows(100, 19) and not outlier.budget_allows(100, 20)


def test_cooling_and_retry_after() -> None:
    st = UpstreamState("a", 1)
    assert outlier.cool_down(st, 10.0, None) == outlier.DEFAULT_COOLDOWN
    assert st.cooling(14.9) and not st.cooling(15.0)
    outlier.cool_down(st, 10.0, 2.0)
    assert st.cooling_until == 15.0  # never shortened by a later, shorter one
    outlier.cool_down(st, 10.0, 10_000.0)
    assert st.cooling_until == 10.0 + outlier.MAX_COOLDOWN
    assert outlier.parse_retry_after(b"7", 0.0) == 7.0
    assert outlier.parse_retry_after(b"Thu, 01 Jan 1970 00:01:40 GMT", 40.0) == pytest.approx(60.0)
    for bad in (None, b"", b"soon", b"-3", b"1.5"):
        assert outlier.parse_retry_after(bad, 0.0) is None
