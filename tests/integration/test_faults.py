"""Fault cases found by a fault-injection run (issue 10), each counted exactly.

The origin records what it received; every client request must get exactly one
answer, no POST may reach the origin twice, and no upstream exchange may outlive
the client that asked for it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from typing import List

import h11
import pytest

from tests.support.client import Client, running_proxy, wait_until
from tests.support.origin import Origin, pattern_bytes

# Every size from 1 KiB to 8 MiB in powers of two, and the sizes in between that
# the fault run lost (128-300 KB: larger than one read, smaller than the
# request-body buffer's high-water mark).
BODY_SIZES = sorted(
    {1 << n for n in range(10, 24)} | {1 << 23} | {100_000, 131_072, 150_000, 200_000, 262_144, 300_000, 3_000_000}
)


async def _post(port: int, body: bytes, *, pieces: int) -> dict:
    """One POST /echo on a new client connection; the body in one write or in pieces."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = (
            b"POST /echo HTTP/1.1\r\nhost: proxy.test\r\ncontent-type: application/octet-stream\r\n"
            b"content-length: %d\r\n\r\n" % len(body)
        )
        if pieces == 1:
            writer.write(head + body)
            await writer.drain()
        else:
            writer.write(head)
            step = max(1, len(body) // pieces)
            for start in range(0, len(body), step):
                writer.write(body[start : start + step])
                await writer.drain()
                await asyncio.sleep(0)
        client = Client(reader, writer)
        # the request went out raw: tell the client's h11 what it is reading the answer to
        client.conn.send(h11.Request(method="POST", target="/echo", headers=[("host", "x"), ("content-length", "0")]))
        client.conn.send(h11.EndOfMessage())
        resp = await asyncio.wait_for(client.read_response(), 20)
        assert resp.status == 200 and resp.complete, (resp.status, resp.body[:200])
        return resp.json()
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


@pytest.mark.parametrize("pieces", [1, 7], ids=["one-write", "pieces"])
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh-upstream", "reused-upstream"])
async def test_post_body_every_size_reaches_the_origin_whole(fresh: bool, pieces: int) -> None:
    """Issue 10 item 5: a body that completed while the upstream connection was being
    opened was sent as its head alone, and the origin waited for a body forever."""
    async with Origin() as origin, running_proxy(origin.url, cache_enabled=False, dedup_enabled=False) as proxy:
        for size in BODY_SIZES:
            body = pattern_bytes(size)
            if fresh:
                proxy.pool.close_idle()  # the next request must open a new connection
            else:
                await _post(proxy.port, b"warm", pieces=1)  # leaves an idle connection
                assert proxy.pool.idle, "no idle connection to reuse"
            info = await _post(proxy.port, body, pieces=pieces)
            assert info["body_len"] == size, size
            assert info["body_sha256"] == hashlib.sha256(body).hexdigest(), size
