"""A bare aiohttp pass-through proxy: the floor the real proxy's overhead is measured against.

It does what any Python reverse proxy must do and nothing else — read the POST body, forward it
with one pooled ``ClientSession``, relay the answer (buffered bodies whole, event streams chunk by
chunk) — with no auth, no token counting and no Redis. One process, uvloop, no access log.

    python tests/bench/passthrough.py --port 9100 --upstream http://127.0.0.1:9090
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)
MAX_BODY = 10 * 1024 * 1024
"""The real proxy's default body limit, so both accept the same requests."""


async def forward(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    session = request.app[SESSION]
    async with session.post(
        request.app[UPSTREAM] + request.path,
        data=body,
        headers={"Content-Type": "application/json"},
    ) as upstream:
        if upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
            response = web.StreamResponse(status=upstream.status)
            response.content_type = "text/event-stream"
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
        data = await upstream.read()
        return web.Response(
            status=upstream.status, body=data, content_type=upstream.content_type or None
        )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _session(app: web.Application) -> AsyncIterator[None]:
    """Same pooling as the real proxy's upstream client: unlimited keep-alive connections."""
    app[SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
        timeout=aiohttp.ClientTimeout(total=600),
        skip_auto_headers=("User-Agent",),
    )
    yield
    await app[SESSION].close()


def build_app(upstream: str) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(_session)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9090")
    args = parser.parse_args()
    import uvloop

    web.run_app(
        build_app(args.upstream),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
