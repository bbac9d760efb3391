"""The OpenAI-compatible endpoints: the OpenAI dialect of the shared admission
(``proxy.gateway.pipeline``): Bearer keys, tiktoken-counted reservations, OpenAI usage;
forwarding and relaying as every dialect does (``proxy.gateway.relay``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from proxy.config import Protocol
from proxy.errors import ApiError, bad_request
from proxy.gateway import pipeline, relay
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
from proxy.gateway.model_routes import ModelRoute, UnpricedModel
from proxy.gateway.pipeline import Exchange, Reservation
from proxy.gateway.pricing import cost_nano
from proxy.gateway.state import GATEWAY, Gateway
from proxy.gateway.tokenizer import count_prompt, count_text
from proxy.ledger.admission import Admitted, RateLimited
from proxy.openapi import SSE_EVENT, Reply, operation
from proxy.providers import fallback

_USAGE_OPTION = b'{"stream_options":{"include_usage":true},'
_ENDS = relay.StreamEnds(
    broken=b'data: {"error":{"message":"The upstream stream broke off before it ended; the '
    b'answer is incomplete.","type":"server_error","code":"upstream_stream_broken",'
    b'"param":null}}\n\n',
    timeout=b'data: {"error":{"message":"The upstream did not finish in time; the answer is '
    b'incomplete.","type":"server_error","code":"upstream_timeout","param":null}}\n\n',
)
"""Stream ends the OpenAI SDKs raise APIError on (an error event, and no [DONE])."""


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
            if "stream_options" not in body and same_model and opening.startswith(b"{"):
                # Splice instead of re-encoding: a long prompt's body is not serialised twice.
                # Only when the key is absent: next to a "stream_options": null the spliced
                # one would be a duplicate, and an upstream keeping the last sends no usage.
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
    served = await relay.send(request, gw, exchange, body_for)
    upstream = served.response
    try:
        exchange.status = upstream.status
        headers = relay.answer_headers(served, admitted_headers(decision))
        if relay.is_stream(served):
            strip_usage = bodies[served.candidate.model][1]
            meter = StreamMeter(
                exchange.endpoint, exchange.route, exchange.prompt_tokens, strip_usage
            )
            return await relay.relay_stream(
                request, exchange, upstream, headers, meter, _ENDS, sent_at
            )
        data = await relay.read_buffered(
            exchange, served, sent_at, lambda data: _buffered_usage(exchange, data)
        )
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


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)

    object: Literal["list"] = "list"
    data: list[ModelCard]


LLM_BODY = {
    "type": "object",
    "required": ["model"],
    "properties": {"model": {"type": "string"}, "stream": {"type": "boolean"}},
    "additionalProperties": True,
    "description": "The provider's request body, relayed as sent (see the README for the "
    "rules the proxy applies: UTF-8 JSON, no duplicate keys, nesting depth).",
}
_LLM_ERRORS = {
    400: "Invalid input (`param` names it), or a model this endpoint does not serve.",
    403: "The key may not use this model.",
    404: "No such model (`model_not_found`).",
    429: "A rate limit or budget refused the request before it reached the upstream "
    "(`Retry-After`, `x-ratelimit-*`; budget refusals say so in `code`).",
    502: "The upstream could not be reached, or broke off its answer.",
    504: "The upstream did not answer in time.",
}


def _llm_answers(endpoint: str) -> tuple[Reply, ...]:
    answers = [Reply(200, "The upstream's answer.", schema={"type": "object"})]
    if endpoint != "embeddings":
        answers.append(
            Reply(
                200,
                "With `stream: true`: the upstream's events, relayed as they arrive.",
                media="text/event-stream",
                schema=SSE_EVENT,
            )
        )
    return tuple(answers)


def llm_handler(endpoint: str) -> Any:
    @operation(
        f"OpenAI {endpoint}",
        tag="llm",
        auth="key",
        body_schema=LLM_BODY,
        answers=_llm_answers(endpoint),
        errors=_LLM_ERRORS,
        relayed=True,
        description=f"OpenAI's `POST /v1/{endpoint}`, admitted (auth, rate limits, budgets), "
        "forwarded with the upstream's own credential, metered and settled.",
    )
    async def handler(request: web.Request) -> web.StreamResponse:
        return await handle_llm(request, endpoint)

    handler.__name__ = "llm_" + endpoint.replace("/", "_")
    return handler


@operation(
    "List models",
    tag="llm",
    auth="key",
    answers=Reply(200, "The configured models and aliases this key may use.", ModelList),
)
async def list_models(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    identity = await gw.auth.identify(request)
    data = [
        route.listing(name)
        for name, route in gw.routes.items()
        if identity.may_use(name) or identity.may_use(route.name) or identity.may_use(route.entry)
    ]
    return web.json_response({"object": "list", "data": data})


@operation(
    "Retrieve a model",
    tag="llm",
    auth="key",
    answers=Reply(200, "The model.", ModelCard),
    errors={404: "No such model, or one this key may not use (`model_not_found`)."},
)
async def retrieve_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{model}`` (the SDKs' ``models.retrieve``): one model this key may use."""
    gw = request.app[GATEWAY]
    identity = await gw.auth.identify(request)
    name = request.match_info["model"]
    try:
        route = gw.routes.get(name)
    except UnpricedModel:
        route = None
    if route is None or not any(
        identity.may_use(allowed) for allowed in (name, route.name, route.entry)
    ):
        raise ApiError(
            404,
            f"The model '{name[:200]}' does not exist or you do not have access to it.",
            code="model_not_found",
            param="model",
        )
    return web.json_response(route.listing(name))


def add_routes(app: web.Application) -> None:
    for prefix in ("/v1", "/api/v1/llm"):
        for endpoint in ENDPOINTS:
            app.router.add_post(f"{prefix}/{endpoint}", llm_handler(endpoint))
        app.router.add_get(f"{prefix}/models", list_models)
        app.router.add_get(prefix + "/models/{model:.+}", retrieve_model)
