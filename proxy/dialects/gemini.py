"""Google's Gemini API: ``POST /v1beta/models/{model}:generateContent`` and its siblings.

Served under ``/v1beta`` and ``/v1`` (what ``google-genai`` calls in Gemini API mode), under
Vertex AI's paths for Gemini (``/v1[beta1]/projects/{p}/locations/{l}/publishers/google/
models/{model}:…``, what it calls in Vertex mode), and again under ``/api/v1/llm``. The model
is in the path; the key comes as ``x-goog-api-key`` (what ``google-genai`` sends), ``?key=``
(never logged: logs carry the path only) or ``Authorization: Bearer`` (Vertex mode).

A request reserves ``prompt_bound`` (``gemini_bound``) plus ``maxOutputTokens`` x
``candidateCount`` (the model's output limit when absent). Thinking is billed as output and
counted inside ``maxOutputTokens`` (Gemini 2.5 and 3 stop at that ceiling with thinking and
answer together, googleapis/python-genai#2062), so ``thinkingBudget`` — a hint the model may
exceed — adds nothing. ``countTokens`` passes admission with nothing reserved and is never
charged; the embedding methods reserve their input. ``:streamGenerateContent?alt=sse`` is
relayed as events; without ``alt=sse`` Google streams one JSON array, relayed element by
element as each completes (``json_array``), metered as it passes.
Errors take Google's shape (``error.status`` follows the HTTP status), so ``google-genai``
raises its ``ClientError`` / ``ServerError``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from proxy.catalog.pricing import reserve_cost_nano
from proxy.catalog.routes import ModelRoute
from proxy.config import DialectName
from proxy.dialects import gemini_errors, gemini_usage, json_array
from proxy.dialects.base import (
    MAX_OUTPUT_CAP,
    Inbound,
    Reservation,
    RouteDocs,
    StreamFraming,
    StreamMeter,
    Usage,
    bearer,
    sse_framing,
)
from proxy.dialects.gemini_bound import prompt_bound
from proxy.errors import bad_request, unauthorized

ENDPOINTS = (
    "generateContent",
    "streamGenerateContent",
    "countTokens",
    "embedContent",
    "batchEmbedContents",
)
"""The methods (``models/{model}:<method>``), also the endpoint names records carry."""
_EMBEDDINGS = frozenset({"embedContent", "batchEmbedContents"})
MAX_CANDIDATES = 8
"""Gemini's own maximum for ``candidateCount``."""
_BASES = ("", "/api/v1/llm")
_MODEL_PATHS = (
    "/v1beta/models/",
    "/v1/models/",
    "/v1/projects/{project}/locations/{location}/publishers/google/models/",
    "/v1beta1/projects/{project}/locations/{location}/publishers/google/models/",
    "/v1/publishers/google/models/",
    "/v1beta1/publishers/google/models/",
)
"""Gemini API paths, then Vertex AI's (with a project, and Vertex's express mode without)."""
PREFIXES = tuple(f"{base}{path.split('/models/')[0]}" for base in _BASES for path in _MODEL_PATHS)
ERROR_PREFIXES = tuple(
    f"{base}{prefix}"
    for base in _BASES
    for prefix in ("/v1beta", "/v1/models/", "/v1/projects/", "/v1/publishers/")
)
"""Google's paths answer in Google's shape (``claims`` leaves ``/v1/models/{id}`` to the
OpenAI catalogue and Vertex's Claude paths to Anthropic's dialect)."""
_SSE = sse_framing(gemini_errors.STREAM_ENDS)
_ARRAY = StreamFraming("application/json", json_array.split, gemini_errors.ARRAY_ENDS)

_DOCS = RouteDocs(
    title="Gemini",
    tag="gemini",
    auth="gemini",
    handler_prefix="gemini_",
    body_schema={
        "type": "object",
        "properties": {
            "contents": {"type": "array", "items": {"type": "object"}},
            "generationConfig": {"type": "object"},
        },
        "additionalProperties": True,
        "description": "Google's request body, relayed as sent (the model is in the path).",
    },
    errors={
        400: "Invalid input, or a model this method does not serve.",
        403: "The key may not use this model.",
        404: "No such model.",
        429: "A rate limit or budget refused the request before it reached the upstream.",
        502: "The upstream could not be reached, or broke off its answer.",
        504: "The upstream did not answer in time.",
    },
    descriptions={
        endpoint: f"Gemini's `models/{{model}}:{endpoint}`, admitted and metered like every "
        "route" + (" (never charged)." if endpoint == "countTokens" else ".")
        for endpoint in ENDPOINTS
    },
    streamed=frozenset({"streamGenerateContent"}),
)


def _cap(config: dict[str, Any], name: str, maximum: int) -> int | None:
    value = config.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise bad_request(
            f"'generationConfig.{name}' must be a positive integer no greater than {maximum}.",
            param=f"generationConfig.{name}",
        )
    return value


def _model_ref(value: object, model: str) -> object:
    """A body's ``models/…`` reference (batch embeddings, countTokens' inner request) renamed
    for the upstream."""
    return f"models/{model}" if isinstance(value, str) else value


