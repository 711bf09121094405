"""A small SSE origin for the benchmark: N events per stream at a fixed interval.

``GET /sse?n=N&interval=S`` answers ``text/event-stream``, chunked; each event
carries the CLOCK_MONOTONIC time it was written, so a client on the same
machine measures each event's delay through a proxy. ``GET /slow?ms=M``
answers a small JSON body after M milliseconds (the dedup scenario), and
``GET /count`` how many /slow requests arrived so far (``/count?what=sse``: SSE streams). Runs on any interpreter.
Usage: python benchmarks/sse_origin.py PORT
"""

from __future__ import annotations

import asyncio
import sys
import time
from urllib.parse import parse_qs, urlsplit

SLOW_BODY = b'{"object":"list","data":[{"id":"gpt-bench","object":"model"}]}'
slow_requests = 0
sse_streams = 0


def small_response(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    global slow_requests, sse_streams
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1].decode()
            query = parse_qs(urlsplit(target).query)
            if target.startswith("/slow"):
                slow_requests += 1
                await asyncio.sleep(float(query.get("ms", ["50"])[0]) / 1000)
                writer.write(small_response(SLOW_BODY))
                continue
            if target.startswith("/count"):
                counted = sse_streams if "what=sse" in target else slow_requests
                writer.write(small_response(b"%d" % counted))
                continue
            sse_streams += 1
            count = int(query.get("n", ["10"])[0])
            interval = float(query.get("interval", ["0.1"])[0])
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
            start = time.monotonic()
            for i in range(count):
                # fixed schedule, not sleep-after-write: intervals do not drift
                delay = start + i * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                event = b'data: {"i":%d,"t":%.6f,"choices":[{"delta":{"content":"token"}}]}\n\n' % (i, time.monotonic())
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
            done = b"data: [DONE]\n\n"
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(int(sys.argv[1])))
