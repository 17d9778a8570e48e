"""A reverse proxy that adds a fixed latency to every request: the "far away" upstream of the bench.

    python -m bench.delay_proxy --listen 127.0.0.1:PORT --target http://127.0.0.1:P --delay-ms 50
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
from aiohttp import web

_SKIP = {"host", "content-length", "transfer-encoding", "connection"}


def make_app(target: str, delay: float) -> web.Application:
    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app["session"] = aiohttp.ClientSession(auto_decompress=False)
        yield
        await app["session"].close()

    async def forward(request: web.Request) -> web.Response:
        await asyncio.sleep(delay)
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP}
        session: aiohttp.ClientSession = request.app["session"]
        async with session.request(request.method, target + request.path_qs, data=body or None,
                                   headers=headers) as up:
            payload = await up.read()
            out = {k: v for k, v in up.headers.items() if k.lower() not in _SKIP}
            return web.Response(body=payload, status=up.status, headers=out)

    app = web.Application(client_max_size=256 * 1024 * 1024)
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--delay-ms", type=float, required=True)
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    web.run_app(make_app(args.target.rstrip("/"), args.delay_ms / 1000), host=host, port=int(port),
                print=None, access_log=None)


if __name__ == "__main__":
    main()