class GeminiDialect:
    name: DialectName = "gemini"
    endpoints = ENDPOINTS
    endpoint_kinds: Mapping[str, str] = {
        endpoint: "embedding" if endpoint in _EMBEDDINGS else "chat" for endpoint in ENDPOINTS
    }
    prefixes = PREFIXES
    error_prefixes = ERROR_PREFIXES
    served_at = (
        "it is served over Google's Gemini API: use POST /v1beta/models/{model}:generateContent"
    )
    error_model = gemini_errors.GoogleError
    form_endpoints: frozenset[str] = frozenset()
    docs = _DOCS

    def routes(self) -> tuple[tuple[str, str], ...]:
        return tuple(
            (f"{base}{path}{{model}}:{method}", method)
            for base in _BASES
            for path in _MODEL_PATHS
            for method in ENDPOINTS
        )

    def claims(self, path: str) -> bool:
        if "/publishers/anthropic/" in path:
            return False
        if "/v1/models/" in path:  # OpenAI's GET /v1/models/{id} shares the prefix
            return path.rpartition(":")[2] in ENDPOINTS
        return True

    def api_key(self, request: Inbound) -> str:
        headers = request.headers
        key = headers.get("x-goog-api-key", "").strip() or bearer(headers)
        if not key:
            key = request.query.get("key", "").strip()
        if not key:
            raise unauthorized(
                "Missing API key: send it as 'x-goog-api-key: <key>', '?key=<key>' or "
                "'Authorization: Bearer <key>'."
            )
        return key

    def requested_model(self, params: Mapping[str, str], body: dict[str, Any]) -> object:
        """The path's model; a quote (no path) names it in the body, as ``models/…`` or not."""
        model = params.get("model") or body.get("model")
        return model.removeprefix("models/") if isinstance(model, str) else model

    def upstream_endpoint(self, endpoint: str, request: Inbound) -> str:
        if endpoint == "streamGenerateContent" and request.query.get("alt") == "sse":
            return "streamGenerateContent?alt=sse"
        return endpoint

    def stream_framing(self, upstream_endpoint: str) -> StreamFraming:
        """Google's JSON array for ``streamGenerateContent`` without ``?alt=sse``."""
        return _ARRAY if upstream_endpoint == "streamGenerateContent" else _SSE

    async def reserve(
        self, headers: Mapping[str, str], endpoint: str, body: dict[str, Any], route: ModelRoute
    ) -> Reservation:
        if endpoint == "countTokens":
            return Reservation(0, 0, 0)
        bound = prompt_bound(body, route.context_window)
        price = route.price.for_prompt(bound)  # long-context rates when the bound is past them
        if endpoint in _EMBEDDINGS:
            return Reservation(bound, 0, reserve_cost_nano(price, bound, 0))
        config = body.get("generationConfig")
        if config is None:
            config = {}
        if not isinstance(config, dict):
            raise bad_request("'generationConfig' must be an object.", param="generationConfig")
        per_candidate = _cap(config, "maxOutputTokens", MAX_OUTPUT_CAP)
        candidates = _cap(config, "candidateCount", MAX_CANDIDATES) or 1
        cap = (per_candidate or route.max_output_tokens) * candidates
        return Reservation(
            bound,
            cap,
            reserve_cost_nano(price, bound, cap),
            endpoint == "streamGenerateContent",
            "generationConfig.maxOutputTokens",
            choices=candidates,
            input_cost=bound * price.dearest_input_nano_per_m,
            output_rate=price.output_nano_per_m,
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
        """The client's bytes unless a clamped ``maxOutputTokens`` or a body's model
        reference (``requests[].model``, ``generateContentRequest.model``) must change."""
        changed: dict[str, Any] | None = None
        if clamped_cap is not None:
            config = body.get("generationConfig") or {}
            changed = {**body, "generationConfig": {**config, "maxOutputTokens": clamped_cap}}
        requests = body.get("requests")
        if isinstance(requests, list):
            renamed = [
                {**r, "model": _model_ref(r["model"], model)}
                if isinstance(r, dict) and "model" in r
                else r
                for r in requests
            ]
            changed = {**(changed or body), "requests": renamed}
        inner = body.get("generateContentRequest")
        if isinstance(inner, dict) and "model" in inner:
            inner = {**inner, "model": _model_ref(inner["model"], model)}
            changed = {**(changed or body), "generateContentRequest": inner}
        if "model" in body:  # a quote's body; Google's API takes the model from the path
            changed = {k: v for k, v in (changed or body).items() if k != "model"}
        if changed is None:
            return raw, False
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
        return gemini_usage.buffered_usage(endpoint, prompt_tokens, output_cap, data)

    def stream_meter(
        self,
        endpoint: str,
        route: ModelRoute,
        prompt_tokens: int,
        output_cap: int,
        strip_usage: bool,
    ) -> StreamMeter:
        return gemini_usage.StreamMeter(prompt_tokens, output_cap)

    def limit_headers(
        self,
        headers: dict[str, str],
        kind: Literal["requests", "tokens"],
        limit: int,
        remaining: int,
        reset_ms: int | None,
        now: float,
    ) -> None:
        """Google's APIs name no rate-limit headers; the ``x-ratelimit-*`` ones are there."""

    def error_body(
        self,
        status: int,
        message: str,
        type: str,
        code: str | None,
        param: str | None,
        details: Mapping[str, Any] | None,
    ) -> bytes:
        return gemini_errors.error_body(status, message, type, code, param, details)

    def error_wire(
        self, status: int, type: str, code: str | None
    ) -> tuple[int, Mapping[str, str] | None]:
        return status, None  # Google's shape carries its status in the body too


GEMINI = GeminiDialect()
