"""The OpenAI-compatible endpoints: the OpenAI dialect of the shared admission
(``proxy.gateway.pipeline``): Bearer keys, tiktoken-counted reservations, OpenAI usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from proxy.config import Protocol
from proxy.errors import ApiError, bad_request
from proxy.gateway import pipeline
from proxy.gateway.admission import Admitted, RateLimited
from proxy.gateway.auth import bearer_token
from proxy.gateway.decisions import admitted_headers
from proxy.gateway.metering import (
    ENDPOINTS,
    StreamMeter,
    Usage,
    clamped_body,
    output_cap,
    usage_from_body,
)
from proxy.gateway.model_routes import ModelRoute
from proxy.gateway.pipeline import Exchange, Reservation
from proxy.gateway.pricing import cost_nano
from proxy.gateway.state import GATEWAY, Gateway
from proxy.gateway.tokenizer import count_prompt, count_text
from proxy.providers import fallback
from proxy.providers.http_client import Response, UpstreamError, UpstreamTimeout
from proxy.providers.upstream import (
    EVENT_ENDS,
    client_headers,
    complete_events,
    upstream_broken,
    upstream_timeout,
)

_USAGE_OPTION = b'{"stream_options":{"include_usage":true},'
_BROKEN_STREAM_EVENT = (
    b'data: {"error":{"message":"The upstream stream broke off before it ended; the answer is '
    b'incomplete.","type":"server_error","code":"upstream_stream_broken","param":null}}\n\n'
)


def _upstream_body(
    raw: bytes,
    body: dict[str, Any],
    endpoint: str,
    upstream_model: str,
    stream: bool,
    clamped_cap: int | None = None,
) -> tuple[bytes, bool]:
    """The body sent upstream, and whether the usage chunk must be kept from the client. The
    client's bytes go as they came unless something must change: the model's name, the usage
    option of a stream, or an output cap lowered by clamping."""
    strip_usage = False
    same_model = body.get("model") == upstream_model
    changed = not same_model
    if clamped_cap is not None:
        body = clamped_body(endpoint, body, clamped_cap)
        same_model = False  # re-encoded below: no splicing into the client's bytes
        changed = True
    if stream and endpoint in ("chat/completions", "completions"):
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise bad_request("'stream_options' must be an object.", param="stream_options")
        if not (options or {}).get("include_usage"):
            strip_usage = True
            opening = raw.lstrip()
            if options is None and same_model and opening.startswith(b"{"):
                # Splice instead of re-encoding: a long prompt's body is not serialised twice.
                return _USAGE_OPTION + opening[1:], strip_usage
            body = {**body, "stream_options": {**(options or {}), "include_usage": True}}
            changed = True
    if not changed:
        return raw, strip_usage
    body = {**body, "model": upstream_model}
    return json.dumps(body, separators=(",", ":")).encode(), strip_usage


def _text_of_body(endpoint: str, data: Any) -> str:
    """Generated text of a buffered answer, for upstreams that report no usage."""
    if not isinstance(data, dict):
        return ""
    parts: list[str] = []
    if endpoint == "responses":
        for item in data.get("output") or ():
            for content in (item.get("content") or ()) if isinstance(item, dict) else ():
                if isinstance(content, dict) and isinstance(content.get("text"), str):
                    parts.append(content["text"])
        return "".join(parts)
    for choice in data.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if isinstance(choice.get("text"), str):
            parts.append(choice["text"])
        message = choice.get("message")
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            parts.append(message["content"])
    return "".join(parts)


class OpenAIDialect:
    protocol: Protocol = "openai"

    def api_key(self, request: web.Request) -> str:
        return bearer_token(request)

    async def reserve(
        self, headers: Mapping[str, str], endpoint: str, body: dict[str, Any], route: ModelRoute
    ) -> Reservation:
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise bad_request("'stream' must be a boolean.", param="stream")
        cap = output_cap(endpoint, body, route)
        prompt_tokens = await count_prompt(route.encoding, endpoint, body)
        cost = cost_nano(route.price, prompt_tokens, cap.tokens)
        return Reservation(
            prompt_tokens,
            cap.tokens,
            cost,
            stream and endpoint != "embeddings",
            cap.param,
            choices=cap.choices,
            input_cost=prompt_tokens * route.price.input_nano_per_m if cap.tokens else None,
            output_rate=route.price.output_nano_per_m,
        )

    def refusal_headers(self, decision: RateLimited, now: float) -> dict[str, str]:
        return {}

    async def forward(
        self,
        request: web.Request,
        gw: Gateway,
        exchange: Exchange,
        body: dict[str, Any],
        reservation: Reservation,
        decision: Admitted,
    ) -> web.StreamResponse:
        return await _forward(request, gw, exchange, body, reservation.stream, decision)


OPENAI = OpenAIDialect()


async def handle_llm(request: web.Request, endpoint: str) -> web.StreamResponse:
    return await pipeline.handle(request, endpoint, OPENAI)


async def _forward(
    request: web.Request,
    gw: Gateway,
    exchange: Exchange,
    body: dict[str, Any],
    stream: bool,
    decision: Admitted,
) -> web.StreamResponse:
    raw = await request.read()
    bodies: dict[str, tuple[bytes, bool]] = {}

    def body_for(candidate: fallback.Candidate) -> bytes:
        # Upstreams of one model may name it differently (an Azure deployment): one body each.
        if candidate.model not in bodies:
            bodies[candidate.model] = _upstream_body(
                raw, body, exchange.endpoint, candidate.model, stream, exchange.clamped_cap
            )
        return bodies[candidate.model][0]

    body_for(exchange.route.upstreams[0])  # an invalid body is a 400 before anything is sent
    sent_at = time.perf_counter()
    try:
        served = await fallback.send(
            gw.upstream,
            gw.cooldowns,
            exchange.route.upstreams,
            exchange.endpoint,
            body_for,
            request.headers,
        )
    except ApiError as exc:
        exchange.extra["upstream_error"] = "timeout" if exc.status == 504 else "connect"
        raise
    upstream = served.response
    strip_usage = bodies[served.candidate.model][1]
    exchange.upstream = served.candidate.upstream.name
    if served.skipped:
        exchange.extra["fallback_from"] = ",".join(served.skipped)
    try:
        exchange.status = upstream.status
        headers = client_headers(upstream.headers)
        headers.update(admitted_headers(decision))
        headers["x-upstream"] = exchange.upstream
        is_sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
        if upstream.status == 200 and is_sse:
            return await _relay_stream(request, gw, exchange, upstream, headers, strip_usage)
        try:
            data = await upstream.read()
        except UpstreamTimeout as exc:
            exchange.extra["upstream_error"] = "timeout"
            raise upstream_timeout(served.candidate.upstream) from exc
        except UpstreamError as exc:
            exchange.extra["upstream_error"] = "broken_body"
            raise upstream_broken(served.candidate.upstream) from exc
        exchange.upstream_ms = (time.perf_counter() - sent_at) * 1000
        if upstream.status == 200:
            exchange.usage = _buffered_usage(exchange, data)
        return web.Response(status=upstream.status, body=data, headers=headers)
    finally:
        upstream.release()


def _buffered_usage(exchange: Exchange, data: bytes) -> Usage:
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = None
    usage = usage_from_body(exchange.endpoint, parsed)
    if usage is not None:
        return usage
    text = _text_of_body(exchange.endpoint, parsed)
    output = count_text(exchange.route.encoding, text) if text else 0
    return Usage(exchange.prompt_tokens, output, reported=False)


async def _relay_stream(
    request: web.Request,
    gw: Gateway,
    exchange: Exchange,
    upstream: Response,
    headers: Any,
    strip_usage: bool,
) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers=headers)
    response.content_type = "text/event-stream"
    meter = StreamMeter(exchange.endpoint, exchange.route, exchange.prompt_tokens, strip_usage)
    sent_at = time.perf_counter()
    try:
        await response.prepare(request)
        last: bytes | None = None  # held back so the end of the stream costs one write, not two
        pending = b""  # the start of an event whose end has not arrived yet
        async for chunk in upstream.iter_chunks():
            if pending:
                chunk, pending = pending + chunk, b""
            if not chunk.endswith(EVENT_ENDS):
                chunk, pending = complete_events(chunk)
            data = meter.relay(chunk) if chunk else b""
            if last is not None:
                await response.write(last)
                last = None
            if data:
                if data.endswith((b"[DONE]\n\n", b"[DONE]\r\n\r\n")):
                    last = data
                else:
                    await response.write(data)
        if pending.strip():
            data = meter.relay(pending)
            last = last + data if last else data
        await response.write_eof(last or b"")
    except (ConnectionResetError, ConnectionError):
        exchange.client_gone = True
    except asyncio.CancelledError:
        exchange.client_gone = True
        raise
    except UpstreamError:
        # The client must not mistake a truncated answer for a complete one: end the stream
        # with an error event (the OpenAI SDKs raise APIError on it) and no [DONE].
        exchange.extra["upstream_error"] = "broken_stream"
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write(_BROKEN_STREAM_EVENT)
            await response.write_eof()
    finally:
        exchange.upstream_ms = (time.perf_counter() - sent_at) * 1000
        exchange.usage = meter.usage()
    return response


def llm_handler(endpoint: str) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await handle_llm(request, endpoint)

    handler.__name__ = "llm_" + endpoint.replace("/", "_")
    return handler


async def list_models(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    identity = await gw.auth.identify(request)
    data = [
        route.listing(name)
        for name, route in gw.routes.items()
        if identity.may_use(name) or identity.may_use(route.name) or identity.may_use(route.entry)
    ]
    return web.json_response({"object": "list", "data": data})


def add_routes(app: web.Application) -> None:
    for prefix in ("/v1", "/api/v1/llm"):
        for endpoint in ENDPOINTS:
            app.router.add_post(f"{prefix}/{endpoint}", llm_handler(endpoint))
        app.router.add_get(f"{prefix}/models", list_models)
