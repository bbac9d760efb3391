"""The OpenAI-compatible endpoints: auth → parse & price → admit → upstream → settle.

Every admitted request is settled exactly once — on success, upstream error, timeout, and when
the client goes away mid-stream — in a ``finally`` that cancellation cannot skip.

A client that goes away cancels its handler (the server runs with aiohttp's handler
cancellation), wherever it waits: for Redis, for a silent upstream, or on its own full socket.
The upstream call ends at once, and what the upstream had delivered by then is charged.
``timeouts.total_seconds`` bounds the whole exchange, from sending upstream to the last byte
written to the client (see ``_Deadline``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from proxy.errors import ApiError, bad_request, store_unavailable, unauthorized
from proxy.gateway.admission import Admitted, BudgetRefused, RateLimited, Revoked
from proxy.gateway.body import read_json
from proxy.gateway.decisions import admitted_headers, budget_error, rate_limited_error
from proxy.gateway.metering import ENDPOINTS, StreamMeter, Usage, output_cap, usage_from_body
from proxy.gateway.model_routes import ModelRoute
from proxy.gateway.pricing import cost_nano
from proxy.gateway.request_context import OUTCOME, new_request_id
from proxy.gateway.state import GATEWAY, Gateway
from proxy.gateway.tokenizer import count_prompt, count_text
from proxy.providers.http_client import Response, UpstreamError, UpstreamTimeout
from proxy.providers.upstream import (
    EVENT_ENDS,
    client_headers,
    complete_events,
    upstream_broken,
    upstream_timeout,
)
from proxy.store.keys import Identity

_MAX_ON_BEHALF_OF = 256
_USAGE_OPTION = b'{"stream_options":{"include_usage":true},'
_BROKEN_STREAM_EVENT = (
    b'data: {"error":{"message":"The upstream stream broke off before it ended; the answer is '
    b'incomplete.","type":"server_error","code":"upstream_stream_broken","param":null}}\n\n'
)
_TIMEOUT_EVENT = (
    b'data: {"error":{"message":"The upstream did not finish in time; the answer is '
    b'incomplete.","type":"server_error","code":"upstream_timeout","param":null}}\n\n'
)


@dataclass
class Exchange:
    """One admitted request, from reservation to settlement."""

    identity: Identity
    request_id: str
    endpoint: str
    route: ModelRoute
    prompt_tokens: int
    on_behalf_of: str | None
    usage: Usage | None = None
    status: int = 0
    client_gone: bool = False
    upstream_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _on_behalf_of(request: web.Request) -> str | None:
    value = request.headers.get("X-On-Behalf-Of")
    if value is None:
        return None
    if not value or len(value) > _MAX_ON_BEHALF_OF or not value.isprintable():
        raise bad_request(
            f"X-On-Behalf-Of must be 1-{_MAX_ON_BEHALF_OF} printable characters.",
            param="X-On-Behalf-Of",
        )
    return value


def _model(gw: Gateway, body: dict[str, Any], identity: Identity) -> ModelRoute:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("You must provide a model parameter.", param="model")
    route = gw.routes.get(model)
    if route is None:
        raise ApiError(
            404,
            f"The model '{model}' does not exist or you do not have access to it.",
            code="model_not_found",
            param="model",
        )
    if not (identity.may_use(model) or identity.may_use(route.name)):
        raise ApiError(
            403,
            f"This API key is not allowed to use the model '{model}'.",
            type="permission_error",
            code="model_not_allowed",
            param="model",
        )
    return route


def _upstream_body(
    raw: bytes, body: dict[str, Any], endpoint: str, route: ModelRoute, stream: bool
) -> tuple[bytes, bool]:
    """The body sent upstream, and whether the usage chunk must be kept from the client."""
    strip_usage = False
    same_model = body.get("model") == route.upstream_model
    changed = not same_model
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
            body["stream_options"] = {**(options or {}), "include_usage": True}
            changed = True
    if not changed:
        return raw, strip_usage
    body["model"] = route.upstream_model
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


async def handle_llm(request: web.Request, endpoint: str) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    started = time.perf_counter()
    outcome: dict[str, Any] = {"endpoint": endpoint, "decision": "auth"}
    request[OUTCOME] = outcome
    identity = await gw.auth.identify(request)
    outcome.update(key_id=identity.key_id, org_id=identity.org_id, decision="invalid")
    on_behalf_of = _on_behalf_of(request)
    outcome["on_behalf_of"] = on_behalf_of
    body = await read_json(request)
    route = _model(gw, body, identity)
    outcome["model"] = route.name
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean.", param="stream")
    stream = stream and endpoint != "embeddings"
    cap = output_cap(endpoint, body, route)
    prompt_tokens = await count_prompt(route.encoding, endpoint, body)
    reserve_tokens = prompt_tokens + cap
    reserve_cost = cost_nano(route.price, prompt_tokens, cap)
    request_id = new_request_id()
    outcome["request_id"] = request_id
    try:
        decision = await gw.admission.admit(identity, request_id, reserve_tokens, reserve_cost)
    except (RedisError, OSError):
        outcome["decision"] = "store_unavailable"
        raise store_unavailable() from None
    except asyncio.CancelledError:
        # The client left while Redis decided; the admit command was already sent and may have
        # reserved. A settle queued behind it releases that reservation at once (settling a
        # request that holds no lease does nothing), instead of leaving it to lease expiry.
        gone = Exchange(identity, request_id, endpoint, route, prompt_tokens, on_behalf_of)
        gone.client_gone = True
        await _settle(gw, gone, outcome)
        raise
    if isinstance(decision, RateLimited):
        outcome["decision"] = f"rate_limit_{decision.limit_name}"
        raise rate_limited_error(decision)
    if isinstance(decision, BudgetRefused):
        outcome["decision"] = "budget"
        now = gw.clock()
        raise budget_error(decision, gw.admission.windows(now), now)
    if isinstance(decision, Revoked):
        outcome["decision"] = "auth"
        gw.auth.forget()
        raise unauthorized("Incorrect API key provided (unknown or revoked).")
    assert isinstance(decision, Admitted)
    outcome["decision"] = "admitted"
    outcome["overhead_before_ms"] = (time.perf_counter() - started) * 1000
    exchange = Exchange(identity, request_id, endpoint, route, prompt_tokens, on_behalf_of)
    lease = gw.admission.keep_alive(identity.org_id, request_id)
    try:
        return await _forward(request, gw, exchange, body, stream, decision)
    finally:
        lease.cancel()
        # Not shielded: the settle command is queued on the Redis connection before this
        # coroutine can be interrupted, so even a cancelled handler's request is settled.
        await _settle(gw, exchange, outcome)


async def _settle(gw: Gateway, exchange: Exchange, outcome: dict[str, Any]) -> None:
    usage = exchange.usage or Usage(0, 0, reported=False)
    cost = usage.cost_nano(exchange.route.price)
    record: dict[str, str | int | None] = {
        "rid": exchange.request_id,
        "kid": exchange.identity.key_id,
        "user": exchange.on_behalf_of,
        "model": exchange.route.name,
        "endpoint": exchange.endpoint,
        "in": usage.input_tokens,
        "out": usage.output_tokens,
        "cached": usage.cached_tokens,
        "reasoning": usage.reasoning_tokens,
        "cost_nano": cost,
        "reported": int(usage.reported),
        "status": exchange.status,
        "client_gone": int(exchange.client_gone),
    }
    outcome.update(
        status_upstream=exchange.status,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cost_nano=cost,
        upstream_ms=exchange.upstream_ms,
        client_gone=exchange.client_gone,
        upstream=exchange.route.upstream.name,
        **exchange.extra,
    )
    await gw.admission.settle(
        gw.admission.settle_request(
            exchange.identity, exchange.request_id, usage.total_tokens, cost, record
        )
    )


async def _forward(
    request: web.Request,
    gw: Gateway,
    exchange: Exchange,
    body: dict[str, Any],
    stream: bool,
    decision: Admitted,
) -> web.StreamResponse:
    raw = await request.read()
    upstream_body, strip_usage = _upstream_body(
        raw, body, exchange.endpoint, exchange.route, stream
    )
    sent_at = time.perf_counter()
    try:
        upstream = await gw.upstream.send(
            exchange.route.upstream, exchange.endpoint, upstream_body, request.headers
        )
    except ApiError as exc:
        exchange.extra["upstream_error"] = "timeout" if exc.status == 504 else "connect"
        raise
    except asyncio.CancelledError:
        # Gone before the upstream's first byte: the call is closed, nothing was received.
        exchange.client_gone = True
        raise
    try:
        exchange.status = upstream.status
        headers = client_headers(upstream.headers)
        headers.update(admitted_headers(decision))
        is_sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
        if upstream.status == 200 and is_sse:
            return await _relay_stream(request, gw, exchange, upstream, headers, strip_usage)
        parts: list[bytes] = []
        try:
            async for chunk in upstream.iter_chunks():
                parts.append(chunk)
        except UpstreamTimeout as exc:
            exchange.extra["upstream_error"] = "timeout"
            raise upstream_timeout(exchange.route.upstream) from exc
        except UpstreamError as exc:
            exchange.extra["upstream_error"] = "broken_body"
            raise upstream_broken(exchange.route.upstream) from exc
        except asyncio.CancelledError:
            # A buffered answer's usage comes at its end: it counts if all of it had arrived.
            exchange.client_gone = True
            parts.append(upstream.salvage())
            if upstream.complete and upstream.status == 200:
                exchange.usage = _buffered_usage(exchange, b"".join(parts))
            raise
        data = parts[0] if len(parts) == 1 else b"".join(parts)
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


class _Deadline:
    """``total_seconds`` for the whole exchange, on the upstream request's one timer.

    When it passes, the upstream connection has already been read out and closed (every byte
    it delivered is counted). A client that has taken everything sent so far then gets the
    ``upstream_timeout`` error event; one that has not — its socket is full, it is not
    reading — is cut off, since waiting for it is what the deadline forbids. The cut also
    ends a relay blocked writing to it (its handler is cancelled, like a client that left).
    """

    __slots__ = ("_request", "passed")

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.passed = False

    def __call__(self) -> None:
        self.passed = True
        transport = self._request.transport
        if transport is not None and transport.get_write_buffer_size():
            transport.abort()


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
    deadline = _Deadline(request)
    upstream.on_deadline(deadline)
    sent_at = time.perf_counter()
    pending = b""  # the start of an event whose end has not arrived yet
    try:
        await response.prepare(request)
        last: bytes | None = None  # held back so the end of the stream costs one write, not two
        async for chunk in upstream.iter_chunks():
            if pending:
                chunk, pending = pending + chunk, b""
            if not chunk.endswith(EVENT_ENDS):
                chunk, pending = complete_events(chunk)
            data = meter.relay(chunk) if chunk else b""
            if deadline.passed:
                continue  # counted; past the deadline the client gets only the error event
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
        pending = b""
        if deadline.passed:  # the answer was cut: never a [DONE] for it
            raise UpstreamTimeout("the exchange did not finish in time")
        await response.write_eof(last or b"")
    except (ConnectionError, asyncio.CancelledError) as exc:
        # The client left, or was cut off at the deadline. Count everything the upstream had
        # delivered, also what was never relayed (buffered here, or still in the socket);
        # release() then closes the upstream connection.
        exchange.client_gone = not deadline.passed
        rest = pending + upstream.salvage()
        if rest:
            meter.relay(rest)
        if deadline.passed:
            exchange.extra["upstream_error"] = "timeout"
        if isinstance(exc, asyncio.CancelledError):
            raise
    except UpstreamError as exc:
        # The client must not mistake a truncated answer for a complete one: end the stream
        # with an error event (the OpenAI SDKs raise APIError on it) and no [DONE].
        timed_out = isinstance(exc, UpstreamTimeout)
        exchange.extra["upstream_error"] = "timeout" if timed_out else "broken_stream"
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write(_TIMEOUT_EVENT if timed_out else _BROKEN_STREAM_EVENT)
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
        if identity.may_use(name) or identity.may_use(route.name)
    ]
    return web.json_response({"object": "list", "data": data})


def add_routes(app: web.Application) -> None:
    for prefix in ("/v1", "/api/v1/llm"):
        for endpoint in ENDPOINTS:
            app.router.add_post(f"{prefix}/{endpoint}", llm_handler(endpoint))
        app.router.add_get(f"{prefix}/models", list_models)
