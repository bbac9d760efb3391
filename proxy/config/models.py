"""Upstreams and models: where requests go, what each model is called there and what it costs."""

from __future__ import annotations

import os
from decimal import Decimal
from typing import Literal

from pydantic import Field, field_validator, model_validator

from proxy.config.base import _PRICE_PROVIDERS, DialectName, ProviderKind, _Strict


class PriceConfig(_Strict):
    """Major currency units per 1M tokens."""

    input: Decimal = Field(ge=0)
    output: Decimal = Field(ge=0)
    cached_input: Decimal | None = Field(None, ge=0)
    """Cache reads (OpenAI's cached input, Anthropic's ``cache_read_input_tokens``)."""
    cache_write_input: Decimal | None = Field(None, ge=0)
    """Anthropic cache writes with the default 5-minute lifetime (default: 1.25x input)."""
    cache_write_1h_input: Decimal | None = Field(None, ge=0)
    """Anthropic cache writes with a 1-hour lifetime (default: 2x input)."""


class UpstreamConfig(_Strict):
    name: str = Field(min_length=1)
    base_url: str = ""
    """Required but for ``bedrock`` (default: ``https://bedrock-runtime.{region}.amazonaws.com``)."""
    api_key_env: str | None = None
    """Name of the environment variable holding the upstream credential (never the value)."""
    kind: ProviderKind = "openai"
    api_version: str = "v1"
    """Azure only: ``v1`` uses Azure's ``/openai/v1/`` routes; a dated version (``2024-10-21``)
    uses ``/openai/deployments/{deployment}/…?api-version=…``."""
    anthropic_version: str = "2023-06-01"
    """Anthropic only: the ``anthropic-version`` sent when the client sent none."""
    region: str = Field("", pattern=r"^([a-z]{2}(-[a-z]+)+-\d{1,2})?$")
    """Bedrock only (required there): the AWS region requests are signed for."""
    project: str | None = None
    """Vertex only: the Google Cloud project (required for ``kind = "vertex"``)."""
    location: str = "us-central1"
    """Vertex only: the region (``global`` included) in the model's path."""
    publisher: Literal["google", "anthropic"] = "google"
    """Vertex only: whose models it serves — Gemini (``google``, Gemini's API) or Claude
    (``anthropic``, Anthropic's Messages API over ``:rawPredict``)."""
    credentials_file: str | None = None
    """Vertex only: a service-account JSON file; unset, Application Default Credentials."""
    price_provider: str | None = None
    """Provider id in the price database (``google``, ``groq``, ``together``…); default by kind."""
    cooldown_seconds: float = Field(30.0, ge=0)
    """After a failure that made a fallback try the next upstream, this one is tried last for
    this long (per proxy process)."""
    forward_headers: list[str] = Field(default_factory=list)
    """Request headers forwarded besides those the upstream's API reads (``accept``,
    ``user-agent``, ``openai-beta``): exact names, or prefixes ending in ``*``. Credentials,
    the client's provider-account headers and hop-by-hop headers are never forwarded."""

    @field_validator("forward_headers")
    @classmethod
    def _header_names(cls, value: list[str]) -> list[str]:
        for pattern in value:
            name = pattern.removesuffix("*")
            if not name or not all(c.isascii() and (c.isalnum() or c in "-_") for c in name):
                raise ValueError(f"{pattern!r} is not a header name (or a prefix ending in *)")
        return value

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _kind_needs(self) -> UpstreamConfig:
        if self.kind == "bedrock":
            if not self.region:
                raise ValueError("a bedrock upstream needs its AWS region")
            if not self.base_url:
                url = f"https://bedrock-runtime.{self.region}.amazonaws.com"
                object.__setattr__(self, "base_url", url)
        elif not self.base_url:
            raise ValueError("base_url: Field required")
        return self

    def credential(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    @model_validator(mode="after")
    def _vertex_project(self) -> UpstreamConfig:
        if self.kind == "vertex" and not self.project:
            raise ValueError("kind = 'vertex' needs project (the Google Cloud project id)")
        return self

    @property
    def dialect(self) -> DialectName:
        if self.kind in ("anthropic", "bedrock"):
            return self.kind
        if self.kind == "vertex" and self.publisher == "anthropic":
            return "anthropic"
        return "gemini" if self.kind in ("gemini", "vertex") else "openai"

    @property
    def price_provider_id(self) -> str:
        if self.price_provider:
            return self.price_provider
        return "anthropic" if self.dialect == "anthropic" else _PRICE_PROVIDERS[self.kind]


class UpstreamChoice(_Strict):
    """One upstream of a model's fallback list, with an optional weight."""

    name: str = Field(min_length=1)
    weight: float | None = Field(None, gt=0)


class ModelConfig(_Strict):
    name: str = Field(min_length=1)
    """A model name, or a pattern with ``*`` (``claude-*``) matching many concrete names."""
    aliases: list[str] = Field(default_factory=list)
    upstream: str | list[str | UpstreamChoice]
    """One upstream's name, or a list tried in order on connect failure, 429 or 5xx."""
    upstream_model: str | None = None
    price: PriceConfig | None = None
    """Overrides the price database; required when the database does not know the model."""
    price_ref: str | None = None
    """Model name to look up in the price database, when it differs from ``upstream_model``."""
    max_output_tokens: int | None = Field(None, gt=0)
    encoding: str = "o200k_base"
    kind: Literal["chat", "embedding", "moderation", "image", "speech", "transcription"] = "chat"
    deployment: str | None = None
    """Azure: the deployment serving this model (default: the upstream model name)."""
    context_window: int = Field(1_000_000, gt=0)
    """Anthropic: the most input tokens the model accepts, which caps the reservation of a
    prompt. The default is the largest any Claude model takes (1M); set 200000 for models
    without the 1M option to reserve less for very long prompts and for documents."""

    @property
    def is_pattern(self) -> bool:
        return "*" in self.name

    @property
    def choices(self) -> list[UpstreamChoice]:
        entries = [self.upstream] if isinstance(self.upstream, str) else self.upstream
        return [UpstreamChoice(name=e) if isinstance(e, str) else e for e in entries]

    @model_validator(mode="after")
    def _pattern_rules(self) -> ModelConfig:
        if isinstance(self.upstream, list) and not self.upstream:
            raise ValueError("upstream: the list is empty")
        if self.is_pattern and (self.aliases or self.upstream_model or self.deployment):
            raise ValueError(
                "a pattern's matches keep their own names: no aliases, upstream_model or deployment"
            )
        return self
