"""Streaming both ways in bounded memory, SSE promptness, and backpressure."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import h11

from tests.support.client import Client, running_proxy, wait_until
from tests.support.origin import Origin, pattern_bytes

MB = 1024 * 1024


async def test_sse_events_arrive_one_by_one_promptly() -> None:
    """Each event reaches the client while the origin is still streaming, within a
    margin that holds on a loaded PyPy (the benchmark reports the precise delay)."""
    async with Origin() as origin, running_proxy(origin.url) as proxy:
        async with await Client.connect(proxy.port) as client:
            await client.send_request(b"GET", b"/sse?n=10&interval=0.1", [(b"accept", b"text/event-stream")])
            head = await client.read_head()
            assert head.status_code == 200
            assert dict(head.headers)[b"content-type"] == b"text/event-stream"
            delays = []
            buffer = b""
            done = False
            while not done:
                event = await client.next_event()
                assert isinstance(event, h11.Data), event
                buffer += event.data
                arrived = time.monotonic()
                while b"\n\n" in buffer:
                    line, buffer = buffer.split(b"\n\n", 1)
                    payload = line[len(b"data: ") :]
                    if payload == b"[DONE]":
                        done = True
                        break
                    delays.append(arrived - json.loads(payload)["sent"])
            assert isinstance(await client.next_event(), h11.EndOfMessage)
            assert len(delays) == 10
            # An event held back until the next one would be >= 100 ms late; 80 ms leaves
            # room for a JIT compile or a GC step on a loaded machine.
            assert max(delays) < 0.08, delays


async def test_20mb_download_sha256_and_bounded_buffering_for_slow_client() -> None:
    size = 20 * MB
    expected = hashlib.sha256(pattern_bytes(size)).hexdigest()
    async with Origin() as origin, running_proxy(origin.url) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, limit=64 * 1024)
        writer.write(b"GET /big?size=%d HTTP/1.1\r\nHost: x\r\n\r\n" % size)
        await writer.drain()
        # Do not read for a while: the proxy must stop reading the upstream
        # instead of buffering the whole 20 MB for us.
        await wait_until(lambda: len(proxy.connections) == 1 and next(iter(proxy.connections)).exchange is not None)
        client_conn = next(iter(proxy.connections))
        await asyncio.sleep(0.3)
        buffered = client_conn.transport.get_write_buffer_size()  # type: ignore[union-attr]
        assert buffered < 4 * MB, f"proxy buffered {buffered} bytes for a paused client"
        (upstream_conn,) = proxy.pool.active
        assert upstream_conn._reading_paused
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
        digest = hashlib.sha256()
        received = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(256 * 1024))
            elif isinstance(event, h11.Data):
                digest.update(event.data)
                received += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
        writer.close()
        await writer.wait_closed()
        assert received == size
        assert digest.hexdigest() == expected


async def test_10mb_upload_streams_with_sha256() -> None:
    size = 10 * MB
    payload = pattern_bytes(size)
    async with Origin() as origin, running_proxy(origin.url, max_body_size=16 * MB) as proxy:
        async with await Client.connect(proxy.port) as client:
            resp = await client.request(b"PUT", b"/echo", [(b"content-type", b"application/octet-stream")], payload)
            assert resp.status == 200
            info = resp.json()
            assert info["body_len"] == size
            assert info["body_sha256"] == hashlib.sha256(payload).hexdigest()
            # chunked upload of the same body
            await client.send_request(b"POST", b"/echo", [(b"transfer-encoding", b"chunked")], end=False)
            view = memoryview(payload)
            for start in range(0, size, 1 << 20):
                client.writer.write(client.conn.send(h11.Data(data=bytes(view[start : start + (1 << 20)]))))
                await client.writer.drain()
            client.writer.write(client.conn.send(h11.EndOfMessage()))
            resp = await client.read_response()
            assert resp.status == 200 and resp.json()["body_sha256"] == hashlib.sha256(payload).hexdigest()


async def test_slow_upstream_pauses_reading_from_the_client() -> None:
    release = asyncio.Event()
    if True:
        # An upstream that accepts and never reads: the proxy's writes to it
        # stall, so it must stop reading the client.
        stalled: list = []

        async def never_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            stalled.append(writer)
            await release.wait()
            writer.close()

        server = await asyncio.start_server(never_read, "127.0.0.1", 0, limit=1024)
        port = server.sockets[0].getsockname()[1]
        async with running_proxy(f"http://127.0.0.1:{port}", max_body_size=64 * MB) as slow_proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", slow_proxy.port)
            writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (48 * MB))
            chunk = b"x" * (1 << 20)
            sent = 0
            # Write until our own socket buffer stops draining: the proxy has
            # stopped reading from us. Bounded in count and in time.
            deadline = time.monotonic() + 10
            while sent < 48 * MB and time.monotonic() < deadline:
                writer.write(chunk)
                sent += len(chunk)
                try:
                    await asyncio.wait_for(writer.drain(), 0.5)
                except asyncio.TimeoutError:
                    break
            assert sent < 48 * MB, "the proxy kept reading although the upstream read nothing"
            client_conn = next(iter(slow_proxy.connections))
            assert client_conn.read_gate is not None and client_conn.read_gate.reasons
            assert client_conn.body is not None and client_conn.body._buffered <= 2 * MB
            writer.transport.abort()
            release.set()
        server.close()
        await server.wait_closed()


async def test_client_that_stops_reading_is_dropped_after_read_timeout() -> None:
    """A client that reads nothing for --read-timeout must not hold the upstream
    connection (and an LLM's generation) forever: both are closed."""
    async with Origin() as origin, running_proxy(origin.url, read_timeout=0.5) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, limit=16 * 1024)
        writer.transport.set_write_buffer_limits(0)
        sock = writer.get_extra_info("socket")
        import socket as socket_module

        sock.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_RCVBUF, 16 * 1024)
        writer.write(b"GET /big?size=%d HTTP/1.1\r\nHost: x\r\n\r\n" % (64 * MB))
        await writer.drain()
        reader._transport.pause_reading()  # type: ignore[attr-defined]  # and never read again
        await wait_until(lambda: len(origin.requests) == 1)
        await asyncio.wait_for(origin.connections[0].closed.wait(), 15)
        await wait_until(lambda: not proxy.connections, timeout=5)
        assert proxy.pool.size == 0
        writer.transport.abort()
