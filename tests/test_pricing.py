"""Integer prices and costs (proxy.catalog.pricing)."""

from __future__ import annotations

import socket
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import pytest
from genai_prices import data_snapshot
from genai_prices import types as gp

from proxy.catalog.pricing import (
    Price,
    cost_nano,
    lookup_price,
    price_from_config,
    reserve_cost_nano,
    resolve_price,
    with_cache_writes,
)
from proxy.config import MeteringConfig, ModelConfig, PriceConfig

GPT_4O_MINI = Price(150_000_000, 75_000_000, 600_000_000, "genai-prices")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _model(**kwargs: Any) -> ModelConfig:
    return ModelConfig(**{"name": "m", "upstream": "u", **kwargs})


# --- price_from_config ----------------------------------------------------------------------------


def test_price_from_config_is_exact() -> None:
    price = price_from_config(PriceConfig(input=Decimal("0.15"), output=Decimal("0.6")))
    assert price == Price(150_000_000, 150_000_000, 600_000_000, "config")
    price = price_from_config(
        PriceConfig(input=Decimal("2.5"), output=Decimal("10"), cached_input=Decimal("1.25"))
    )
    assert price == Price(2_500_000_000, 1_250_000_000, 10_000_000_000, "config")
    big = price_from_config(PriceConfig(input=Decimal("123456789012345.123456789"), output=0))
    assert big.input_nano_per_m == 123456789012345123456789
    for value in (price.input_nano_per_m, price.cached_input_nano_per_m, big.output_nano_per_m):
        assert type(value) is int


@pytest.mark.parametrize(
    ("major", "nano"),
    [
        ("0.0000000005", 1),  # half rounds up
        ("0.00000000049", 0),
        ("1.2345678905", 1_234_567_891),
        ("1.23456789049", 1_234_567_890),
        ("0", 0),
    ],
)
def test_price_from_config_rounds_half_up_below_a_nano(major: str, nano: int) -> None:
    price = price_from_config(PriceConfig(input=Decimal(major), output=Decimal(major)))
    assert price.input_nano_per_m == price.output_nano_per_m == nano


# --- lookup_price (genai-prices) ------------------------------------------------------------------


@pytest.mark.usefixtures("no_network")
def test_lookup_gpt_4o_mini_offline() -> None:
    assert lookup_price("gpt-4o-mini") == GPT_4O_MINI
    assert lookup_price("gpt-4o-mini-2024-07-18") == GPT_4O_MINI
    assert lookup_price("GPT-4o-mini", provider_id="openai") == GPT_4O_MINI
    assert data_snapshot.get_snapshot().from_auto_update is False


@pytest.mark.usefixtures("no_network")
def test_lookup_unknown_or_not_token_priced() -> None:
    assert lookup_price("definitely-not-a-model-xyz") is None
    assert lookup_price("gpt-4o-mini", provider_id="no-such-provider") is None
    assert lookup_price("whisper-1") is None  # priced per audio hour, not per token


@pytest.mark.usefixtures("no_network")
def test_lookup_embedding_model_has_no_output_price() -> None:
    price = lookup_price("text-embedding-3-small")
    assert price == Price(20_000_000, 20_000_000, 0, "genai-prices")


def _synthetic_snapshot(monkeypatch: pytest.MonkeyPatch, prices: Any) -> None:
    model = gp.ModelInfo(id="synthetic", match=gp.ClauseEquals(equals="synthetic"), prices=prices)
    provider = gp.Provider(id="openai", name="OpenAI", api_pattern="x", models=[model])
    snapshot = data_snapshot.DataSnapshot(providers=[provider], from_auto_update=False)
    monkeypatch.setattr(data_snapshot, "get_snapshot", lambda: snapshot)


def test_lookup_tiered_prices_use_the_base_tier(monkeypatch: pytest.MonkeyPatch) -> None:
    tiered = gp.TieredPrices(base=Decimal("2.5"), tiers=[gp.Tier(start=272_000, price=Decimal(5))])
    _synthetic_snapshot(monkeypatch, gp.ModelPrice(input_mtok=tiered, output_mtok=Decimal(15)))
    assert lookup_price("synthetic") == Price(
        2_500_000_000, 2_500_000_000, 15_000_000_000, "genai-prices"
    )


