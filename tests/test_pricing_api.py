"""``/api/v1/llm/models/pricing``: the prices the proxy charges, in the MKA1 client's shape;
prices live in the configuration, so writes are a 405 saying so."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from conftest import Proxy

from proxy.gateway.state import GATEWAY


async def call(
    proxy: Proxy, method: str, path: str, key: str | None = None
) -> tuple[int, Any, Any]:
    headers = {"Authorization": f"Bearer {key or proxy.admin_key}"}
    async with proxy.session.request(method, proxy.url + path, headers=headers) as response:
        return response.status, await response.json(content_type=None), response.headers


async def test_the_price_list_is_what_the_proxy_charges(proxy: Proxy) -> None:
    status, body, _ = await call(proxy, "GET", "/api/v1/llm/models/pricing")
    assert status == 200 and body["object"] == "list"
    rows = {row["model"]: row for row in body["data"]}
    assert set(rows) == {"gpt-4o-mini", "gpt-4o", "gpt-4o-latest", "text-embedding-3-small"}
    gpt4o = rows["gpt-4o"]
    assert gpt4o["rates"] == {
        "input_tokens": 2.5e-06,
        "output_tokens": 1e-05,
        "cached_tokens": 1.25e-06,
    }
    assert gpt4o["price_nano_per_1m"] == {
        "input": "2500000000",
        "cached_input": "1250000000",
        "output": "10000000000",
    }
    assert gpt4o["org_id"] is None and gpt4o["effective_to"] is None
    assert gpt4o["set_by"] == "config"
    assert datetime.fromisoformat(gpt4o["effective_from"]).tzinfo is not None
    # Prices from the database are the ones metering uses, to the nano.
    mini = proxy.app[GATEWAY].routes.get("gpt-4o-mini")
    assert mini is not None and rows["gpt-4o-mini"]["set_by"] == "genai-prices"
    assert rows["gpt-4o-mini"]["price_nano_per_1m"]["output"] == str(mini.price.output_nano_per_m)
    # One model: its (single, current) row; an unknown model is a 404.
    status, body, _ = await call(proxy, "GET", "/api/v1/llm/models/pricing?model=gpt-4o-latest")
    assert status == 200 and [r["model"] for r in body["data"]] == ["gpt-4o-latest"]
    status, body, _ = await call(proxy, "GET", "/api/v1/llm/models/pricing?model=gpt-9")
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, body, _ = await call(proxy, "GET", "/api/v1/llm/models/pricing/currency")
    assert (status, body) == (200, {"currency": "USD"})
    status, body, _ = await call(proxy, "GET", "/api/v1/llm/models/pricing/org/acme")
    assert (status, body) == (200, {"object": "list", "data": []})


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/api/v1/llm/models/pricing"),
        ("DELETE", "/api/v1/llm/models/pricing?model=gpt-4o"),
        ("PUT", "/api/v1/llm/models/pricing/org/acme"),
        ("DELETE", "/api/v1/llm/models/pricing/org/acme?model=gpt-4o"),
        ("PUT", "/api/v1/llm/models/pricing/currency"),
    ],
)
async def test_prices_are_changed_in_the_configuration_not_over_http(
    proxy: Proxy, method: str, path: str
) -> None:
    status, body, headers = await call(proxy, method, path)
    assert status == 405 and headers["Allow"] == "GET"
    assert "configuration" in body["error"]["message"]


async def test_who_may_read_prices(proxy: Proxy) -> None:
    _, member = await proxy.create_key("acme")
    _, org_admin = await proxy.create_key("acme", role="org_admin")
    status, _, _ = await call(proxy, "GET", "/api/v1/llm/models/pricing", member)
    assert status == 403
    status, _, _ = await call(proxy, "GET", "/api/v1/llm/models/pricing", org_admin)
    assert status == 200
    status, _, _ = await call(proxy, "GET", "/api/v1/llm/models/pricing/org/acme", org_admin)
    assert status == 200
    status, _, _ = await call(proxy, "GET", "/api/v1/llm/models/pricing/org/globex", org_admin)
    assert status == 404


async def test_the_configured_currency_is_reported(start_proxy: Any) -> None:
    proxy: Proxy = await start_proxy(metering={"currency": "EUR"})
    status, body, _ = await call(proxy, "GET", "/api/v1/llm/models/pricing/currency")
    assert (status, body) == (200, {"currency": "EUR"})
    status, body, _ = await call(
        proxy, "GET", "/api/v1/llm/usage/costs?start_time=0&end_time=86400"
    )
    assert status == 200 and body["currency"] == "EUR" and body["total_cost_nano"] == "0"
