"""Batching embedding requests: the deciding parts. Pure: no I/O, no clock of its own.

Many single-input ``/v1/embeddings`` requests become one upstream request with
many inputs, and its answer is split back: every embedding server does far
more work per second on one request with many inputs. What is decided here,
each unit-tested without sockets:

- whether a request may join a batch at all, and with whom (``member_input``,
  ``batch_key``): same route, same parameters, same kind of input, same
  credential when the client's own is passed through;
- the window (``BatchWindow``): no batch of that key upstream → the request goes
  at once (no added latency at low load); while one is, arrivals collect until
  it returns, a limit is reached, or ``max_wait_ms`` passes (the way Hugging
  Face TEI batches whatever queued while the backend was busy);
- the upstream body (``batch_body``) and the split of its answer
  (``split_response``): by ``index``, never by position; each caller's indices
  from 0; ``usage`` shared by largest remainder in proportion to each caller's
  estimated tokens, so the callers' totals add up to the upstream's exactly;
  float and base64 encodings converted both ways (base64 is little-endian
  float32, as OpenAI sends it).
"""

from __future__ import annotations

import base64
import json
import sys
from array import array
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Dict, Generic, List, Optional, Sequence, Tuple, TypeVar

from pyproxy._compat import json_dumps, json_loads

STRINGS = "strings"  # input: a string or a list of strings
TOKENS = "tokens"  # input: a token array or a list of them
ENCODINGS = ("float", "base64")
# Fields that never go into a batch's key: the inputs themselves, and the encoding
# (keyed apart, as the kind of input is, since a batch asks for base64 whatever
# its members asked for).
_NOT_KEYED = frozenset({"input", "encoding_format"})
# Request headers whose differing values change what the upstream does or bills
# (OpenAI's organization and project), so requests that differ in them never share
# one upstream call.
SCOPING_HEADERS = (b"openai-organization", b"openai-project")
# Statuses of a batch's answer that are the batch's alone, not one input's: every
# member gets them (retrying each alone would only multiply them). Any other 4xx
# retries each member alone, so one bad input fails only its own caller.
SHARED_CLIENT_ERRORS = frozenset({401, 402, 403, 407, 429})


class BatchConfigError(ValueError):
    """One line naming the table and key."""


@dataclass(frozen=True)
class BatchRule:
    path: str  # a path, or a glob ("/v1/embeddings*")
    models: Tuple[str, ...] = ("*",)  # public model globs
    max_inputs: int = 256  # per upstream request
    max_tokens: int = 100_000  # estimated: bytes / 4 for strings, length for token arrays
    max_wait_ms: float = 2.0  # an upper bound on the time a request waits to be sent

    def matches(self, path: bytes, public_model: str) -> bool:
        return fnmatchcase(path.decode("latin-1"), self.path) and any(
            fnmatchcase(public_model, glob) for glob in self.models
        )


BATCH_KEYS = frozenset({"path", "models", "max_inputs", "max_tokens", "max_wait_ms"})


def parse_batching(value: Any) -> Tuple[BatchRule, ...]:
    """``[[batching]]`` tables, validated: every mistake one line naming the key."""
    if not isinstance(value, list):
        raise BatchConfigError(f"batching: expected an array of tables ([[batching]]), got {value!r}")
    rules = []
    for i, table in enumerate(value):
        where = f"batching[{i}]"
        if not isinstance(table, dict):
            raise BatchConfigError(f"{where}: expected a table, got {table!r}")
        unknown = sorted(set(table) - BATCH_KEYS)
        if unknown:
            raise BatchConfigError(
                f"{where}: unknown key {unknown[0]!r} (expected one of {', '.join(sorted(BATCH_KEYS))})"
            )
        path = table.get("path", "/v1/embeddings")
        if not isinstance(path, str) or not path.startswith("/"):
            raise BatchConfigError(f"{where}.path: expected a path like /v1/embeddings, got {path!r}")
        models = table.get("models", ["*"])
        if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
            raise BatchConfigError(f'{where}.models: expected a list of model globs, like ["text-embedding-*"]')
        limits = {}
        for key, default in (("max_inputs", 256), ("max_tokens", 100_000)):
            number = table.get(key, default)
            if isinstance(number, bool) or not isinstance(number, int) or number < 1:
                raise BatchConfigError(f"{where}.{key}: expected an integer >= 1, got {number!r}")
            limits[key] = number
        wait = table.get("max_wait_ms", 2)
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= 10_000:
            raise BatchConfigError(f"{where}.max_wait_ms: expected milliseconds from 0 to 10000, got {wait!r}")
        rules.append(BatchRule(path, tuple(models), limits["max_inputs"], limits["max_tokens"], float(wait)))
    return tuple(rules)


# --- one request: may it join, and with whom ---------------------------------------


