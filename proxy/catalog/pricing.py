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

__all__ = [
    "NANO",
    "Price",
    "cost_nano",
    "lookup_price",
    "price_from_config",
    "reserve_cost_nano",
    "resolve_price",
    "with_cache_writes",
    "with_long_context_tier",
]

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
    cache_write_nano_per_m: int | None = None
    """Anthropic cache writes (5-minute lifetime); None where the provider has none."""
    cache_write_1h_nano_per_m: int | None = None
    """Anthropic cache writes with a 1-hour lifetime."""
    tier_above: int = 0
    tier: Price | None = None
    """Long-context rates (Gemini's above 200k prompt tokens): every token of a request whose
    prompt has more than ``tier_above`` tokens is billed at the tier's rates."""

    def for_prompt(self, prompt_tokens: int) -> Price:
        """The rates a request with this many prompt tokens is billed at."""
        tier = self.tier
        return tier if tier is not None and prompt_tokens > self.tier_above else self

    @property
    def dearest_input_nano_per_m(self) -> int:
        """The highest rate any input token can be billed at: what a reservation must assume
        for a prompt whose split into plain, cache-read and cache-write tokens is unknown."""
        return max(
            self.input_nano_per_m,
            self.cached_input_nano_per_m,
            self.cache_write_nano_per_m or 0,
            self.cache_write_1h_nano_per_m or 0,
        )


def _to_nano(value: Decimal) -> int:
    """Exact when the price has ≤ 9 decimals (always, in practice); otherwise half-up."""
    if not value.is_finite():
        raise ValueError(f"price must be finite, got {value}")
    with decimal.localcontext(prec=100):  # the default 28 digits could round large inputs
        return int((value * NANO).to_integral_value(rounding=decimal.ROUND_HALF_UP))


def price_from_config(p: PriceConfig) -> Price:
    input_nano = _to_nano(p.input)
    cached = input_nano if p.cached_input is None else _to_nano(p.cached_input)
    return Price(
        input_nano,
        cached,
        _to_nano(p.output),
        "config",
        None if p.cache_write_input is None else _to_nano(p.cache_write_input),
        None if p.cache_write_1h_input is None else _to_nano(p.cache_write_1h_input),
    )


