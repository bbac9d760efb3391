"""OpenAI's API (and every OpenAI-compatible one): ``/v1/chat/completions``, ``completions``,
``embeddings``, ``responses`` and ``moderations`` (``openai_routes``: moderations, and the
routes refused until they are metered).

Keys come as ``Authorization: Bearer``; a request reserves its prompt counted with tiktoken
plus its output cap (``max_completion_tokens``, ``max_tokens``, ``max_output_tokens``, else the
model's configured maximum) times its choices. Streams are asked for their usage
(``stream_options.include_usage``), and that extra chunk is kept from a client that did not
ask for it. Errors take OpenAI's shape, the proxy's own (``proxy.errors``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from proxy.catalog.pricing import cost_nano
from proxy.catalog.routes import ModelRoute
from proxy.catalog.tokenizer import count_prompt
from proxy.config import DialectName
from proxy.dialects import form, openai_audio, openai_images, openai_usage
from proxy.dialects.base import (
    KEY_HINT,
    MAX_OUTPUT_CAP,
    Inbound,
    Reservation,
    StreamEnds,
    StreamFraming,
    StreamMeter,
    Usage,
    body_model,
    client_key,
    sse_framing,
)
from proxy.dialects.openai_endpoints import (
    AUDIO,
    CAP_FIELDS,
    DOCS,
    ENDPOINTS,
    FORM_ENDPOINTS,
    IMAGES,
    KINDS,
    PREFIXES,
    UNSTREAMED,
)
from proxy.dialects.openai_routes import background_refusal, moderation_texts
from proxy.errors import OpenAIError, bad_request, error_body, unauthorized

MAX_CHOICES = 128
"""OpenAI's own maximum for ``n``."""
_USAGE_OPTION = b'{"stream_options":{"include_usage":true},'
_ENDS = StreamEnds(
    broken=b'data: {"error":{"message":"The upstream stream broke off before it ended; the '
    b'answer is incomplete.","type":"server_error","code":"upstream_stream_broken",'
    b'"param":null}}\n\n',
    timeout=b'data: {"error":{"message":"The upstream did not finish in time; the answer is '
    b'incomplete.","type":"server_error","code":"upstream_timeout","param":null}}\n\n',
)
"""Stream ends the OpenAI SDKs raise APIError on (an error event, and no [DONE])."""
_FRAMING = sse_framing(_ENDS)


