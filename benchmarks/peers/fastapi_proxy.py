"""The FastAPI + httpx peer: the stack pyproxy's users run today, done well.

One pooled httpx.AsyncClient, streaming request and response bodies
(``StreamingResponse`` over ``aiter_raw``), served by uvicorn with uvloop and
httptools. Usage: python -m benchmarks.peers.fastapi_proxy --upstream URL --port N
"""

from __future__ import annotations

import argparse

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
       "content-length", "host"}  # fmt: skip


def build_app(upstream: str) -> FastAPI:
    client = httpx.AsyncClient(
        base_url=upstream,
        limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100, keepalive_expiry=4),
        timeout=httpx.Timeout(300, connect=10),
    )
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
    async def relay(request: Request, path: str) -> StreamingResponse:
        headers = [(k, v) for k, v in request.headers.raw if k.decode().lower() not in HOP]
        upstream_request = client.build_request(
            request.method, request.url.path, params=request.url.query, headers=headers, content=request.stream()
        )
        upstream = await client.send(upstream_request, stream=True)
        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP}
        return StreamingResponse(
            upstream.aiter_raw(), status_code=upstream.status_code, headers=out_headers,
            background=BackgroundTask(upstream.aclose),
        )  # fmt: skip

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(build_app(args.upstream), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False, loop="uvloop", http="httptools")  # fmt: skip


if __name__ == "__main__":
    main()
