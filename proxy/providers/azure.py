"""Azure OpenAI as an upstream: the OpenAI API under Azure's paths, with an ``api-key`` header.

Two route styles, as Azure documents them and as the ``openai`` SDK builds them:

* ``api_version = "v1"`` (the default): ``{endpoint}/openai/v1/{endpoint path}``, the body's
  ``model`` being the deployment name;
* a dated version (``2024-10-21``): ``{endpoint}/openai/deployments/{deployment}/{path}
  ?api-version=…`` for chat/completions, completions and embeddings, and
  ``{endpoint}/openai/{path}?api-version=…`` for the others (the Responses API), whose body
  names the deployment as ``model``.

Clients keep speaking plain OpenAI to the proxy; ``base_url`` is the resource's endpoint
(``https://my-resource.openai.azure.com``).
"""

from __future__ import annotations

from urllib.parse import quote

from proxy.config import UpstreamConfig

_DEPLOYMENT_PATHS = frozenset(
    {
        "chat/completions",
        "completions",
        "embeddings",
        "images/generations",
        "images/edits",
        "audio/speech",
        "audio/transcriptions",
        "audio/translations",
    }
)


def url(upstream: UpstreamConfig, endpoint: str, deployment: str) -> str:
    base = upstream.base_url
    version = upstream.api_version
    if version == "v1":
        return f"{base}/openai/v1/{endpoint}"
    query = f"?api-version={quote(version, safe='')}"
    if endpoint in _DEPLOYMENT_PATHS:
        return f"{base}/openai/deployments/{quote(deployment, safe='')}/{endpoint}{query}"
    return f"{base}/openai/{endpoint}{query}"


def credential_headers(upstream: UpstreamConfig) -> list[tuple[str, str]]:
    credential = upstream.credential()
    return [("api-key", credential)] if credential else []
