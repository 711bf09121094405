"""An embeddings origin for the batching tests: deterministic vectors per input.

Each input's vector is float32 values derived from its SHA-256, so a test can
compute what any input's embedding must be. ``encoding_format`` float answers
the float32 values as JSON numbers (read exactly: ``float(float32)``, as OpenAI
does); base64 answers their little-endian bytes. An input containing POISON
makes the origin answer the whole request 400, as a real server rejects a
batch for one bad input.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct
from typing import Any, Dict, List

from tests.support.origin import Origin, Received, Reply

DIMS = 8
EMBEDDINGS = b"/v1/embeddings"


def vector(item: Any, dims: int = DIMS) -> List[float]:
    """The float32 values of an input's embedding (a string or a token array)."""
    seed = item.encode() if isinstance(item, str) else json.dumps(item).encode()
    digest = (hashlib.sha256(seed).digest() * 4)[: 2 * dims]
    # Small signed values with many fraction bits, rounded to float32 below.
    values = [v / 7919.0 for v in struct.unpack(f"<{dims}h", digest)]
    return list(struct.unpack(f"<{dims}f", struct.pack(f"<{dims}f", *values)))


def base64_of(values: List[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")


def tokens_of(item: Any) -> int:
    """The origin's own token count (a tokenizer's, not pyproxy's estimate)."""
    return len(item.split()) + 1 if isinstance(item, str) else len(item)


def inputs_of(raw: Any) -> List[Any]:
    if isinstance(raw, str):
        return [raw]
    if raw and all(isinstance(t, int) for t in raw):
        return [raw]
    return list(raw)


def answer(body: Dict[str, Any], dims: int = DIMS) -> Dict[str, Any]:
    inputs = inputs_of(body["input"])
    encoding = body.get("encoding_format", "float")
    data = []
    for index, item in enumerate(inputs):
        values = vector(item, dims)
        embedding: Any = base64_of(values) if encoding == "base64" else values
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    used = sum(tokens_of(item) for item in inputs)
    return {
        "object": "list",
        "data": data,
        "model": body["model"],
        "usage": {"prompt_tokens": used, "total_tokens": used},
    }


def serve_embeddings(origin: Origin, *, delay: float = 0.0, reverse: bool = True) -> None:
    """/v1/embeddings on ``origin``. ``reverse``: data listed last index first, so a
    splitter that goes by position rather than by ``index`` is caught."""

    @origin.route(EMBEDDINGS)
    async def embeddings(req: Received, reply: Reply) -> None:
        body = json.loads(req.body)
        if delay:
            await asyncio.sleep(delay)
        if any("POISON" in str(item) for item in inputs_of(body["input"])):
            error = {"error": {"message": "bad input", "type": "invalid_request_error", "code": None}}
            await reply.full(400, json.dumps(error).encode(), [(b"content-type", b"application/json")])
            return
        out = answer(body)
        if reverse:
            out["data"].reverse()
        await reply.full(200, json.dumps(out).encode(), [(b"content-type", b"application/json")])
