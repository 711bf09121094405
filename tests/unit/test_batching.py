"""The batching decisions, without sockets: who may join, the window, the split."""

from __future__ import annotations

import base64
import json
import random
import struct

import pytest

from pyproxy.gateway.batching import (
    STRINGS,
    TOKENS,
    BatchConfigError,
    BatchRule,
    BatchWindow,
    Unsplittable,
    batch_body,
    batch_key,
    convert,
    member_input,
    parse_batching,
    split_response,
    split_usage,
    too_large,
)

RULE = BatchRule("/v1/embeddings", ("text-embedding-*",), max_inputs=4, max_tokens=100, max_wait_ms=2)


@pytest.mark.parametrize(
    "input_, kind, count",
    [
        ("one", STRINGS, 1),
        (["a", "b"], STRINGS, 2),
        ([1, 2, 3], TOKENS, 1),
        ([[1, 2], [3]], TOKENS, 2),
    ],
)
def test_every_input_shape_the_api_allows_is_batchable(input_, kind, count) -> None:
    member = member_input({"model": "m", "input": input_})
    assert member is not None and member.kind == kind and len(member.inputs) == count
    assert member.encoding == "float"  # the API's default


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m"},
        {"model": "m", "input": []},
        {"model": "m", "input": ["a", 1]},
        {"model": "m", "input": [[1], "a"]},
        {"model": "m", "input": [[]]},
        {"model": "m", "input": [True]},  # a bool is not a token
        {"model": "m", "input": "x", "encoding_format": "int8"},
        ["not", "an", "object"],
    ],
)
def test_what_a_batch_cannot_hold_goes_alone(body) -> None:
    assert member_input(body) is None


def test_tokens_are_estimated_as_bytes_over_four_and_token_array_lengths() -> None:
    assert member_input({"input": "a" * 40}).tokens == 10
    assert member_input({"input": "é" * 4}).tokens == 2  # bytes, not characters
    assert member_input({"input": ["", "ab"]}).tokens == 2  # every input at least 1
    assert member_input({"input": [[1, 2, 3], [4]]}).tokens == 4


def test_only_requests_alike_in_everything_but_their_inputs_share_a_key() -> None:
    def key(**fields):
        return batch_key(member_input(dict({"model": "m", "input": "x"}, **fields)), ("route",))

    assert key(input="y") == key(input="other")
    assert key() != key(dimensions=256)
    assert key() != key(user="u")
    assert key() != key(model="n")
    assert key() != key(encoding_format="base64")
    assert key() != key(input=[1, 2])  # token arrays apart from strings
    assert key(user="u", dimensions=8) == key(dimensions=8, user="u")  # field order is not a difference
    assert batch_key(member_input({"input": "x"}), ("a",)) != batch_key(member_input({"input": "x"}), ("b",))


def test_limits_send_a_request_alone() -> None:
    assert too_large(member_input({"input": ["a"] * 5}), RULE)
    assert not too_large(member_input({"input": ["a"] * 4}), RULE)
    assert too_large(member_input({"input": "a" * 404}), RULE)


def test_window_sends_at_once_when_nothing_is_upstream() -> None:
    window: BatchWindow[str] = BatchWindow()
    assert window.arrive("a", 1, 1, RULE, now=0.0) == [["a"]]
    window.sent()
    # While it is upstream, arrivals wait...
    assert window.arrive("b", 1, 1, RULE, now=0.001) == []
    assert window.arrive("c", 1, 1, RULE, now=0.002) == []
    assert window.opened_at == 0.001
    # ...until it returns: then they go, together.
    assert window.returned() == [["b", "c"]]
    window.sent()
    assert not window.idle
    assert window.returned() == []
    assert window.idle


def test_window_limits_and_timer() -> None:
    window: BatchWindow[str] = BatchWindow()
    window.arrive("first", 1, 1, RULE, 0.0)
    window.sent()
    assert window.arrive("a", 2, 10, RULE, 1.0) == []
    # b would overfill the next batch: a's batch goes, b opens the next one.
    assert window.arrive("b", 3, 10, RULE, 2.0) == [["a"]]
    assert window.opened_at == 2.0 and window.pending == ["b"]
    # c fills it to the input limit exactly: it goes at once.
    assert window.arrive("c", 1, 10, RULE, 3.0) == [["b", "c"]]
    assert window.pending == []
    # The token limit counts too.
    assert window.arrive("d", 1, 100, RULE, 4.0) == [["d"]]
    # max_wait_ms passed: whoever waits goes.
    window.arrive("e", 1, 1, RULE, 5.0)
    assert window.expire() == [["e"]]
    assert window.expire() == []


def test_a_member_that_leaves_gives_back_its_room() -> None:
    window: BatchWindow[str] = BatchWindow()
    window.arrive("first", 1, 1, RULE, 0.0)
    window.sent()
    window.arrive("a", 3, 3, RULE, 0.0)
    assert window.leave("a", 3, 3)
    assert not window.leave("a", 3, 3)
    assert window.arrive("b", 4, 4, RULE, 0.0) == [["b"]]  # room for four again


def test_batch_body_keeps_member_order_and_asks_for_base64() -> None:
    members = [member_input({"model": "m", "input": x, "user": "u"}) for x in ("a", ["b", "c"], "d")]
    sent = json.loads(batch_body(members))
    assert sent == {"model": "m", "input": ["a", "b", "c", "d"], "user": "u", "encoding_format": "base64"}


