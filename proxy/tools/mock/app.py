"""The mock's application: one ``Mock`` state, each protocol's handlers on their paths, the
middleware that records every exchange, and running it from the command line."""

from __future__ import annotations

import argparse
import asyncio
import collections
import time
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from proxy.tools.mock.anthropic import Anthropic
from proxy.tools.mock.bedrock import Bedrock
from proxy.tools.mock.core import Mock
from proxy.tools.mock.google import GOOGLE, Google
from proxy.tools.mock.openai import OpenAI
from proxy.tools.mock.openai_audio import Audio
from proxy.tools.mock.openai_images import Images
from proxy.tools.mock.openai_moderations import Moderations
from proxy.tools.mock.openai_responses import Responses
from proxy.tools.mock.openai_stored import Stored
from proxy.tools.mock.records import (
    EXCHANGE,
    EXCHANGES,
    RECEIVED,
    RECEIVED_MAXLEN,
    REPORTED,
    REPORTED_MAXLEN,
    MockExchange,
    MockOptions,
    ReceivedRequest,
    ReportedUsage,
)


@web.middleware
async def _record_exchange(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    exchange = MockExchange(request.path, request.transport, time.monotonic())
    request.app[EXCHANGES].append(exchange)
    request[EXCHANGE] = exchange
    try:
        response = await handler(request)
    except (asyncio.CancelledError, ConnectionError):
        exchange.peer_gone = True
        raise
    finally:
        exchange.ended = time.monotonic()
    if isinstance(response, web.Response):  # written whole by aiohttp after the handler
        exchange.complete = True
    return response


def build_mock_app(options: MockOptions = MockOptions()) -> web.Application:  # noqa: B008 (frozen)
    """Build the mock's app; ``app[RECEIVED]`` logs the most recent requests it received,
    ``app[REPORTED]`` the usage its answers carried and ``app[EXCHANGES]`` what it did for
    them."""
    received: collections.deque[ReceivedRequest] = collections.deque(maxlen=RECEIVED_MAXLEN)
    reported: collections.deque[ReportedUsage] = collections.deque(maxlen=REPORTED_MAXLEN)
    mock = Mock(options, received, reported)
    app = web.Application(middlewares=[_record_exchange])
    app[RECEIVED] = received
    app[REPORTED] = reported
    app[EXCHANGES] = collections.deque(maxlen=RECEIVED_MAXLEN)
    app[GOOGLE] = google = Google(mock)
    routes = [
        *OpenAI(mock).routes(),
        *Responses(mock).routes(),
        *Moderations(mock).routes(),
        *Images(mock).routes(),
        *Audio(mock).routes(),
        *Stored(mock).routes(),
        ("GET", "/v1/models", mock.models),
        *Anthropic(mock).routes(),
        *Bedrock(mock).routes(),
        *google.routes(),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    app.router.add_route("*", "/{tail:.*}", mock.not_found)
    return app


def run_mock(host: str, port: int, options: MockOptions) -> None:
    """Serve the mock until interrupted, on uvloop when installed, without access logs."""
    loop: asyncio.AbstractEventLoop | None = None
    try:
        import uvloop
    except ImportError:
        pass
    else:
        loop = uvloop.new_event_loop()
    web.run_app(build_mock_app(options), host=host, port=port, access_log=None, loop=loop)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m proxy.tools.mock``: run the mock for demos and load tests."""
    defaults = MockOptions()
    parser = argparse.ArgumentParser(description="Run the mock OpenAI-compatible upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9999)
    parser.add_argument("--latency-ms", type=float, default=defaults.latency_ms)
    parser.add_argument("--output-tokens", type=int, default=defaults.output_tokens)
    parser.add_argument("--chunk-delay-ms", type=float, default=defaults.chunk_delay_ms)
    parser.add_argument("--embedding-dim", type=int, default=defaults.embedding_dim)
    args = parser.parse_args(argv)
    options = MockOptions(
        latency_ms=args.latency_ms,
        output_tokens=args.output_tokens,
        chunk_delay_ms=args.chunk_delay_ms,
        embedding_dim=args.embedding_dim,
    )
    run_mock(args.host, args.port, options)
