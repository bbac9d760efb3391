"""Model prices as integers, so that budgets add up exactly across processes and restarts.

Unit: nano-units (1e-9 of the major currency unit) per 1M tokens. One token at the cheapest
realistic price (≈ $0.01 per 1M) is still 10 nano, so nothing rounds to zero; costs are rounded
*up* to a whole nano per request, so metering never under-charges.

Prices come from the configuration, else from the ``genai-prices`` snapshot bundled with the
installed package (offline: its auto-updater only runs if ``UpdatePrices`` is started, which this
proxy never does), else from ``[metering] default_price`` when allowed.
"""

from __future__ import annotations

import decimal
import operator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Literal

from genai_prices import data_snapshot
from genai_prices import types as gp

from proxy.config import MeteringConfig, ModelConfig, PriceConfig

__all__ = ["NANO", "Price", "cost_nano", "lookup_price", "price_from_config", "resolve_price"]

NANO = 10**9
"""Nano-units per major currency unit."""
_PER = 1_000_000
"""Prices are per this many tokens."""

PriceSource = Literal["config", "genai-prices", "default"]


@dataclass(frozen=True, slots=True)
class Price:
    input_nano_per_m: int
    cached_input_nano_per_m: int
    """Equals ``input_nano_per_m`` when the source has no cached-input discount."""
    output_nano_per_m: int
    source: PriceSource


def _to_nano(value: Decimal) -> int:
    """Exact when the price has ≤ 9 decimals (always, in practice); otherwise half-up."""
    if not value.is_finite():
        raise ValueError(f"price must be finite, got {value}")
    with decimal.localcontext(prec=100):  # the default 28 digits could round large inputs
        return int((value * NANO).to_integral_value(rounding=decimal.ROUND_HALF_UP))


def price_from_config(p: PriceConfig) -> Price:
    input_nano = _to_nano(p.input)
    cached = input_nano if p.cached_input is None else _to_nano(p.cached_input)
    return Price(input_nano, cached, _to_nano(p.output), "config")


def _in_force(model: gp.ModelInfo, now: datetime) -> list[gp.ModelPrice]:
    """The price in force today by date, plus any time-of-day prices. Service-tier and batch
    variants are ignored: they need request context and the default tier is the standard."""
    prices = model.prices
    if isinstance(prices, gp.ModelPrice):
        return [prices]
    standard = prices[0].prices
    for conditional in reversed(prices):
        constraint = conditional.constraint
        if constraint is None or (
            isinstance(constraint, gp.StartDateConstraint) and constraint.active(now)
        ):
            standard = conditional.prices
            break
    hourly = [c.prices for c in prices if isinstance(c.constraint, gp.TimeOfDateConstraint)]
    return [standard, *hourly]


def _highest(candidates: list[gp.ModelPrice], key: str) -> Decimal | None:
    """Time-of-day prices (peak/off-peak) collapse to the highest: the price is fixed at start-up,
    so it must not depend on the hour nor under-charge. Tiered (long-context) prices use their
    base tier: e.g. gpt-5.4 prompts above 272k tokens are under-priced; configure ``price`` for a
    conservative figure."""
    values = []
    for prices in candidates:
        value = getattr(prices, key, None)
        value = value.base if isinstance(value, gp.TieredPrices) else value
        if isinstance(value, Decimal):
            values.append(value)
    return max(values, default=None)


def lookup_price(model_ref: str, provider_id: str = "openai") -> Price | None:
    """None when the database does not know the model or does not price it per token."""
    try:
        _provider, model = data_snapshot.get_snapshot().find_provider_model(
            model_ref, None, provider_id, None
        )
    except LookupError:
        return None
    candidates = _in_force(model, datetime.now(UTC))
    input_mtok = _highest(candidates, "input_mtok")
    if input_mtok is None:  # audio/tts/image-only models: priced in other units
        return None
    output_mtok = _highest(candidates, "output_mtok")  # None for embeddings: no output tokens
    cached_mtok = _highest(candidates, "cache_read_mtok")
    input_nano = _to_nano(input_mtok)
    return Price(
        input_nano_per_m=input_nano,
        cached_input_nano_per_m=input_nano if cached_mtok is None else _to_nano(cached_mtok),
        output_nano_per_m=0 if output_mtok is None else _to_nano(output_mtok),
        source="genai-prices",
    )


def resolve_price(model: ModelConfig, metering: MeteringConfig) -> Price | None:
    """None means the model has no price and the caller must refuse to start with it."""
    if model.price is not None:
        return price_from_config(model.price)
    found = lookup_price(model.price_ref or model.upstream_model or model.name)
    if found is not None:
        return found
    if metering.unknown_price == "default" and metering.default_price is not None:
        return replace(price_from_config(metering.default_price), source="default")
    return None


def cost_nano(
    price: Price, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0
) -> int:
    """Integer-only and rounded up; floats are rejected (``operator.index``) rather than
    silently truncated. ``cached_input_tokens`` is the cached subset of ``input_tokens``."""
    input_tokens = max(0, operator.index(input_tokens))
    output_tokens = max(0, operator.index(output_tokens))
    cached = min(max(0, operator.index(cached_input_tokens)), input_tokens)
    total = (
        (input_tokens - cached) * price.input_nano_per_m
        + cached * price.cached_input_nano_per_m
        + output_tokens * price.output_nano_per_m
    )
    return -(-total // _PER)