def _f32(values):
    return list(struct.unpack(f"<{len(values)}f", struct.pack(f"<{len(values)}f", *values)))


def test_split_goes_by_index_and_converts_for_float_callers() -> None:
    vectors = [_f32([i + 0.1, -i / 3.0]) for i in range(4)]
    b64 = [base64.b64encode(struct.pack("<2f", *v)).decode() for v in vectors]
    members = [
        member_input({"model": "m", "input": ["w", "x"]}),  # float
        member_input({"model": "m", "input": "y", "encoding_format": "base64"}),
        member_input({"model": "m", "input": "z"}),
    ]
    # Listed out of order: only "index" says which input an embedding is.
    data = [{"object": "embedding", "index": i, "embedding": b64[i]} for i in (3, 1, 0, 2)]
    answer = {"object": "list", "data": data, "model": "m-v2", "usage": {"prompt_tokens": 9, "total_tokens": 9}}
    bodies = [json.loads(b) for b in split_response(json.dumps(answer).encode(), members)]
    assert [d["index"] for d in bodies[0]["data"]] == [0, 1]
    assert [d["embedding"] for d in bodies[0]["data"]] == [vectors[0], vectors[1]]
    assert bodies[1]["data"] == [{"object": "embedding", "index": 0, "embedding": b64[2]}]
    assert bodies[2]["data"][0]["embedding"] == vectors[3]
    assert all(b["model"] == "m-v2" and b["object"] == "list" for b in bodies)
    assert sum(b["usage"]["prompt_tokens"] for b in bodies) == 9


@pytest.mark.parametrize(
    "answer",
    [
        b"not json",
        b'{"data": 1}',
        b'{"data": [{"index": 0, "embedding": [1.0]}]}',  # one embedding for two inputs
        b'{"data": [{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [1.0]}]}',
        b'{"data": [{"index": 0, "embedding": [1.0]}, {"index": 2, "embedding": [1.0]}]}',
        b'{"data": [{"index": 0, "embedding": [1.0]}, {"index": 1}]}',
        b'{"data": [{"index": 0, "embedding": "!!!"}, {"index": 1, "embedding": "AAAAAA=="}]}',
        b'{"data": [{"index": 0, "embedding": "AAA="}, {"index": 1, "embedding": "AAAAAA=="}]}',
    ],
)
def test_an_answer_that_does_not_cover_every_input_is_unsplittable(answer) -> None:
    members = [member_input({"input": "a"}), member_input({"input": "b"})]
    with pytest.raises(Unsplittable):
        split_response(answer, members)


def test_usage_shares_add_up_exactly_and_stay_within_one_of_their_quota() -> None:
    rng = random.Random(7)
    for _ in range(500):
        weights = [rng.randint(0, 50) for _ in range(rng.randint(1, 20))]
        total = rng.randint(0, 5000)
        shares = split_usage({"prompt_tokens": total, "total_tokens": total, "note": "x"}, weights)
        assert sum(s["prompt_tokens"] for s in shares) == total
        assert all(s["prompt_tokens"] == s["total_tokens"] and s["note"] == "x" for s in shares)
        weight_sum = sum(weights) or len(weights)
        for share, weight in zip(shares, weights if sum(weights) else [1] * len(weights)):
            assert abs(share["prompt_tokens"] - total * weight / weight_sum) < 1


def test_largest_remainder_gives_the_leftover_to_the_largest_fractions() -> None:
    # Quotas 10 * (1, 2, 3) / 6 = 1.67, 3.33, 5: the one left over goes to the first.
    assert [s["t"] for s in split_usage({"t": 10}, [1, 2, 3])] == [2, 3, 5]


def test_conversions_carry_the_same_float32_numbers() -> None:
    values = _f32([0.1, -2.5, 1e-8, 3.4e38])
    encoded = base64.b64encode(struct.pack("<4f", *values)).decode()
    assert convert(encoded, "float") == values
    assert convert(values, "base64") == encoded
    assert convert(encoded, "base64") is encoded  # byte for byte, untouched


def test_batching_tables_are_validated_in_one_line_each() -> None:
    (rule,) = parse_batching([{"models": ["text-embedding-*"]}])
    assert rule == BatchRule("/v1/embeddings", ("text-embedding-*",), 256, 100_000, 2.0)
    assert rule.matches(b"/v1/embeddings", "text-embedding-3-small")
    assert not rule.matches(b"/v1/embeddings", "gpt-4o")
    assert not rule.matches(b"/v1/chat/completions", "text-embedding-3-small")
    for table, message in (
        ({"max_inputs": 0}, "batching[0].max_inputs: expected an integer >= 1"),
        ({"max_wait_ms": -1}, "batching[0].max_wait_ms: expected milliseconds"),
        ({"models": "x"}, "batching[0].models: expected a list of model globs"),
        ({"path": "v1"}, "batching[0].path: expected a path"),
        ({"max_input": 3}, "batching[0]: unknown key 'max_input'"),
    ):
        with pytest.raises(BatchConfigError, match="^" + message.replace("[", r"\[").replace("]", r"\]")):
            parse_batching([table])
