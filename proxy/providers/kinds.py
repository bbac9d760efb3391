"""What differs between upstream kinds on the wire: the URL of an endpoint, the credential
header, and the model name the body carries. Everything else (the OpenAI or Anthropic body,
the answer) passes through as the client's API defines it.

``openai`` covers every OpenAI-compatible server: OpenAI itself, Gemini's OpenAI-compatible
endpoint, Groq/Together/Fireworks, vLLM and Ollama (an upstream without ``api_key_env`` sends
no credential at all). ``gemini`` and ``vertex`` are Google's (``proxy.providers.google``).
"""

from __future__ import annotations

from collections.abc import Mapping

from proxy.config import UpstreamConfig
from proxy.providers import anthropic, azure, bedrock, google


def url(upstream: UpstreamConfig, endpoint: str, deployment: str) -> str:
    """``deployment``: Azure's deployment, the Bedrock model id, or the model a Google
    upstream's path names (Vertex's URL also depends on the body: ``google.vertex_target``)."""
    if upstream.kind == "anthropic":
        return anthropic.url(upstream, endpoint)
    if upstream.kind == "azure":
        return azure.url(upstream, endpoint, deployment)
    if upstream.kind == "bedrock":
        return bedrock.url(upstream, endpoint, deployment)
    if upstream.kind == "gemini":
        return google.gemini_url(upstream, endpoint, deployment)
    return f"{upstream.base_url}/{endpoint}"


def credential_headers(
    upstream: UpstreamConfig, client_headers: Mapping[str, str]
) -> list[tuple[str, str]]:
    """The headers carrying the upstream's own credential (never the client's)."""
    if upstream.kind == "anthropic":
        return anthropic.credential_headers(upstream, client_headers)
    if upstream.kind == "azure":
        return azure.credential_headers(upstream)
    if upstream.kind == "bedrock":
        return bedrock.credential_headers(upstream)
    if upstream.kind == "gemini":
        return google.gemini_credential(upstream)
    if upstream.kind == "vertex":
        return []  # an access token, added by ``UpstreamClient.send`` (it may need a refresh)
    credential = upstream.credential()
    return [("Authorization", f"Bearer {credential}")] if credential else []


CREDENTIAL_HEADERS = frozenset({"authorization", "api-key", "x-api-key", "anthropic-version"})
"""Set by the proxy for the upstream; a client's copies (its proxy key) are never forwarded."""
