"""The model table: public model names and aliases → upstream, upstream model, price, limits.

Built once at start-up; a model without a known price stops the proxy there (never metered as
free), so nothing on the request path can meet an unpriced model.
"""

from __future__ import annotations

from dataclasses import dataclass

import tiktoken

from proxy.config import ConfigError, ModelConfig, Settings, UpstreamConfig
from proxy.gateway.pricing import Price, resolve_price
from proxy.gateway.tokenizer import get_encoding


@dataclass(frozen=True)
class ModelRoute:
    name: str
    upstream: UpstreamConfig
    upstream_model: str
    price: Price
    max_output_tokens: int
    encoding: tiktoken.Encoding
    kind: str

    def listing(self, public_name: str) -> dict[str, object]:
        return {"id": public_name, "object": "model", "created": 0, "owned_by": self.upstream.name}


def build_routes(settings: Settings) -> dict[str, ModelRoute]:
    routes: dict[str, ModelRoute] = {}
    for index, model in enumerate(settings.models):
        route = _route(settings, model, index)
        for public in (model.name, *model.aliases):
            routes[public] = route
    return routes


def _route(settings: Settings, model: ModelConfig, index: int) -> ModelRoute:
    price = resolve_price(model, settings.metering)
    if price is None:
        raise ConfigError(
            f"models.{index}.price: no price known for {model.name!r}; set [models.price] "
            "or metering.unknown_price = 'default' with [metering.default_price]"
        )
    try:
        encoding = get_encoding(model.encoding)
    except RuntimeError as exc:
        raise ConfigError(f"models.{index}.encoding: {exc}") from exc
    return ModelRoute(
        name=model.name,
        upstream=settings.upstream(model.upstream),
        upstream_model=model.upstream_model or model.name,
        price=price,
        max_output_tokens=model.max_output_tokens or settings.metering.default_max_output_tokens,
        encoding=encoding,
        kind=model.kind,
    )
