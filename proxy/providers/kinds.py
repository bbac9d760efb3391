"""What differs between upstream kinds on the wire: the URL of an endpoint, the credential
header, and the model name the body carries. Everything else (the OpenAI or Anthropic body,
the answer) passes through as the client's API defines it.

``openai`` covers every OpenAI-compatible server: OpenAI itself, Gemini's OpenAI-compatible
endpoint, Groq/Together/Fireworks, vLLM and Ollama (an upstream without ``api_key_env`` sends
no credential at all).
"""

from __future__ import annotations

from collections.abc import Mapping

from proxy.config import UpstreamConfig
from proxy.providers import anthropic, azure, bedrock


def url(upstream: UpstreamConfig, endpoint: str, deployment: str) -> str:
    """``deployment``: Azure's deployment, or the Bedrock model id (part of their paths)."""
    if upstream.kind == "anthropic":
        return anthropic.url(upstream, endpoint)
    if upstream.kind == "azure":
        return azure.url(upstream, endpoint, deployment)
    if upstream.kind == "bedrock":
        return bedrock.url(upstream, endpoint, deployment)
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
    credential = upstream.credential()
    return [("Authorization", f"Bearer {credential}")] if credential else []


CREDENTIAL_HEADERS = frozenset({"authorization", "api-key", "x-api-key", "anthropic-version"})
"""Set by the proxy for the upstream; a client's copies (its proxy key) are never forwarded."""
