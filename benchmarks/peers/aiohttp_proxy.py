"""The aiohttp peer: aiohttp server + one pooled ClientSession, streaming both ways.

Written to be a fair, well-configured competitor: keep-alive pool sized like
pyproxy's defaults, no body buffering, hop-by-hop headers removed.
Usage: python -m benchmarks.peers.aiohttp_proxy --upstream URL --port N
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
from aiohttp import web

HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
       "content-length", "host"}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass

    async def on_startup(app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=1000, limit_per_host=1000, keepalive_timeout=4)
        app["session"] = aiohttp.ClientSession(connector=connector, auto_decompress=False)

    async def on_cleanup(app: web.Application) -> None:
        await app["session"].close()

    async def relay(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        data = request.content if request.body_exists else None
        async with request.app["session"].request(
            request.method, args.upstream + request.path_qs, headers=headers, data=data, allow_redirects=False
        ) as upstream:
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP}
            response = web.StreamResponse(status=upstream.status, headers=out_headers)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/{tail:.*}", relay)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