def _positive_int(body: dict[str, Any], name: str, maximum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise bad_request(
            f"'{name}' must be a positive integer no greater than {maximum}.", param=name
        )
    return value


@dataclass(slots=True)
class OutputCap:
    tokens: int
    """Worst-case output tokens, all choices included."""
    param: str | None
    """The request parameter that set it (None: the model's configured maximum)."""
    choices: int = 1


def output_cap(endpoint: str, body: dict[str, Any], route: ModelRoute) -> OutputCap:
    """Worst-case output tokens: the request's own cap, else the model's configured maximum.

    A cap above the configured maximum is reserved as asked, not clamped: the upstream, not
    our configuration, decides what it generates, and a reservation must never be smaller."""
    if endpoint in UNSTREAMED:
        return OutputCap(0, None)
    cap = None
    param = None
    for name in CAP_FIELDS[endpoint]:
        value = _positive_int(body, name, MAX_OUTPUT_CAP)
        if value is not None and cap is None:
            cap, param = value, name
    choices = 1
    if endpoint in ("chat/completions", "completions"):
        n = _positive_int(body, "n", MAX_CHOICES) or 1
        best_of = _positive_int(body, "best_of", MAX_CHOICES) if endpoint == "completions" else 1
        choices = max(n, best_of or 1)
        if param is None and choices > 1:
            param = "best_of" if (best_of or 1) > n else "n"
    limit = route.max_output_tokens if cap is None else cap
    return OutputCap(limit * choices, param, choices)


def clamped_body(endpoint: str, body: dict[str, Any], cap: int) -> dict[str, Any]:
    """The request with its output cap per choice lowered to ``cap``: every cap parameter it
    set, or the endpoint's own one when it set none (chat: ``max_completion_tokens``, which
    OpenAI's reasoning models require)."""
    names = CAP_FIELDS[endpoint]
    given = [name for name in names if body.get(name) is not None]
    return {**body, **{name: cap for name in given or names[:1]}}


def upstream_body(
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
    if endpoint in FORM_ENDPOINTS:  # forwarded as it came, but for the model's name
        same = body.get("model") == upstream_model
        return (raw if same else form.replace_field(raw, "model", upstream_model)), False
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


class OpenAIDialect:
    name: DialectName = "openai"
    endpoints = ENDPOINTS
    endpoint_kinds: Mapping[str, str] = {
        endpoint: KINDS.get(endpoint, "chat") for endpoint in ENDPOINTS
    }
    prefixes = PREFIXES
    form_endpoints = FORM_ENDPOINTS
    error_prefixes: tuple[str, ...] = ()
    served_at = "it is served over the OpenAI API: use /v1/chat/completions or /v1/responses"
    error_model = OpenAIError
    docs = DOCS

    def routes(self) -> tuple[tuple[str, str], ...]:
        return tuple((f"{prefix}/{e}", e) for prefix in PREFIXES for e in ENDPOINTS)

    def claims(self, path: str) -> bool:
        return True

    def api_key(self, request: Inbound) -> str:
        key = client_key(request.headers)
        if key is None:
            raise unauthorized(f"Missing API key: {KEY_HINT}.")
        return key

    async def reserve(
        self, headers: Mapping[str, str], endpoint: str, body: dict[str, Any], route: ModelRoute
    ) -> Reservation:
        if endpoint in IMAGES:
            return openai_images.reserve(endpoint, body, route)
        if endpoint in AUDIO:
            return await openai_audio.reserve(endpoint, body, route)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise bad_request("'stream' must be a boolean.", param="stream")
        if endpoint == "responses" and body.get("background") not in (None, False):
            raise background_refusal()
        cap = output_cap(endpoint, body, route)
        if endpoint == "moderations":  # counted as the embeddings input of its texts
            texts = {"input": moderation_texts(body)}
            prompt_tokens = await count_prompt(route.encoding, "embeddings", texts)
        else:
            prompt_tokens = await count_prompt(route.encoding, endpoint, body)
        cost = cost_nano(route.price, prompt_tokens, cap.tokens)
        return Reservation(
            prompt_tokens,
            cap.tokens,
            cost,
            stream and endpoint not in UNSTREAMED,
            cap.param,
            choices=cap.choices,
            input_cost=prompt_tokens * route.price.input_nano_per_m if cap.tokens else None,
            output_rate=route.price.output_nano_per_m,
        )

    requested_model = staticmethod(body_model)

    def upstream_endpoint(self, endpoint: str, request: Inbound) -> str:
        return endpoint

    def stream_framing(self, upstream_endpoint: str) -> StreamFraming:
        return _FRAMING

    upstream_body = staticmethod(upstream_body)

    def buffered_usage(
        self,
        endpoint: str,
        route: ModelRoute,
        prompt_tokens: int,
        output_cap: int,
        data: bytes,
        headers: Mapping[str, str],
    ) -> Usage:
        if endpoint in IMAGES:
            return openai_images.buffered_usage(route, prompt_tokens, output_cap, data)
        if endpoint in AUDIO:
            return openai_audio.buffered_usage(endpoint, route, prompt_tokens, output_cap, data)
        return openai_usage.buffered_usage(endpoint, route, prompt_tokens, data)

    def stream_meter(
        self,
        endpoint: str,
        route: ModelRoute,
        prompt_tokens: int,
        output_cap: int,
        strip_usage: bool,
    ) -> StreamMeter:
        if endpoint in IMAGES:
            return openai_images.StreamMeter(prompt_tokens, output_cap)
        if endpoint in AUDIO:
            return openai_audio.StreamMeter(endpoint, route, prompt_tokens, output_cap)
        return openai_usage.StreamMeter(endpoint, route, prompt_tokens, strip_usage)

    def limit_headers(
        self,
        headers: dict[str, str],
        kind: Literal["requests", "tokens"],
        limit: int,
        remaining: int,
        reset_ms: int | None,
        now: float,
    ) -> None:
        """OpenAI's names (``x-ratelimit-*``) are on every answer already."""

    def error_body(
        self,
        status: int,
        message: str,
        type: str,
        code: str | None,
        param: str | None,
        details: Mapping[str, Any] | None,
    ) -> bytes:
        return error_body(message, type, code, param, details)

    def error_wire(
        self, status: int, type: str, code: str | None
    ) -> tuple[int, Mapping[str, str] | None]:
        return status, None


OPENAI = OpenAIDialect()
