"""Anthropic's Messages API as an upstream: its paths and its credential headers. What its
answers mean (usage, stream events) is the Anthropic dialect's (``proxy.dialects.anthropic``).
"""

from __future__ import annotations

from collections.abc import Mapping

from proxy.config import UpstreamConfig


def url(upstream: UpstreamConfig, endpoint: str) -> str:
    """``base_url`` is the API's origin (``https://api.anthropic.com``), as Anthropic's SDKs take
    it; the version segment belongs to the path."""
    return f"{upstream.base_url}/v1/{endpoint}"


def credential_headers(
    upstream: UpstreamConfig, client_headers: Mapping[str, str]
) -> list[tuple[str, str]]:
    """The upstream's own key as ``x-api-key``, and the client's ``anthropic-version`` (the
    protocol version its SDK was built for) or the configured default. The client's own
    ``x-api-key`` / ``Authorization`` never get here: they are the proxy key."""
    headers = [("anthropic-version", client_headers.get("anthropic-version") or "")]
    if not headers[0][1]:
        headers[0] = ("anthropic-version", upstream.anthropic_version)
    credential = upstream.credential()
    if credential:
        headers.append(("x-api-key", credential))
    return headers
