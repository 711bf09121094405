"""An origin of one large object with a validator (the revalidation benchmark).

``GET /obj``: SIZE bytes, ``ETag: "v1"``, ``Last-Modified``, ``Cache-Control:
max-age=1``. With VALIDATE=1 a matching ``If-None-Match`` gets a 304; with 0 the
origin ignores validators (a cache talking to it can only refetch). ``GET
/__stats`` answers what it sent: requests, 200s, 304s, body bytes, connections.
Usage: python benchmarks/etag_origin.py PORT SIZE VALIDATE
"""

from __future__ import annotations

import asyncio
import json
import sys

stats = {"requests": 0, "full": 0, "not_modified": 0, "body_bytes": 0, "connections": 0}
ETAG = b'"v1"'
HEADERS = b'etag: "v1"\r\nlast-modified: Sun, 06 Nov 1994 08:49:37 GMT\r\ncache-control: max-age=1\r\n'


class Origin(asyncio.Protocol):
    def __init__(self, body: bytes, validate: bool) -> None:
        self.body = body
        self.validate = validate
        self.buf = b""
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        stats["connections"] += 1

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head, buf = buf[:end].lower(), buf[end + 4 :]
            if head.startswith(b"get /__stats"):
                body = json.dumps(stats).encode()
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                continue
            stats["requests"] += 1
            if self.validate and b'if-none-match: "v1"' in head:
                stats["not_modified"] += 1
                self.transport.write(b"HTTP/1.1 304 Not Modified\r\n" + HEADERS + b"\r\n")
                continue
            stats["full"] += 1
            stats["body_bytes"] += len(self.body)
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                + HEADERS
                + b"content-length: %d\r\n\r\n" % len(self.body)
            )
            self.transport.write(self.body)
        self.buf = buf


async def main(port: int, size: int, validate: bool) -> None:
    body = bytes(range(256)) * (size // 256)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Origin(body, validate), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"))
