"""The model table: public model names, aliases and patterns → upstreams, upstream model, price,
limits.

Built once at start-up; a named model without a known price stops the proxy there (never
metered as free), so nothing on the request path can meet an unpriced named model. A pattern
(``claude-*``) is priced per concrete name when a request first names it — from its
``[models.price]``, else the price database, else ``[metering] default_price`` when allowed —
and a name without a price is refused, never served free.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

import tiktoken

from proxy.catalog.pricing import (
    Price,
    known_model_id,
    known_model_ids,
    resolve_price,
    with_cache_writes,
    with_long_context_tier,
)
from proxy.catalog.tokenizer import get_encoding
from proxy.config import ConfigError, DialectName, ModelConfig, Settings, UpstreamConfig
from proxy.providers.fallback import Candidate

_MATCHED_MAX = 4096
"""Concrete names matched by patterns that are remembered; past it, the oldest is re-priced
when next seen (clients choose these names, so the table must stay bounded)."""


@dataclass(frozen=True)
class ModelRoute:
    name: str
    upstreams: tuple[Candidate, ...]
    """Tried in order (see ``proxy.providers.fallback``); never empty."""
    upstream_model: str
    price: Price
    max_output_tokens: int
    encoding: tiktoken.Encoding
    kind: str
    dialect: DialectName = "openai"
    """The dialect its clients speak (its upstreams' kind decides)."""
    entry: str = ""
    """The configured name (a pattern for matched names), which key model lists may name."""
    context_window: int = 1_000_000
    priced_at: float = 0.0
    """When this process resolved the price (start-up, or a pattern's first use of the name)."""
    counted_as: str = ""
    """The model name in metric labels and usage counters, from a set bounded by configuration
    and the price database, never by clients: the configured name; for a name a pattern
    matched, the price database's id of that model, or the pattern when its price is
    configured (any name would match it)."""

    @property
    def upstream(self) -> UpstreamConfig:
        """The first upstream: the one a request goes to unless it fails."""
        return self.upstreams[0].upstream

    def listing(self, public_name: str) -> dict[str, object]:
        return {"id": public_name, "object": "model", "created": 0, "owned_by": self.upstream.name}


class UnpricedModel(LookupError):
    """A pattern matched the name, but no price is known for it."""

    def __init__(self, name: str, pattern: str) -> None:
        super().__init__(
            f"The model '{name}' (matched by '{pattern}') has no known price, and this proxy "
            "meters every request: ask the operator to configure a price for it."
        )


class ModelTable(Mapping[str, ModelRoute]):
    """Exact names and aliases first, then patterns in configuration order. Iterating yields
    the exact names only (what ``GET /v1/models`` can list)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._exact: dict[str, ModelRoute] = {}
        self._patterns: list[ModelConfig] = []
        self._matched: dict[str, ModelRoute] = {}
        for index, model in enumerate(settings.models):
            if model.is_pattern:
                _check_encoding(model, index)
                self._patterns.append(model)
                continue
            route = _route(settings, model, index, model.name)
            for public in (model.name, *model.aliases):
                self._exact[public] = route

    def __getitem__(self, name: str) -> ModelRoute:
        route = self._exact.get(name) or self._matched.get(name)
        if route is not None:
            return route
        for model in self._patterns:
            if fnmatch.fnmatchcase(name, model.name):
                route = _matched_route(self._settings, model, name)
                if len(self._matched) >= _MATCHED_MAX:
                    del self._matched[next(iter(self._matched))]
                self._matched[name] = route
                return route
        raise KeyError(name)

    def names(self, name: str) -> bool:
        """Whether a key's model allow-list may name this: a configured name or alias, a
        pattern itself, or a name a pattern matches (pricing it is not needed to allow it)."""
        if name in self._exact:
            return True
        return any(
            name == model.name or fnmatch.fnmatchcase(name, model.name) for model in self._patterns
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self._exact)

    def __len__(self) -> int:
        return len(self._exact)

    def catalogue(self) -> list[tuple[str, str, str]]:
        """(public name, configured entry, upstream) of every model ``GET /v1/models`` lists:
        exact names and aliases, then each pattern by the concrete names the price database
        knows for its provider (and any name it matched so far), or by itself when none."""
        listed = [(name, route.entry, route.upstream.name) for name, route in self._exact.items()]
        seen = set(self._exact)
        for model in self._patterns:
            upstream = self._settings.upstream(model.choices[0].name)
            known = known_model_ids(upstream.price_provider_id)
            matched = [name for name, route in self._matched.items() if route.entry == model.name]
            names = [n for n in (*known, *matched) if fnmatch.fnmatchcase(n, model.name)]
            for name in names or [model.name]:
                if name not in seen:
                    seen.add(name)
                    listed.append((name, model.name, upstream.name))
        return listed

    def priced(self) -> list[tuple[str, ModelRoute]]:
        """Every name this process charges for: exact names and aliases, then the names
        patterns have matched so far."""
        return [*self._exact.items(), *self._matched.items()]


def build_routes(settings: Settings) -> ModelTable:
    return ModelTable(settings)


def _check_encoding(model: ModelConfig, index: int) -> tiktoken.Encoding:
    try:
        return get_encoding(model.encoding)
    except RuntimeError as exc:
        raise ConfigError(f"models.{index}.encoding: {exc}") from exc


def _candidates(settings: Settings, model: ModelConfig, upstream_model: str) -> list[Candidate]:
    candidates = []
    for choice in model.choices:
        upstream = settings.upstream(choice.name)
        if upstream.kind == "azure":
            deployment = model.deployment or upstream_model
            candidates.append(Candidate(upstream, deployment, deployment, choice.weight))
        elif upstream.kind in ("bedrock", "gemini", "vertex"):  # the model is in the path
            candidates.append(Candidate(upstream, upstream_model, upstream_model, choice.weight))
        else:
            candidates.append(Candidate(upstream, upstream_model, "", choice.weight))
    return candidates


def _assemble(
    settings: Settings, model: ModelConfig, name: str, upstream_model: str, price: Price
) -> ModelRoute:
    candidates = _candidates(settings, model, upstream_model)
    dialect = candidates[0].upstream.dialect
    if dialect == "anthropic" or (dialect == "bedrock" and "anthropic." in upstream_model):
        price = with_cache_writes(price)
    if dialect == "gemini":
        # Gemini's reservation bounds the prompt against the tier's start (200k tokens), so
        # its long-context rates can be charged; elsewhere the base rates stay what is charged.
        ref = name if model.is_pattern else (model.price_ref or upstream_model)
        price = with_long_context_tier(price, ref, candidates[0].upstream.price_provider_id)
    return ModelRoute(
        name=name,
        upstreams=tuple(candidates),
        upstream_model=upstream_model,
        price=price,
        max_output_tokens=model.max_output_tokens or settings.metering.default_max_output_tokens,
        encoding=get_encoding(model.encoding),
        kind=model.kind,
        dialect=dialect,
        entry=model.name,
        context_window=model.context_window,
        priced_at=time.time(),
        counted_as=model.name,
    )


def _route(settings: Settings, model: ModelConfig, index: int, name: str) -> ModelRoute:
    provider = settings.upstream(model.choices[0].name).price_provider_id
    price = resolve_price(model, settings.metering, provider)
    if price is None:
        raise ConfigError(
            f"models.{index}.price: no price known for {model.name!r}; set [models.price] "
            "or metering.unknown_price = 'default' with [metering.default_price]"
        )
    _check_encoding(model, index)
    return _assemble(settings, model, name, model.upstream_model or model.name, price)


def _matched_route(settings: Settings, model: ModelConfig, name: str) -> ModelRoute:
    provider = settings.upstream(model.choices[0].name).price_provider_id
    price = resolve_price(model, settings.metering, provider, name=name)
    if price is None:
        raise UnpricedModel(name, model.name)
    route = _assemble(settings, model, name, name, price)
    if price.source == "genai-prices":
        route = replace(route, counted_as=known_model_id(name, provider) or model.name)
    return route
