"""Google's upstreams: the Gemini API (``kind = "gemini"``) and Vertex AI (``kind = "vertex"``).

* Gemini API: ``{base_url}/models/{model}:{method}`` (``base_url`` ends in the version,
  ``https://generativelanguage.googleapis.com/v1beta``), the key as ``x-goog-api-key``.
* Vertex AI: ``{base_url}/v1/projects/{project}/locations/{location}/publishers/{publisher}/
  models/{model}:{method}`` with an OAuth access token (``proxy.providers.vertex_auth``).
  Publisher ``google`` takes Gemini's bodies as they are; publisher ``anthropic`` takes
  Anthropic's Messages body without ``model`` (it is in the path) and with
  ``anthropic_version: "vertex-2023-10-16"``, at ``:rawPredict`` or, streamed,
  ``:streamRawPredict`` (``count-tokens:rawPredict`` for token counts).

The model is the path's; what the answers mean is the dialect's (``proxy.dialects``).
"""

from __future__ import annotations

import json
from urllib.parse import quote

from proxy.config import UpstreamConfig

VERTEX_ANTHROPIC_VERSION = "vertex-2023-10-16"


def gemini_url(upstream: UpstreamConfig, endpoint: str, model: str) -> str:
    return f"{upstream.base_url}/models/{quote(model, safe='@.-_')}:{endpoint}"


def gemini_credential(upstream: UpstreamConfig) -> list[tuple[str, str]]:
    credential = upstream.credential()
    return [("x-goog-api-key", credential)] if credential else []


def _without_request_models(body: bytes) -> bytes:
    """Vertex's batch embeddings name the model in the path only; the Gemini API's clients
    also name it in each request (``requests[].model``), which Vertex does not take."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return body
    requests = parsed.get("requests") if isinstance(parsed, dict) else None
    if not isinstance(requests, list):
        return body
    parsed["requests"] = [
        {k: v for k, v in r.items() if k != "model"} if isinstance(r, dict) else r
        for r in requests
    ]
    return json.dumps(parsed, separators=(",", ":")).encode()


def _vertex_models(upstream: UpstreamConfig) -> str:
    return (
        f"{upstream.base_url}/v1/projects/{quote(upstream.project or '', safe='')}/locations/"
        f"{quote(upstream.location, safe='')}/publishers/{upstream.publisher}/models"
    )


def vertex_target(
    upstream: UpstreamConfig, endpoint: str, model: str, body: bytes
) -> tuple[str, bytes]:
    """The URL and body a Vertex upstream gets for a dialect's endpoint and body."""
    models = _vertex_models(upstream)
    if upstream.publisher != "anthropic":
        url = f"{models}/{quote(model, safe='@.-_')}:{endpoint}"
        if endpoint == "batchEmbedContents":
            body = _without_request_models(body)
        return url, body
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        return f"{models}/{quote(model, safe='@.-_')}:rawPredict", body
    parsed["anthropic_version"] = VERTEX_ANTHROPIC_VERSION
    if endpoint == "messages/count_tokens":
        parsed["model"] = model  # count-tokens names the model in its body
        url = f"{models}/count-tokens:rawPredict"
    else:
        parsed.pop("model", None)
        method = "streamRawPredict" if parsed.get("stream") is True else "rawPredict"
        url = f"{models}/{quote(model, safe='@.-_')}:{method}"
    return url, json.dumps(parsed, separators=(",", ":")).encode()
