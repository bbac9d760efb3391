"""Model prices as the MKA1 client reads them (``/api/v1/llm/models/pricing``): the prices this
proxy actually charges, read out of its model table.

Prices live in the configuration file (``[models.price]``, else the bundled price database,
else ``[metering.default_price]``), fixed when a process starts (a pattern's names when first
used), so the write operations of the contract (PUT, DELETE, per-org overrides, the currency)
answer 405 saying so: a price set over HTTP would differ between processes and vanish at the
next start. There are no per-org overrides: ``org/{orgId}`` lists none.

A row's ``rates`` are major currency units per token (the contract's example writes
``input_tokens: 1e-06``); the exact figures the ledger uses, integer nano-units per 1M tokens,
are in the extension ``price_nano_per_1m``. ``effective_from`` is when this process resolved
the price; ``effective_to`` is null (it is the current one); ``set_by`` names the source
(``config``, ``genai-prices`` or ``default``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from proxy.admin.auth import caller_of
from proxy.admin.schemas import Currency, PriceList
from proxy.catalog.routes import ModelRoute, UnpricedModel
from proxy.errors import ApiError, OpenAIError, not_found
from proxy.gateway.state import GATEWAY
from proxy.openapi import Reply, operation

BASE = "/api/v1/llm/models/pricing"
_PER_TOKEN = 10**15
"""Nano-units per 1M tokens → major units per token."""


def _iso(moment: float) -> str:
    return (
        datetime.fromtimestamp(moment, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def price_row(name: str, route: ModelRoute) -> dict[str, Any]:
    price = route.price
    rates: dict[str, float] = {
        "input_tokens": price.input_nano_per_m / _PER_TOKEN,
        "output_tokens": price.output_nano_per_m / _PER_TOKEN,
        "cached_tokens": price.cached_input_nano_per_m / _PER_TOKEN,
    }
    exact = {
        "input": str(price.input_nano_per_m),
        "cached_input": str(price.cached_input_nano_per_m),
        "output": str(price.output_nano_per_m),
    }
    for key, value in (
        ("cache_write", price.cache_write_nano_per_m),
        ("cache_write_1h", price.cache_write_1h_nano_per_m),
    ):
        if value is not None:
            rates[f"{key}_tokens"] = value / _PER_TOKEN  # an extension: Anthropic cache writes
            exact[f"{key}_input"] = str(value)
    return {
        "model": name,
        "org_id": None,
        "rates": rates,
        "effective_from": _iso(route.priced_at),
        "effective_to": None,
        "set_by": price.source,
        "price_nano_per_1m": exact,
    }


class PriceQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="One model's price (its dated history: one).")


_TAG = "pricing"


@operation(
    "List the prices the proxy charges",
    tag=_TAG,
    auth="admin",
    query=PriceQuery,
    answers=Reply(200, "Every model's price, or the one asked for.", PriceList),
    errors={404: "No price for that model."},
    operation_id="listModelPrices",
)
async def list_prices(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    wanted = request.query.get("model")
    if wanted:
        try:
            route = gw.routes.get(wanted)
        except UnpricedModel as exc:
            raise not_found(str(exc), code="model_not_found") from None
        if route is None:
            raise not_found(f"No price for the model '{wanted}'.", code="model_not_found")
        return web.json_response({"object": "list", "data": [price_row(wanted, route)]})
    rows = [price_row(name, route) for name, route in gw.routes.priced()]
    return web.json_response({"object": "list", "data": rows})


@operation(
    "List an org's price overrides",
    tag=_TAG,
    auth="admin",
    query=PriceQuery,
    answers=Reply(200, "Always empty: prices are cluster-wide, from the configuration.", PriceList),
    errors={404: "Another org than the caller's."},
    operation_id="listOrgModelPrices",
)
async def list_org_prices(request: web.Request) -> web.Response:
    caller = caller_of(request)
    org_id = request.match_info["orgId"]
    if caller.role != "cluster_admin" and org_id != caller.org_id:
        raise not_found(f"No org '{org_id[:64]}'.")
    return web.json_response({"object": "list", "data": []})


@operation(
    "The cluster's currency",
    tag=_TAG,
    auth="admin",
    answers=Reply(200, "The ISO 4217 code of the prices.", Currency),
    operation_id="getModelPricingCurrency",
)
async def currency(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    return web.json_response({"currency": gw.settings.metering.currency})


@operation(
    "Change prices (refused: they live in the configuration)",
    tag=_TAG,
    auth="admin",
    answers=Reply(405, "Prices are set in the configuration file.", OpenAIError),
)
async def read_only(request: web.Request) -> web.Response:
    raise ApiError(
        405,
        "Prices live in the proxy's configuration file ([[models]] price, [metering] "
        "currency, or the bundled price database) and are fixed at start-up: change the "
        "configuration and restart instead.",
        code="method_not_allowed",
        headers={"Allow": "GET"},
    )


def add_routes(app: web.Application) -> None:
    for path, reader in (
        (BASE, list_prices),
        (f"{BASE}/org/{{orgId}}", list_org_prices),
        (f"{BASE}/currency", currency),
    ):
        app.router.add_get(path, reader)
        app.router.add_put(path, read_only)
    app.router.add_delete(BASE, read_only)
    app.router.add_delete(f"{BASE}/org/{{orgId}}", read_only)