def test_lookup_dated_and_hourly_prices(monkeypatch: pytest.MonkeyPatch) -> None:
    """The latest price whose start date has passed; peak hours collapse to the highest."""
    today = datetime.now(UTC).date()

    def mp(inp: str, out: str, cached: str | None = None) -> gp.ModelPrice:
        extra = {} if cached is None else {"cache_read_mtok": Decimal(cached)}
        return gp.ModelPrice(input_mtok=Decimal(inp), output_mtok=Decimal(out), **extra)

    def starting(day: date, prices: gp.ModelPrice) -> gp.ConditionalPrice:
        return gp.ConditionalPrice(constraint=gp.StartDateConstraint(start_date=day), prices=prices)

    _synthetic_snapshot(
        monkeypatch,
        [
            gp.ConditionalPrice(prices=mp("1", "2")),
            starting(today - timedelta(days=1), mp("3", "4", "0.5")),
            starting(today + timedelta(days=30), mp("9", "9")),
        ],
    )
    assert lookup_price("synthetic") == Price(3 * 10**9, 5 * 10**8, 4 * 10**9, "genai-prices")

    peak = gp.TimeOfDateConstraint(
        start_time=time(0, 30, tzinfo=UTC), end_time=time(16, 30, tzinfo=UTC)
    )
    _synthetic_snapshot(
        monkeypatch,
        [
            gp.ConditionalPrice(prices=mp("0.135", "0.55", "0.035")),
            gp.ConditionalPrice(constraint=peak, prices=mp("0.27", "1.1", "0.07")),
        ],
    )
    assert lookup_price("synthetic") == Price(
        270_000_000, 70_000_000, 1_100_000_000, "genai-prices"
    )


# --- resolve_price --------------------------------------------------------------------------------

REFUSE = MeteringConfig()
DEFAULT = MeteringConfig(
    unknown_price="default", default_price=PriceConfig(input=Decimal(1), output=Decimal(2))
)


def test_resolve_config_override_wins() -> None:
    model = _model(name="gpt-4o-mini", price=PriceConfig(input=Decimal(7), output=Decimal(8)))
    assert resolve_price(model, DEFAULT) == Price(7 * 10**9, 7 * 10**9, 8 * 10**9, "config")


def test_resolve_lookup_order() -> None:
    assert resolve_price(_model(name="gpt-4o-mini"), REFUSE) == GPT_4O_MINI
    assert resolve_price(_model(name="mini", upstream_model="gpt-4o-mini"), REFUSE) == GPT_4O_MINI
    by_ref = _model(name="mini", upstream_model="my-deployment", price_ref="gpt-4o-mini")
    assert resolve_price(by_ref, REFUSE) == GPT_4O_MINI


def test_resolve_unknown_model() -> None:
    unknown = _model(name="house-model", upstream_model="house-model-v3")
    assert resolve_price(unknown, REFUSE) is None
    assert resolve_price(unknown, DEFAULT) == Price(10**9, 10**9, 2 * 10**9, "default")
    assert resolve_price(_model(name="gpt-4o-mini"), DEFAULT) == GPT_4O_MINI


# --- cost_nano ------------------------------------------------------------------------------------


def test_cost_nano_examples() -> None:
    assert cost_nano(GPT_4O_MINI, 1, 0) == 150
    assert cost_nano(GPT_4O_MINI, 0, 1) == 600
    assert cost_nano(GPT_4O_MINI, 1000, 500) == 150_000 + 300_000
    one_nano = Price(1, 1, 1, "config")
    assert cost_nano(one_nano, 7, 0) == 1  # ceil(7 / 1e6)
    assert cost_nano(one_nano, 1_000_000, 0) == 1
    assert cost_nano(one_nano, 1_000_001, 0) == 2
    assert cost_nano(one_nano, 0, 0) == 0
    huge = cost_nano(Price(75 * 10**9, 75 * 10**9, 150 * 10**9, "config"), 10**12, 10**12)
    assert huge == 225 * 10**15  # exact far beyond float precision


