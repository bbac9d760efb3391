"""AWS Bedrock's runtime API: ``POST /model/{modelId}/converse``, ``/converse-stream``,
``/invoke`` and ``/invoke-with-response-stream`` (also under ``/api/v1/llm/bedrock``).

The model is the path's ``modelId`` (a model id, an inference profile id or a URL-encoded
ARN), matched against the model table like any name. The client's key is the proxy key sent
as a Bedrock API key (``Authorization: Bearer``, what boto3 sends when
``AWS_BEARER_TOKEN_BEDROCK`` is set); a SigV4 signature cannot be checked by a proxy that
keeps only key hashes, so it is refused with a 403 that says so. Streams are AWS's binary
event stream (``proxy.dialects.eventstream``), and errors Bedrock's: ``{"message": …}`` with
``x-amzn-ErrorType``. A budget refusal is a ``ServiceQuotaExceededException`` (HTTP 400):
boto3's retry modes (legacy, standard, adaptive) retry throttling codes and 429/5xx, never
this one; a rate limit is a ``ThrottlingException`` (429), retried as Bedrock's own are.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from proxy.catalog.pricing import reserve_cost_nano
from proxy.catalog.routes import ModelRoute
from proxy.config import DialectName
from proxy.dialects import bedrock_request as req
from proxy.dialects import bedrock_usage, eventstream
from proxy.dialects.base import (
    Inbound,
    Reservation,
    RouteDocs,
    StreamEnds,
    StreamFraming,
    StreamMeter,
    Usage,
    client_key,
)
from proxy.dialects.claude_bound import prompt_bound
from proxy.errors import ApiError, unauthorized

ENDPOINTS = ("converse", "converse-stream", "invoke", "invoke-with-response-stream")
STREAMED = frozenset({"converse-stream", "invoke-with-response-stream"})
PREFIXES = ("", "/api/v1/llm/bedrock")
ERROR_PREFIXES = ("/model/", "/api/v1/llm/bedrock/")
CONVERSE_CAP = ("inferenceConfig", "maxTokens")
KEY_ADVICE = (
    "This proxy takes its key as a Bedrock API key (Authorization: Bearer), not a SigV4 "
    "signature: set AWS_BEARER_TOKEN_BEDROCK to your proxy key (boto3 sends it to https "
    "endpoints only)."
)


class BedrockError(BaseModel):
    """The body of errors on the Bedrock routes; the code is the ``x-amzn-ErrorType`` header."""

    model_config = ConfigDict(extra="allow")
    message: str


def _message(text: str) -> bytes:
    return json.dumps({"message": text}, separators=(",", ":")).encode()


_ENDS = StreamEnds(
    broken=eventstream.exception(
        "modelStreamErrorException",
        _message("The upstream stream broke off before it ended; the answer is incomplete."),
    ),
    timeout=eventstream.exception(
        "modelStreamErrorException",
        _message("The upstream did not finish in time; the answer is incomplete."),
    ),
)
"""Exception frames botocore raises as ``ModelStreamErrorException`` (both streams model it)."""
FRAMING = StreamFraming(eventstream.CONTENT_TYPE, eventstream.split, _ENDS)

_DOCS = RouteDocs(
    title="Bedrock",
    tag="bedrock",
    auth="key",
    handler_prefix="bedrock_",
    body_schema={
        "type": "object",
        "additionalProperties": True,
        "description": "Bedrock's request body (Converse, or the model's own for InvokeModel).",
    },
    errors={
        400: "ValidationException; ServiceQuotaExceededException: a budget refused it.",
        403: "AccessDeniedException: no key, an unknown key, or a SigV4 signature.",
        404: "ResourceNotFoundException: no such model.",
        429: "ThrottlingException: a rate limit refused it before it reached the upstream.",
        503: "ServiceUnavailableException: the upstream could not be reached.",
    },
    descriptions={
        endpoint: f"Bedrock's `POST /model/{{modelId}}/{endpoint}`, admitted and metered."
        for endpoint in ENDPOINTS
    },
    streamed=STREAMED,
)


def error_code(status: int, type: str) -> tuple[int, str]:
    """The status and ``x-amzn-ErrorType`` of a proxy error on a Bedrock route."""
    if type == "insufficient_quota":
        return 400, "ServiceQuotaExceededException"
    if status == 429:
        return 429, "ThrottlingException"
    if status in (401, 403):
        return 403, "AccessDeniedException"
    if status == 404:
        return 404, "ResourceNotFoundException"
    if status < 500:
        return status, "ValidationException"
    if status == 504:
        return 408, "ModelTimeoutException"
    if status == 500:
        return 500, "InternalServerException"
    return 503, "ServiceUnavailableException"


class BedrockDialect:
    name: DialectName = "bedrock"
    endpoints = ENDPOINTS
    endpoint_kinds: Mapping[str, str] = dict.fromkeys(ENDPOINTS, "chat")
    prefixes = PREFIXES
    form_endpoints: frozenset[str] = frozenset()
    error_prefixes = ERROR_PREFIXES
    served_at = "it is served over AWS Bedrock's runtime API: use POST /model/{modelId}/converse"
    error_model = BedrockError
    docs = _DOCS

    def routes(self) -> tuple[tuple[str, str], ...]:
        return tuple(
            (f"{prefix}/model/{{modelId}}/{e}", e) for prefix in PREFIXES for e in ENDPOINTS
        )

    def claims(self, path: str) -> bool:
        return True

    def requested_model(self, params: Mapping[str, str], body: dict[str, Any]) -> object:
        return req.model_id(params.get("modelId"))

    def upstream_endpoint(self, endpoint: str, request: Inbound) -> str:
        return endpoint

    def stream_framing(self, upstream_endpoint: str) -> StreamFraming:
        return FRAMING

    def api_key(self, request: Inbound) -> str:
        headers = request.headers
        key = client_key(headers)
        if key:
            return key
        if headers.get("Authorization", "").startswith("AWS4-"):
            raise ApiError(403, KEY_ADVICE, type="permission_error", code="sigv4_unsupported")
        raise unauthorized("Missing API key: " + KEY_ADVICE)

    async def reserve(
        self, headers: Mapping[str, str], endpoint: str, body: dict[str, Any], route: ModelRoute
    ) -> Reservation:
        cap_path = self._cap_path(endpoint, body, route)
        cap = req.output_cap(cap_path, body) if cap_path else None
        if cap is None:
            cap = route.max_output_tokens
            if cap_path:  # the model's own default may exceed what is reserved: send the cap
                body.update(req.with_cap(body, cap_path, cap))
        if endpoint.startswith("converse"):
            bound = req.converse_bound(body, route.context_window)
        elif "anthropic_version" in body:
            beta = body.get("anthropic_beta")
            long_context = isinstance(beta, list) and any("context-1m" in str(b) for b in beta)
            bound = prompt_bound(body, route.context_window, long_context)
        else:
            bound = req.invoke_bound(body, route.upstream_model, route.context_window)
        price = route.price
        return Reservation(
            bound,
            cap,
            reserve_cost_nano(price, bound, cap),
            endpoint in STREAMED,
            ".".join(cap_path) if cap_path else "max_tokens",
            input_cost=bound * price.dearest_input_nano_per_m if cap_path else None,
            output_rate=price.output_nano_per_m,
        )

    def _cap_path(self, endpoint: str, body: dict[str, Any], route: ModelRoute) -> tuple[str, ...]:
        if endpoint.startswith("converse"):
            return CONVERSE_CAP
        if "anthropic_version" in body:
            return ("max_tokens",)
        path = req.CAP_FIELDS.get(req.family(route.upstream_model), ())
        if path == ("max_completion_tokens",) and "max_tokens" in body:
            return ("max_tokens",)
        return path

    def upstream_body(
        self,
        raw: bytes,
        body: dict[str, Any],
        endpoint: str,
        model: str,
        stream: bool,
        clamped_cap: int | None,
    ) -> tuple[bytes, bool]:
        """The model is in the path, not the body. The cap reserved is in the body (``reserve``
        wrote it when the client set none, since the model's default may be larger), or the
        clamped one; a family without a known cap field passes as it came."""
        if endpoint.startswith("converse"):
            path: tuple[str, ...] = CONVERSE_CAP
        elif "anthropic_version" in body:
            path = ("max_tokens",)
        else:
            path = req.CAP_FIELDS.get(req.family(model), ())
        if not path:
            return raw, False
        if clamped_cap is not None:
            body = req.with_cap(body, path, clamped_cap)
        return json.dumps(body, separators=(",", ":")).encode(), False

    def buffered_usage(
        self,
        endpoint: str,
        route: ModelRoute,
        prompt_tokens: int,
        output_cap: int,
        data: bytes,
        headers: Mapping[str, str],
    ) -> Usage:
        return bedrock_usage.buffered_usage(endpoint, prompt_tokens, output_cap, data, headers)

    def stream_meter(
        self,
        endpoint: str,
        route: ModelRoute,
        prompt_tokens: int,
        output_cap: int,
        strip_usage: bool,
    ) -> StreamMeter:
        return bedrock_usage.StreamMeter(prompt_tokens, output_cap)

    def limit_headers(
        self,
        headers: dict[str, str],
        kind: Literal["requests", "tokens"],
        limit: int,
        remaining: int,
        reset_ms: int | None,
        now: float,
    ) -> None:
        """Bedrock has no rate-limit headers of its own: the ``x-ratelimit-*`` ones stand."""

    def error_body(
        self,
        status: int,
        message: str,
        type: str,
        code: str | None,
        param: str | None,
        details: Mapping[str, Any] | None,
    ) -> bytes:
        return json.dumps({"message": message, **(details or {})}, separators=(",", ":")).encode()

    def error_wire(
        self, status: int, type: str, code: str | None
    ) -> tuple[int, Mapping[str, str] | None]:
        status, name = error_code(status, type)
        return status, {"x-amzn-ErrorType": name}


BEDROCK = BedrockDialect()