def with_cache_writes(price: Price) -> Price:
    """A Claude model's price with both cache-write rates filled in where neither the
    configuration nor the price database gives them: Anthropic's published multipliers of the
    base input price, 1.25x for 5-minute writes (rounded up) and 2x for 1-hour writes."""
    write = price.cache_write_nano_per_m
    write_1h = price.cache_write_1h_nano_per_m
    if write is None:
        write = -(-price.input_nano_per_m * 5 // 4)
    if write_1h is None:
        write_1h = price.input_nano_per_m * 2
    return replace(price, cache_write_nano_per_m=write, cache_write_1h_nano_per_m=write_1h)


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
    base tier here (``with_long_context_tier`` adds the tier for Gemini's routes; on the others,
    e.g. gpt-5.4 prompts above 272k tokens are under-priced; configure ``price`` for a
    conservative figure)."""
    values = []
    for prices in candidates:
        value = getattr(prices, key, None)
        value = value.base if isinstance(value, gp.TieredPrices) else value
        if isinstance(value, Decimal):
            values.append(value)
    return max(values, default=None)


def _tier(candidates: list[gp.ModelPrice], key: str) -> tuple[int, Decimal] | None:
    """The first tier of a tiered price (start, rate), the highest across ``candidates``."""
    found: list[tuple[int, Decimal]] = []
    for prices in candidates:
        value = getattr(prices, key, None)
        if isinstance(value, gp.TieredPrices) and value.tiers:
            found.append((value.tiers[0].start, value.tiers[0].price))
    return max(found, key=operator.itemgetter(1), default=None)


def _with_tier(price: Price, candidates: list[gp.ModelPrice]) -> Price:
    """``price`` with the database's long-context tier, when it has one (the start of the
    first tier of any token kind; rates without a tier keep their base)."""
    keys = ("input_mtok", "output_mtok", "cache_read_mtok")
    tiers = {key: _tier(candidates, key) for key in keys}
    starts = [tier[0] for tier in tiers.values() if tier is not None]
    if not starts:
        return price

    def rate(key: str, base: int) -> int:
        tier = tiers[key]
        return base if tier is None else _to_nano(tier[1])

    tier = replace(
        price,
        input_nano_per_m=rate("input_mtok", price.input_nano_per_m),
        output_nano_per_m=rate("output_mtok", price.output_nano_per_m),
        cached_input_nano_per_m=rate("cache_read_mtok", price.cached_input_nano_per_m),
    )
    return replace(price, tier_above=min(starts), tier=tier)


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
    write_mtok = _highest(candidates, "cache_write_mtok")
    write_1h_mtok = _highest(candidates, "cache_write_1h_mtok")
    input_nano = _to_nano(input_mtok)
    price = Price(
        input_nano_per_m=input_nano,
        cached_input_nano_per_m=input_nano if cached_mtok is None else _to_nano(cached_mtok),
        output_nano_per_m=0 if output_mtok is None else _to_nano(output_mtok),
        source="genai-prices",
        cache_write_nano_per_m=None if write_mtok is None else _to_nano(write_mtok),
        cache_write_1h_nano_per_m=None if write_1h_mtok is None else _to_nano(write_1h_mtok),
    )
    return price


def with_long_context_tier(price: Price, model_ref: str, provider_id: str) -> Price:
    """``price`` (from the database) with the database's long-context tier of ``model_ref``,
    when it has one: for dialects whose reservation bounds the prompt against the tier."""
    if price.source != "genai-prices":
        return price
    try:
        _provider, model = data_snapshot.get_snapshot().find_provider_model(
            model_ref, None, provider_id, None
        )
    except LookupError:
        return price
    return _with_tier(price, _in_force(model, datetime.now(UTC)))


def known_model_id(model_ref: str, provider_id: str = "openai") -> str | None:
    """The price database's own id for the model a name refers to (it matches loosely:
    ``claude-haiku-4-5-20251001`` is ``claude-haiku-4-5``), or None when it knows none. A set
    bounded by the database, whatever names clients send."""
    try:
        _provider, model = data_snapshot.get_snapshot().find_provider_model(
            model_ref, None, provider_id, None
        )
    except LookupError:
        return None
    return str(model.id)


def known_model_ids(provider_id: str) -> list[str]:
    """Every model id the price database knows for a provider: the concrete names a pattern
    (``claude-*``) can be listed by in ``GET /v1/models``."""
    for provider in data_snapshot.get_snapshot().providers:
        if provider.id == provider_id:
            return [str(model.id) for model in provider.models]
    return []


def resolve_price(
    model: ModelConfig,
    metering: MeteringConfig,
    provider_id: str = "openai",
    name: str | None = None,
) -> Price | None:
    """None means the model has no price and the caller must refuse to start with it (or, for
    a name matched by a pattern, refuse the request). ``name`` is the concrete name a pattern
    matched; ``provider_id`` the price database's provider of the model's first upstream."""
    if model.price is not None:
        return price_from_config(model.price)
    found = lookup_price(name or model.price_ref or model.upstream_model or model.name, provider_id)
    if found is not None:
        return found
    if metering.unknown_price == "default" and metering.default_price is not None:
        return replace(price_from_config(metering.default_price), source="default")
    return None


def cost_nano(
    price: Price,
    input_tokens: int,
    output_tokens: int,
    cached_input_tokens: int = 0,
    cache_write_tokens: int = 0,
    cache_write_1h_tokens: int = 0,
) -> int:
    """Integer-only and rounded up once; floats are rejected (``operator.index``) rather than
    silently truncated. ``cached_input_tokens`` (cache reads) and the cache writes are subsets
    of ``input_tokens``; the rest of the input is billed at the input rate."""
    if not (cached_input_tokens or cache_write_tokens or cache_write_1h_tokens):
        # Most requests (every one settled per request): input and output alone.
        total = (
            max(0, operator.index(input_tokens)) * price.input_nano_per_m
            + max(0, operator.index(output_tokens)) * price.output_nano_per_m
        )
        return -(-total // _PER)
    input_tokens = max(0, operator.index(input_tokens))
    output_tokens = max(0, operator.index(output_tokens))
    cached = min(max(0, operator.index(cached_input_tokens)), input_tokens)
    write = min(max(0, operator.index(cache_write_tokens)), input_tokens - cached)
    write_1h = min(max(0, operator.index(cache_write_1h_tokens)), input_tokens - cached - write)
    write_rate = price.cache_write_nano_per_m
    write_1h_rate = price.cache_write_1h_nano_per_m
    total = (
        (input_tokens - cached - write - write_1h) * price.input_nano_per_m
        + cached * price.cached_input_nano_per_m
        + write * (price.input_nano_per_m if write_rate is None else write_rate)
        + write_1h * (price.input_nano_per_m if write_1h_rate is None else write_1h_rate)
        + output_tokens * price.output_nano_per_m
    )
    return -(-total // _PER)


def reserve_cost_nano(price: Price, input_tokens: int, output_tokens: int) -> int:
    """The worst case of a request whose input may turn out to be cache writes: every input
    token at the dearest input rate."""
    input_tokens = max(0, operator.index(input_tokens))
    output_tokens = max(0, operator.index(output_tokens))
    total = input_tokens * price.dearest_input_nano_per_m + output_tokens * price.output_nano_per_m
    return -(-total // _PER)