def test_cost_nano_cached_tokens() -> None:
    # 1000 input of which 400 cached, 100 output; nano per token: 150 / 75 / 600
    assert cost_nano(GPT_4O_MINI, 1000, 100, cached_input_tokens=400) == 90_000 + 30_000 + 60_000
    assert cost_nano(GPT_4O_MINI, 1, 0, cached_input_tokens=1) == 75
    assert cost_nano(Price(3, 1, 0, "config"), 2, 0, cached_input_tokens=1) == 1  # ceil(4 / 1e6)
    assert cost_nano(GPT_4O_MINI, 10**6, 10**6, cached_input_tokens=4 * 10**5) == (
        600_000 * 150 + 400_000 * 75 + 10**6 * 600
    )
    # clamped to [0, input]
    assert cost_nano(GPT_4O_MINI, 10**6, 0, cached_input_tokens=5 * 10**6) == 75_000_000
    assert cost_nano(GPT_4O_MINI, 10**6, 0, cached_input_tokens=-3) == 150_000_000


def test_cost_nano_is_always_an_int() -> None:
    for args in [(1, 1, 0), (0, 0, 0), (123, 456, 78), (-5, -5, -5)]:
        cost = cost_nano(GPT_4O_MINI, *args)
        assert type(cost) is int
        assert cost >= 0
    with pytest.raises(TypeError):
        cost_nano(GPT_4O_MINI, 1.0, 0)  # type: ignore[arg-type]


# --- Anthropic: cache writes at their own rates -----------------------------------------------


def test_claude_prices_from_the_database_include_both_cache_write_rates() -> None:
    price = lookup_price("claude-haiku-4-5", "anthropic")
    assert price == Price(
        1_000_000_000, 100_000_000, 5_000_000_000, "genai-prices", 1_250_000_000, 2_000_000_000
    )
    assert lookup_price("claude-haiku-4-5", "openai") is None  # another provider's catalogue


def test_cache_reads_and_writes_are_each_billed_at_their_rate_rounded_up_once() -> None:
    price = with_cache_writes(
        price_from_config(PriceConfig(input=3, output=15, cached_input="0.3"))
    )
    assert (price.cache_write_nano_per_m, price.cache_write_1h_nano_per_m) == (
        3_750_000_000,
        6_000_000_000,
    )  # Anthropic's 1.25x and 2x of the input price
    # 10 input of which 4 cache reads, 3 five-minute writes, 2 one-hour writes; 7 output.
    total = 1 * 3000 + 4 * 300 + 3 * 3750 + 2 * 6000 + 7 * 15000
    assert cost_nano(price, 10, 7, 4, 3, 2) == total
    one_token = Price(1, 1, 1, "config", 1, 1)
    assert cost_nano(one_token, 1, 0, 0, 1, 0) == 1  # a fraction of a nano rounds up, once
    # Writes are capped by the input left once reads are taken.
    assert cost_nano(price, 5, 0, 4, 3, 2) == 1 * 3750 + 4 * 300


def test_configured_cache_write_prices_win_and_openai_prices_have_none() -> None:
    price = price_from_config(
        PriceConfig(input=1, output=2, cache_write_input="1.5", cache_write_1h_input="2.5")
    )
    assert with_cache_writes(price) == price
    assert (price.cache_write_nano_per_m, price.cache_write_1h_nano_per_m) == (
        1_500_000_000,
        2_500_000_000,
    )
    assert GPT_4O_MINI.cache_write_nano_per_m is None
    assert cost_nano(GPT_4O_MINI, 1000, 0, 0, 500, 0) == cost_nano(GPT_4O_MINI, 1000, 0)


def test_a_reservation_prices_every_input_token_at_the_dearest_input_rate() -> None:
    price = with_cache_writes(price_from_config(PriceConfig(input=3, output=15)))
    assert reserve_cost_nano(price, 1000, 100) == 1000 * 6000 + 100 * 15000
    assert reserve_cost_nano(GPT_4O_MINI, 1000, 100) == cost_nano(GPT_4O_MINI, 1000, 100)


def test_resolve_price_looks_up_the_upstreams_provider_and_a_patterns_match() -> None:
    pattern = _model(name="claude-*")
    found = resolve_price(pattern, MeteringConfig(), "anthropic", name="claude-opus-4-1")
    assert found is not None and found.input_nano_per_m == 15 * 10**9
    assert resolve_price(pattern, MeteringConfig(), "anthropic", name="claude-nope") is None
    gemini = resolve_price(_model(name="gemini-2.5-flash"), MeteringConfig(), "google")
    assert gemini is not None and gemini.output_nano_per_m == 2_500_000_000