class MemberInput:
    """What a batch needs of one request's body."""

    __slots__ = ("inputs", "kind", "encoding", "tokens", "params")

    def __init__(self, inputs: List[Any], kind: str, encoding: str, tokens: int, params: Dict[str, Any]) -> None:
        self.inputs = inputs  # in the caller's order: strings, or token arrays
        self.kind = kind
        self.encoding = encoding  # what the caller asked for: float (the default) or base64
        self.tokens = tokens  # estimated (see estimate_tokens)
        self.params = params  # every other field, the same for every member of its batch


def _is_token_array(value: Any) -> bool:
    return type(value) is list and bool(value) and all(type(t) is int for t in value)


def estimate_tokens(item: Any) -> int:
    """bytes / 4 for a string (at least 1: every input costs something), length for a
    token array."""
    if type(item) is str:
        return max(1, (len(item.encode("utf-8")) + 3) // 4)
    return len(item)


def member_input(parsed: Any) -> Optional[MemberInput]:
    """The batchable part of a parsed embeddings body, or None: it goes alone as sent
    (an input shape the batch cannot hold, or an encoding it cannot convert; the
    upstream answers such a request itself, errors included)."""
    if type(parsed) is not dict:
        return None
    raw = parsed.get("input")
    if type(raw) is str:
        inputs, kind = [raw], STRINGS
    elif type(raw) is list and raw:
        if all(type(item) is str for item in raw):
            inputs, kind = raw, STRINGS
        elif all(type(t) is int for t in raw):
            inputs, kind = [raw], TOKENS
        elif all(_is_token_array(item) for item in raw):
            inputs, kind = raw, TOKENS
        else:
            return None
    else:
        return None
    encoding = parsed.get("encoding_format", "float")
    if encoding not in ENCODINGS:
        return None
    params = {k: v for k, v in parsed.items() if k not in _NOT_KEYED}
    return MemberInput(inputs, kind, encoding, sum(estimate_tokens(item) for item in inputs), params)


def batch_key(member: MemberInput, scope: Tuple[Any, ...]) -> Tuple[Any, ...]:
    """Requests share a batch only with equal keys: the same ``scope`` (the route, and
    the credential and scoping headers when they reach the upstream), the same kind
    of input and encoding, and every other field equal (model, dimensions, user ...)."""
    return scope + (member.kind, member.encoding, json.dumps(member.params, sort_keys=True, separators=(",", ":")))


def too_large(member: MemberInput, rule: BatchRule) -> bool:
    """A request that alone passes a batch's limits goes alone."""
    return len(member.inputs) > rule.max_inputs or member.tokens > rule.max_tokens


# --- the window ----------------------------------------------------------------------

M = TypeVar("M")


class BatchWindow(Generic[M]):
    """The batches of one key: how many are upstream, and who waits for the next.

    Every method returns the batches to send now (each a list of members, in
    arrival order); the caller sends them and calls ``sent`` for each.
    """

    __slots__ = ("in_flight", "pending", "inputs", "tokens", "opened_at")

    def __init__(self) -> None:
        self.in_flight = 0  # batches of this key upstream now
        self.pending: List[M] = []  # the next batch
        self.inputs = 0
        self.tokens = 0
        self.opened_at = 0.0  # when the first of ``pending`` arrived (the timer's start)

    @property
    def idle(self) -> bool:
        """Nothing upstream and nobody waiting: the window may be forgotten."""
        return self.in_flight == 0 and not self.pending

    def arrive(self, member: M, inputs: int, tokens: int, rule: BatchRule, now: float) -> List[List[M]]:
        """A request arrives. Sent at once when nothing of its key is upstream;
        else it waits -- unless it fills the next batch to a limit, which then goes
        (a batch that it would overfill goes first, and it opens the next one).
        ``opened`` tells the caller to start the ``max_wait_ms`` timer."""
        if self.in_flight == 0 and not self.pending:
            return [[member]]
        out: List[List[M]] = []
        if self.pending and (self.inputs + inputs > rule.max_inputs or self.tokens + tokens > rule.max_tokens):
            out.append(self._take())
        if not self.pending:
            self.opened_at = now
        self.pending.append(member)
        self.inputs += inputs
        self.tokens += tokens
        if self.inputs >= rule.max_inputs or self.tokens >= rule.max_tokens:
            out.append(self._take())
        return out

    def leave(self, member: M, inputs: int, tokens: int) -> bool:
        """A waiting member's caller is gone: it loses its place. True if it was waiting."""
        try:
            self.pending.remove(member)
        except ValueError:
            return False
        self.inputs -= inputs
        self.tokens -= tokens
        return True

    def expire(self) -> List[List[M]]:
        """``max_wait_ms`` passed since the next batch opened: it goes."""
        return [self._take()] if self.pending else []

    def returned(self) -> List[List[M]]:
        """A batch of this key came back: whoever waited goes now."""
        self.in_flight -= 1
        return [self._take()] if self.pending else []

    def sent(self) -> None:
        self.in_flight += 1

    def _take(self) -> List[M]:
        batch, self.pending = self.pending, []
        self.inputs = self.tokens = 0
        return batch


# --- the upstream body, and the split of its answer -------------------------------------


def batch_body(members: Sequence[MemberInput]) -> bytes:
    """One upstream body for the members' inputs, in member order, asking for base64
    (a quarter of float JSON's size, and exact: converted for float callers)."""
    inputs: List[Any] = []
    for member in members:
        inputs += member.inputs
    return json_dumps(dict(members[0].params, input=inputs, encoding_format="base64"))


class Unsplittable(ValueError):
    """The upstream's answer to a batch is not an embeddings list with every input."""


def split_response(body: bytes, members: Sequence[MemberInput]) -> List[bytes]:
    """Each member's own response body, shaped as if it had been sent alone. Raises
    Unsplittable when the answer is not an embeddings list covering every input."""
    try:
        answer = json_loads(body)
    except ValueError:
        raise Unsplittable("the answer is not JSON") from None
    if type(answer) is not dict or type(answer.get("data")) is not list:
        raise Unsplittable('the answer has no "data" list')
    total = sum(len(m.inputs) for m in members)
    by_index: List[Any] = [None] * total
    for item in answer["data"]:
        index = item.get("index") if type(item) is dict else None
        if type(index) is not int or not 0 <= index < total or by_index[index] is not None:
            raise Unsplittable(f"an item has a missing, repeated or out-of-range index ({index!r})")
        if not isinstance(item.get("embedding"), (str, list)):
            raise Unsplittable(f"item {index} has no embedding")
        by_index[index] = item
    if any(item is None for item in by_index):
        raise Unsplittable(f"the answer has {len(answer['data'])} embeddings for {total} inputs")
    usage = answer.get("usage")
    shares = split_usage(usage, [m.tokens for m in members]) if type(usage) is dict else None
    out = []
    start = 0
    for number, member in enumerate(members):
        data = []
        for own, item in enumerate(by_index[start : start + len(member.inputs)]):
            data.append(dict(item, index=own, embedding=convert(item["embedding"], member.encoding)))
        start += len(member.inputs)
        shaped = dict(answer, data=data)
        if shares is not None:
            shaped["usage"] = shares[number]
        out.append(json_dumps(shaped))
    return out


def split_usage(usage: Dict[str, Any], weights: Sequence[int]) -> List[Dict[str, Any]]:
    """Each integer count of ``usage`` shared in proportion to ``weights`` by largest
    remainder (Hamilton's method): every share within 1 of its exact quota, and the
    shares add up to the count exactly. Anything but integer counts is copied."""
    total_weight = sum(weights)
    if total_weight <= 0:
        weights, total_weight = [1] * len(weights), len(weights)
    shares: List[Dict[str, Any]] = [{} for _ in weights]
    for field, value in usage.items():
        if type(value) is not int or value < 0:
            for share in shares:
                share[field] = value
            continue
        quotas = [divmod(value * w, total_weight) for w in weights]
        left = value - sum(q for q, _ in quotas)
        # Ties go to the earlier member: deterministic, and fair over many batches.
        order = sorted(range(len(weights)), key=lambda i: -quotas[i][1])
        for rank, i in enumerate(order):
            shares[i][field] = quotas[i][0] + (1 if rank < left else 0)
    return shares


_BIG_ENDIAN = sys.byteorder == "big"


def convert(embedding: Any, encoding: str) -> Any:
    """An embedding in the encoding the caller asked for. base64 is the bytes of
    little-endian float32 values (OpenAI's format); float JSON values are those
    float32 values, read exactly, so both encodings carry the same numbers."""
    if encoding == "base64":
        if type(embedding) is str:
            return embedding  # as the upstream sent it, byte for byte
        try:
            values = array("f", embedding)
        except (TypeError, OverflowError):
            raise Unsplittable("an embedding is not a list of numbers") from None
        if _BIG_ENDIAN:  # pragma: no cover - x86 and arm64 are little-endian
            values.byteswap()
        return base64.b64encode(values.tobytes()).decode("ascii")
    if type(embedding) is list:
        return embedding
    try:
        raw = base64.b64decode(embedding, validate=True)
    except ValueError:  # binascii.Error
        raise Unsplittable("an embedding is not valid base64") from None
    if len(raw) % 4:
        raise Unsplittable("a base64 embedding is not a whole number of float32 values")
    values = array("f")
    values.frombytes(raw)
    if _BIG_ENDIAN:  # pragma: no cover
        values.byteswap()
    return values.tolist()
