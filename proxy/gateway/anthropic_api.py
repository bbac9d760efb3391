"""Anthropic's Messages API: ``POST /v1/messages`` and ``/v1/messages/count_tokens``, the
Anthropic dialect of the shared admission (``proxy.gateway.pipeline``).

Keys come as ``x-api-key`` or ``Authorization: Bearer``; a request reserves the worst case of
``proxy.gateway.claude_bound`` plus ``max_tokens`` at the dearest input rate; the answer is
relayed as it arrives and settled from the usage the upstream reports (cache reads and writes
at their own rates). ``count_tokens`` passes the same admission (auth, model, rate limits) with
nothing reserved and is never charged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from proxy.config import Protocol
from proxy.errors import bad_request
from proxy.gateway import pipeline, relay
from proxy.gateway.auth import anthropic_key
from proxy.gateway.claude_bound import prompt_bound
from proxy.gateway.decisions import admitted_headers, anthropic_ratelimit_headers
from proxy.gateway.metering import MAX_OUTPUT_CAP, Usage
from proxy.gateway.model_routes import ModelRoute
from proxy.gateway.pipeline import Exchange, Reservation
from proxy.gateway.pricing import reserve_cost_nano
from proxy.gateway.state import Gateway
from proxy.ledger.admission import Admitted, RateLimited
from proxy.openapi import SSE_EVENT, Reply, operation
from proxy.providers import anthropic, fallback
from proxy.providers.upstream import (
    split_events,
)

PREFIXES = ("/v1", "/api/v1/llm", "/api/v1/llm/v1")
"""``/api/v1/llm/v1`` is where an Anthropic SDK given ``base_url=…/api/v1/llm`` sends."""


def _usage(counts: anthropic.TokenCounts, reported: bool = True) -> Usage:
    return Usage(
        input_tokens=counts.total_input,
        output_tokens=counts.output,
        cached_tokens=counts.cache_read,
        cache_write_tokens=counts.cache_write - counts.cache_write_1h,
        cache_write_1h_tokens=counts.cache_write_1h,
        reported=reported,
    )


def _positive_int(body: dict[str, Any], name: str) -> int:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_OUTPUT_CAP:
        raise bad_request(
            f"'{name}' is required and must be a positive integer no greater than "
            f"{MAX_OUTPUT_CAP}.",
            param=name,
        )
    return value


class AnthropicDialect:
    protocol: Protocol = "anthropic"

    def api_key(self, request: web.Request) -> str:
        return anthropic_key(request)

    async def reserve(
        self, headers: Mapping[str, str], endpoint: str, body: dict[str, Any], route: ModelRoute
    ) -> Reservation:
        if endpoint == "messages/count_tokens":
            return Reservation(0, 0, 0)
        max_tokens = _positive_int(body, "max_tokens")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise bad_request("'stream' must be a boolean.", param="stream")
        long_context = "context-1m" in headers.get("anthropic-beta", "")
        bound = prompt_bound(body, route.context_window, long_context)
        cost = reserve_cost_nano(route.price, bound, max_tokens)
        return Reservation(
            bound,
            max_tokens,
            cost,
            stream,
            "max_tokens",
            input_cost=bound * route.price.dearest_input_nano_per_m,
            output_rate=route.price.output_nano_per_m,
        )

    def refusal_headers(self, decision: RateLimited, now: float) -> dict[str, str]:
        return anthropic_ratelimit_headers(decision, now)

    async def forward(
        self,
        request: web.Request,
        gw: Gateway,
        exchange: Exchange,
        body: dict[str, Any],
        reservation: Reservation,
        decision: Admitted,
    ) -> web.StreamResponse:
        raw = await request.read()
        if exchange.clamped_cap is not None:
            body = {**body, "max_tokens": exchange.clamped_cap}

        def body_for(candidate: fallback.Candidate) -> bytes:
            if body.get("model") == candidate.model and exchange.clamped_cap is None:
                return raw
            return json.dumps({**body, "model": candidate.model}, separators=(",", ":")).encode()

        sent_at = time.perf_counter()
        served = await relay.send(request, gw, exchange, body_for)
        upstream = served.response
        try:
            exchange.status = upstream.status
            headers = relay.answer_headers(
                served,
                {**admitted_headers(decision), **anthropic_ratelimit_headers(decision, gw.clock())},
            )
            if relay.is_stream(served):
                meter = _StreamMeter(exchange)
                return await relay.relay_stream(
                    request, exchange, upstream, headers, meter, _ENDS, sent_at
                )
            data = await relay.read_buffered(exchange, served, sent_at, self._usage_of(exchange))
            return web.Response(status=upstream.status, body=data, headers=headers)
        finally:
            upstream.release()

    @staticmethod
    def _usage_of(exchange: Exchange) -> Callable[[bytes], Usage]:
        if exchange.endpoint != "messages":
            return lambda _data: Usage(0, 0)  # count_tokens is relayed, never charged
        return lambda data: _buffered_usage(exchange, data)


ANTHROPIC = AnthropicDialect()


def _buffered_usage(exchange: Exchange, data: bytes) -> Usage:
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = None
    counts = anthropic.usage_of_message(parsed)
    if counts is not None:
        return _usage(counts)
    # No usage reported: the input bound, and the answer's text in bytes (both upper bounds).
    generated = 0
    content = parsed.get("content") if isinstance(parsed, dict) else None
    for block in content if isinstance(content, list) else ():
        if isinstance(block, dict):
            text = block.get("text") or block.get("thinking")
            if isinstance(text, str):
                generated += len(text.encode("utf-8", "surrogatepass"))
            elif "input" in block:
                generated += len(json.dumps(block["input"]).encode())
    return Usage(exchange.prompt_tokens, min(generated, exchange.output_cap), reported=False)


def _stream_usage(exchange: Exchange, tracker: anthropic.StreamUsage) -> Usage:
    """The upstream's own counts once its final ``message_delta`` arrived; before that, upper
    bounds of what it may bill: the input bound until ``message_start`` reported the input,
    and the bytes of the deltas relayed (at most ``max_tokens``) for the output."""
    if tracker.finished:
        return _usage(tracker.counts)
    counts = tracker.counts
    output = max(counts.output, min(tracker.generated_bytes, exchange.output_cap))
    if tracker.started:
        usage = _usage(counts, reported=False)
        usage.output_tokens = output
        return usage
    return Usage(exchange.prompt_tokens, output, reported=False)


class _StreamMeter:
    """A Messages stream passes byte for byte; its usage events are followed as they pass."""

    def __init__(self, exchange: Exchange) -> None:
        self._exchange = exchange
        self._tracker = anthropic.StreamUsage()

    def relay(self, block: bytes) -> bytes:
        self._tracker.observe(split_events(block))
        return block

    def usage(self) -> Usage:
        return _stream_usage(self._exchange, self._tracker)


_ENDS = relay.StreamEnds(
    broken=anthropic.BROKEN_STREAM_EVENT,
    timeout=b'event: error\ndata: {"type":"error","error":{"type":"api_error","message":"The '
    b'upstream did not finish in time; the answer is incomplete."}}\n\n',
)
"""Stream ends the ``anthropic`` SDKs raise on (an ``error`` event, never ``message_stop``)."""


_ANTHROPIC_BODY = {
    "type": "object",
    "required": ["model"],
    "properties": {"model": {"type": "string"}, "max_tokens": {"type": "integer"}},
    "additionalProperties": True,
    "description": "Anthropic's request body, relayed as sent.",
}
_ANTHROPIC_ERRORS = {
    400: "Invalid input, or a model this endpoint does not serve.",
    403: "The key may not use this model.",
    404: "No such model.",
    429: "A rate limit or budget refused the request before it reached the upstream.",
    502: "The upstream could not be reached, or broke off its answer.",
    504: "The upstream did not answer in time.",
}


def _handler(endpoint: str) -> Any:
    answers = [Reply(200, "The upstream's answer.", schema={"type": "object"})]
    if endpoint == "messages":
        answers.append(
            Reply(
                200,
                "With `stream: true`: the upstream's events, relayed as they arrive.",
                media="text/event-stream",
                schema=SSE_EVENT,
            )
        )

    @operation(
        f"Anthropic {endpoint}",
        tag="anthropic",
        auth="anthropic",
        body_schema=_ANTHROPIC_BODY,
        answers=tuple(answers),
        errors=_ANTHROPIC_ERRORS,
        relayed=True,
        description=f"Anthropic's `POST /v1/{endpoint}`, admitted and metered like every route"
        + (" (never charged)." if endpoint != "messages" else "."),
    )
    async def handler(request: web.Request) -> web.StreamResponse:
        return await pipeline.handle(request, endpoint, ANTHROPIC)

    handler.__name__ = "anthropic_" + endpoint.replace("/", "_")
    return handler


def add_routes(app: web.Application) -> None:
    for prefix in PREFIXES:
        for endpoint in anthropic.ENDPOINTS:
            app.router.add_post(f"{prefix}/{endpoint}", _handler(endpoint))
