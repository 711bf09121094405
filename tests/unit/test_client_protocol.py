"""The client protocol driven with scripted bytes through a fake transport."""

from __future__ import annotations

import asyncio
import json
from typing import Any, List

from pyproxy.config import Settings, parse_upstream
from pyproxy.proxy import Proxy
from pyproxy.server.protocol import ClientConnection
from tests.support.client import parse_raw_response
from tests.support.fakes import FakeTransport


def make_client(**overrides: Any) -> ClientConnection:
    values = dict(upstream=parse_upstream("http://127.0.0.1:9"), listen=("127.0.0.1", 0))
    values.update(overrides)
    proxy = Proxy(Settings(**values), asyncio.get_running_loop())  # type: ignore[arg-type]
    client = ClientConnection(proxy)
    client.connection_made(FakeTransport(client))
    return client


async def settle(client: ClientConnection) -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_bad_request_answered_without_a_handler() -> None:
    client = make_client()
    client.data_received(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n")
    transport = client.transport
    assert isinstance(transport, FakeTransport)
    assert transport.closing and client.task is None
    resp = parse_raw_response(transport.data)
    assert resp.status == 400 and json.loads(resp.body)["error"]["code"] == 400
    await settle(client)


async def test_head_split_across_reads_is_parsed() -> None:
    client = make_client()
    pieces: List[bytes] = [b"GE", b"T /v1/models HT", b"TP/1.1\r\nHo", b"st: x\r\n", b"\r\n"]
    for piece in pieces[:-1]:
        client.data_received(piece)
        assert client.task is None
    client.data_received(pieces[-1])
    # A handler started for the complete head: as a GET, on a coalesced fetch.
    assert client.busy and client.exchange is not None
    assert len(client.proxy.coalescer) == 1
    client.transport.close()  # type: ignore[union-attr]
    await settle(client)
    assert client.task is None and client.exchange is None and client.closed
    assert len(client.proxy.coalescer) == 0  # the fetch went with its only client


async def test_oversized_head_in_pieces_is_431() -> None:
    client = make_client(max_header_size=1024)
    client.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n")
    for _ in range(10):
        if client.closed:
            break
        client.data_received(b"X-Filler: " + b"a" * 200 + b"\r\n")
    assert client.closed
    assert parse_raw_response(client.transport.data).status == 431  # type: ignore[union-attr]
    await settle(client)


async def test_body_over_high_water_pauses_reading() -> None:
    client = make_client()
    client.data_received(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
    client.data_received(b"a" * 300_000)
    transport = client.transport
    assert isinstance(transport, FakeTransport)
    # the handler has not consumed anything yet: reading is paused
    assert not transport.reading
    assert client.body is not None
    chunks = await client.body.read()
    assert chunks is not None and sum(map(len, chunks)) == 300_000
    assert transport.reading  # drained: reading again
    transport.close()
    await settle(client)


async def test_buffered_reads_parse_like_data_received() -> None:
    """The reused-buffer protocol (stdlib loops) hands each read over intact."""
    from pyproxy.server.protocol import BufferedClientConnection

    proxy = make_client().proxy
    client = BufferedClientConnection(proxy)
    client.connection_made(FakeTransport(client))
    for piece in (b"GET / HTTP/1.1\r\nHost: x\r\nBad", b" Header: 1\r\n\r\n"):
        view = client.get_buffer(-1)
        view[: len(piece)] = piece
        client.buffer_updated(len(piece))
    assert client.closed
    assert parse_raw_response(client.transport.data).status == 400  # type: ignore[union-attr]
    await settle(client)
