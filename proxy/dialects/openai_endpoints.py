"""The OpenAI dialect's endpoint tables: which endpoints it serves, which take forms, the
model kind each serves, and how the OpenAPI document describes them."""

from __future__ import annotations

from proxy.dialects import openai_audio
from proxy.dialects.base import RouteDocs

ENDPOINTS = (
    "chat/completions",
    "completions",
    "embeddings",
    "responses",
    "moderations",
    "images/generations",
    "images/edits",
    "images/variations",
    "audio/speech",
    "audio/transcriptions",
    "audio/translations",
)
FORM_ENDPOINTS = frozenset(
    {"images/edits", "images/variations", "audio/transcriptions", "audio/translations"}
)
"""Endpoints taking ``multipart/form-data`` (``proxy.dialects.form``)."""
PREFIXES = ("/v1", "/api/v1/llm")
CAP_FIELDS = {
    "chat/completions": ("max_completion_tokens", "max_tokens"),
    "completions": ("max_tokens",),
    "responses": ("max_output_tokens",),
    "embeddings": (),
    "moderations": (),
}
IMAGES = frozenset({"images/generations", "images/edits", "images/variations"})
KINDS = {
    "embeddings": "embedding",
    "moderations": "moderation",
    **dict.fromkeys(IMAGES, "image"),
    "audio/speech": "speech",
    **dict.fromkeys(openai_audio.TRANSCRIBING, "transcription"),
}
AUDIO = frozenset({"audio/speech", *openai_audio.TRANSCRIBING})
UNSTREAMED = frozenset({"embeddings", "moderations"})
"""Endpoints whose answers are never streamed and generate no output tokens."""
_BODY = {
    "type": "object",
    "required": ["model"],
    "properties": {"model": {"type": "string"}, "stream": {"type": "boolean"}},
    "additionalProperties": True,
    "description": "The provider's request body, relayed as sent (see the README for the "
    "rules the proxy applies: UTF-8 JSON, no duplicate keys, nesting depth).",
}
_ERRORS = {
    400: "Invalid input (`param` names it), or a model this endpoint does not serve.",
    403: "The key may not use this model.",
    404: "No such model (`model_not_found`).",
    429: "A rate limit or budget refused the request before it reached the upstream "
    "(`Retry-After`, `x-ratelimit-*`; budget refusals say so in `code`).",
    502: "The upstream could not be reached, or broke off its answer.",
    504: "The upstream did not answer in time.",
}


DOCS = RouteDocs(
    title="OpenAI",
    tag="llm",
    auth="key",
    handler_prefix="llm_",
    body_schema=_BODY,
    errors=_ERRORS,
    descriptions={
        endpoint: f"OpenAI's `POST /v1/{endpoint}`, admitted (auth, rate limits, budgets), "
        "forwarded with the upstream's own credential, metered and settled."
        for endpoint in ENDPOINTS
    },
    streamed=frozenset(ENDPOINTS) - UNSTREAMED,
)
