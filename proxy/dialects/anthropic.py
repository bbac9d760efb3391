"""Anthropic's Messages API: ``POST /v1/messages`` and ``/v1/messages/count_tokens``.

Keys come as ``x-api-key`` or ``Authorization: Bearer``; a request reserves the worst case of
``proxy.dialects.claude_bound`` plus ``max_tokens`` at the dearest input rate; the answer is
relayed as it arrives and settled from the usage the upstream reports (cache reads and writes
at their own rates, ``proxy.dialects.anthropic_usage``). ``count_tokens`` passes the same
admission (auth, model, rate limits) with nothing reserved and is never charged. Errors take
Anthropic's shape (``error.type`` follows the status), and rate limits are also told in
Anthropic's header names.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from proxy.catalog.pricing import reserve_cost_nano
from proxy.catalog.routes import ModelRoute
from proxy.config import DialectName
from proxy.dialects import anthropic_usage
from proxy.dialects.base import (
    MAX_OUTPUT_CAP,
    Inbound,
    Reservation,
    RouteDocs,
    StreamEnds,
    StreamFraming,
    StreamMeter,
    Usage,
    bearer,
    sse_framing,
)
from proxy.dialects.claude_bound import prompt_bound
from proxy.errors import bad_request, unauthorized

ENDPOINTS = ("messages", "messages/count_tokens")
"""Paths under ``/v1/`` of the proxy and of the upstream."""
PREFIXES = ("/v1", "/api/v1/llm", "/api/v1/llm/v1")
"""``/api/v1/llm/v1`` is where an Anthropic SDK given ``base_url=…/api/v1/llm`` sends."""
VERTEX_PREFIXES = ("", "/v1", "/api/v1/llm", "/api/v1/llm/v1")
"""Where Vertex AI's Claude paths are served: ``AnthropicVertex(base_url=<proxy>)`` and
``base_url=<proxy>/v1`` (Vertex's own base URL ends in ``/v1``)."""
_VERTEX_PATH = "/projects/{project}/locations/{location}/publishers/anthropic/models/"
_VERTEX_ROUTES = tuple(
    (f"{prefix}{_VERTEX_PATH}{model}:{method}", endpoint)
    for prefix in VERTEX_PREFIXES
    for model, method, endpoint in (
        ("count-tokens", "rawPredict", "messages/count_tokens"),  # before {model}: first match
        ("{model}", "rawPredict", "messages"),
        ("{model}", "streamRawPredict", "messages"),
    )
)
"""Vertex AI's shape of the Messages API (what ``AnthropicVertex`` sends): the model in the
path, ``stream`` in the body, ``anthropic_version`` in the body; served as ``messages``."""
ERROR_PREFIXES = (
    *(f"{prefix}/messages" for prefix in PREFIXES),
    *(f"{prefix}/projects/" for prefix in VERTEX_PREFIXES),
)
"""The Messages routes and anything under them answer in Anthropic's shape (also a 404), and
so do Vertex's Claude paths (``claims``: those with ``publishers/anthropic``)."""

# Anthropic's documented error types by status; any other 4xx is an invalid_request_error and
# any other 5xx an api_error.
_ERROR_TYPES = {
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


class _ErrorShape(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)


class AnthropicErrorDetail(_ErrorShape):
    type: str
    message: str


class AnthropicError(_ErrorShape):
    """The body of errors on the Messages routes, as Anthropic's API writes them."""

    type: Literal["error"] = "error"
    error: AnthropicErrorDetail


BROKEN_STREAM_EVENT = (
    b'event: error\ndata: {"type":"error","error":{"type":"api_error","message":"The upstream '
    b'stream broke off before it ended; the answer is incomplete."}}\n\n'
)
_ENDS = StreamEnds(
    broken=BROKEN_STREAM_EVENT,
    timeout=b'event: error\ndata: {"type":"error","error":{"type":"api_error","message":"The '
    b'upstream did not finish in time; the answer is incomplete."}}\n\n',
)
"""Stream ends the ``anthropic`` SDKs raise on (an ``error`` event, never ``message_stop``)."""
_FRAMING = sse_framing(_ENDS)

_DOCS = RouteDocs(
    title="Anthropic",
    tag="anthropic",
    auth="anthropic",
    handler_prefix="anthropic_",
    body_schema={
        "type": "object",
        "required": ["model"],
        "properties": {"model": {"type": "string"}, "max_tokens": {"type": "integer"}},
        "additionalProperties": True,
        "description": "Anthropic's request body, relayed as sent.",
    },
    errors={
        400: "Invalid input, or a model this endpoint does not serve.",
        403: "The key may not use this model.",
        404: "No such model.",
        429: "A rate limit or budget refused the request before it reached the upstream.",
        502: "The upstream could not be reached, or broke off its answer.",
        504: "The upstream did not answer in time.",
    },
    descriptions={
        endpoint: f"Anthropic's `POST /v1/{endpoint}`, admitted and metered like every route"
        + (" (never charged)." if endpoint != "messages" else ".")
        for endpoint in ENDPOINTS
    },
    streamed=frozenset({"messages"}),
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


def rfc3339_after(now: float, ms: int) -> str:
    """Anthropic writes resets as instants; rounded up to the second so a client that waits
    until then never arrives early."""
    at = math.ceil(now + max(ms, 0) / 1000)
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class AnthropicDialect:
    name: DialectName = "anthropic"
    endpoints = ENDPOINTS
    endpoint_kinds: Mapping[str, str] = dict.fromkeys(ENDPOINTS, "chat")
    prefixes = PREFIXES
    form_endpoints: frozenset[str] = frozenset()
    error_prefixes = ERROR_PREFIXES
    served_at = "it is served over Anthropic's Messages API: use POST /v1/messages"
    error_model = AnthropicError
    docs = _DOCS

    def routes(self) -> tuple[tuple[str, str], ...]:
        return (
            *((f"{prefix}/{e}", e) for prefix in PREFIXES for e in ENDPOINTS),
            *_VERTEX_ROUTES,
        )

    def claims(self, path: str) -> bool:
        return "/projects/" not in path or "/publishers/anthropic/" in path

    def api_key(self, request: Inbound) -> str:
        headers = request.headers
        key = headers.get("x-api-key", "").strip() or bearer(headers)
        if not key:
            raise unauthorized(
                "Missing API key: send it as 'x-api-key: <key>' or 'Authorization: Bearer <key>'."
            )
        return key

    def requested_model(self, params: Mapping[str, str], body: dict[str, Any]) -> object:
        """Vertex's paths name the model (``AnthropicVertex`` takes it out of the body)."""
        return params.get("model") or body.get("model")

    def upstream_endpoint(self, endpoint: str, request: Inbound) -> str:
        return endpoint

    def stream_framing(self, upstream_endpoint: str) -> StreamFraming:
        return _FRAMING

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

    def upstream_body(
        self,
        raw: bytes,
        body: dict[str, Any],
        endpoint: str,
        model: str,
        stream: bool,
        clamped_cap: int | None,
    ) -> tuple[bytes, bool]:
        """The client's bytes as they came unless the model's name or a clamped
        ``max_tokens`` must change; a Messages stream's usage is never removed. The body is
        always Anthropic's own (``model`` in it, no ``anthropic_version``, which a Vertex
        client sends): a Vertex upstream rewrites it (``proxy.providers.vertex``)."""
        if clamped_cap is None:
            if body.get("model") == model and "anthropic_version" not in body:
                return raw, False
            changed = {**body, "model": model}
        else:
            changed = {**body, "max_tokens": clamped_cap, "model": model}
        changed.pop("anthropic_version", None)
        return json.dumps(changed, separators=(",", ":")).encode(), False

    def buffered_usage(
        self,
        endpoint: str,
        route: ModelRoute,
        prompt_tokens: int,
        output_cap: int,
        data: bytes,
        headers: Mapping[str, str],
    ) -> Usage:
        if endpoint != "messages":
            return Usage(0, 0)  # count_tokens is relayed, never charged
        return anthropic_usage.buffered_usage(prompt_tokens, output_cap, data)

    def stream_meter(
        self,
        endpoint: str,
        route: ModelRoute,
        prompt_tokens: int,
        output_cap: int,
        strip_usage: bool,
    ) -> StreamMeter:
        return anthropic_usage.StreamMeter(prompt_tokens, output_cap)

    def limit_headers(
        self,
        headers: dict[str, str],
        kind: Literal["requests", "tokens"],
        limit: int,
        remaining: int,
        reset_ms: int | None,
        now: float,
    ) -> None:
        """``anthropic-ratelimit-{requests,tokens}-*``, resets as RFC 3339 instants."""
        headers[f"anthropic-ratelimit-{kind}-limit"] = str(limit)
        headers[f"anthropic-ratelimit-{kind}-remaining"] = str(max(remaining, 0))
        if reset_ms is not None:
            headers[f"anthropic-ratelimit-{kind}-reset"] = rfc3339_after(now, reset_ms)

    def error_body(
        self,
        status: int,
        message: str,
        type: str,
        code: str | None,
        param: str | None,
        details: Mapping[str, Any] | None,
    ) -> bytes:
        """Anthropic's shape has no code or param: its ``error.type`` follows the status."""
        error = {"type": error_type(status), "message": message, **(details or {})}
        return json.dumps({"type": "error", "error": error}, separators=(",", ":")).encode()

    def error_wire(
        self, status: int, type: str, code: str | None
    ) -> tuple[int, Mapping[str, str] | None]:
        return status, None


ANTHROPIC = AnthropicDialect()
