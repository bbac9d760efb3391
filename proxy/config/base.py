"""What every section shares: strict models, the names of dialects, kinds and roles, and the
largest limits a script can hold exactly."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

ProviderKind = Literal["openai", "anthropic", "azure", "bedrock", "gemini", "vertex"]
"""How the proxy speaks to an upstream: OpenAI's API (also Gemini's compatible endpoint, Groq,
Together, Fireworks, vLLM, Ollama...), Anthropic's Messages API, Azure OpenAI's paths, AWS
Bedrock's runtime API (SigV4-signed), the Gemini API, or Vertex AI (Gemini or Claude, by
``publisher``)."""
DialectName = Literal["openai", "anthropic", "bedrock", "gemini"]
"""The wire dialect a client speaks to the proxy (``proxy.dialects``); ``openai`` and ``azure``
upstreams both serve the first, ``gemini`` and Vertex's ``google`` publisher the last."""
_PRICE_PROVIDERS: dict[str, str] = {
    "openai": "openai",
    "anthropic": "anthropic",
    "azure": "azure",
    "bedrock": "aws",
    "gemini": "google",
    "vertex": "google",
}
Role = Literal["cluster_admin", "org_admin", "member"]

# The admit script computes with Lua numbers (doubles): every limit it reads must be an integer
# a double holds exactly (<= 2**53 - 1). These maxima sit well inside that and above any real
# deployment: a trillion requests or tokens per window, a million requests in flight.
MAX_RATE_LIMIT = 10**12
MAX_CONCURRENCY = 10**6


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
