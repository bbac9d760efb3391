"""Zero overshoot on ``/v1/messages`` under real concurrency: 200 requests in flight over two
proxy processes against a budget that fits exactly N reservations, and the books equal to the
mock's usage priced with cache rates, to the nano."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from conftest import ADMIN_KEY, proxy_processes, write_config

from proxy.catalog.pricing import price_from_config, reserve_cost_nano, with_cache_writes
from proxy.config import PriceConfig
from proxy.dialects.claude_bound import prompt_bound

N = 10
CONCURRENT = 200
MAX_TOKENS = 40
MODEL = "claude-test"
RATES = {
    "input": "3",
    "cache_read": "0.3",
    "cache_write": "3.75",
    "cache_write_1h": "6",
    "output": "15",
}
PRICE = PriceConfig(
    input=Decimal(RATES["input"]),
    cached_input=Decimal(RATES["cache_read"]),
    cache_write_input=Decimal(RATES["cache_write"]),
    cache_write_1h_input=Decimal(RATES["cache_write_1h"]),
    output=Decimal(RATES["output"]),
)
BODY = {
    "model": MODEL,
    "max_tokens": MAX_TOKENS,
    "system": "you are terse",
    "messages": [{"role": "user", "content": "say something nice about budgets"}],
}
MOCK_HEADERS = {
    "x-mock-cached-tokens": "4",
    "x-mock-cache-write-tokens": "3",
    "x-mock-cache-write-1h-tokens": "2",
    "x-mock-output-tokens": str(MAX_TOKENS),
    # Every admission is decided while the admitted requests are still running: none has
    # settled yet, so exactly N reservations fit, whatever the interleaving.
    "x-mock-latency-ms": "1500",
}


def priced(usage: dict[str, Any]) -> int:
    """The mock's usage priced independently of the proxy: Decimal rates, rounded up once."""
    one_hour = usage["cache_creation"]["ephemeral_1h_input_tokens"]
    total = (
        Decimal(usage["input_tokens"]) * Decimal(RATES["input"])
        + Decimal(usage["cache_read_input_tokens"]) * Decimal(RATES["cache_read"])
        + Decimal(usage["cache_creation_input_tokens"] - one_hour) * Decimal(RATES["cache_write"])
        + Decimal(one_hour) * Decimal(RATES["cache_write_1h"])
        + Decimal(usage["output_tokens"]) * Decimal(RATES["output"])
    )
    return math.ceil(total * 10**9 / 10**6)


@pytest.fixture
async def two_processes(
    tmp_path: Path, redis_url: str, mock_upstream: TestServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[list[str]]:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-upstream-secret")
    root = str(mock_upstream.make_url("")).rstrip("/")
    tail = f"""
[[upstreams]]
name = "claude"
base_url = "{root}"
kind = "anthropic"
api_key_env = "TEST_UPSTREAM_KEY"
forward_headers = ["x-mock-*"]

[[models]]
name = "{MODEL}"
upstream = "claude"
context_window = 200000
[models.price]
input = {RATES["input"]}
cached_input = {RATES["cache_read"]}
cache_write_input = {RATES["cache_write"]}
cache_write_1h_input = {RATES["cache_write_1h"]}
output = {RATES["output"]}
"""
    config = write_config(
        tmp_path / "proxy.toml", str(mock_upstream.make_url("/v1")), redis_url, tail=tail
    )
    async with proxy_processes(config) as urls:
        yield urls


async def admin(
    session: aiohttp.ClientSession, url: str, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with session.request(method, url + path, json=body, headers=headers) as response:
        return response.status, await response.json(content_type=None)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cost", "tokens"])
async def test_exactly_n_messages_admitted_under_200_concurrent_on_two_processes(
    two_processes: list[str], store: aioredis.Redis, kind: str
) -> None:
    route_price = with_cache_writes(price_from_config(PRICE))
    bound = prompt_bound(BODY, 200_000)
    reserve = (
        reserve_cost_nano(route_price, bound, MAX_TOKENS) if kind == "cost" else bound + MAX_TOKENS
    )
    line = N * reserve
    org = f"claude-burst-{kind}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        url_a, url_b = two_processes
        status, created = await admin(session, url_a, "POST", "/api/v1/keys", {"org_id": org})
        assert status == 201, created
        kid, key = created["id"], created["key"]
        limit: float | int = line
        if kind == "cost":
            exact = Decimal(line) / 10**9
            assert Decimal(str(float(exact))) == exact
            limit = float(exact)
        spec = {
            "period": "monthly",
            "limit_kind": kind,
            "limit": limit,
            "thresholds": [{"pct": 100, "action": "block"}],
        }
        status, answer = await admin(session, url_b, "PUT", f"/api/v1/llm/budgets/org/{org}", spec)
        assert status == 200, answer

        async def one(i: int) -> tuple[int, Any]:
            headers = {"x-api-key": key, "anthropic-version": "2023-06-01", **MOCK_HEADERS}
            url = two_processes[i % 2] + "/v1/messages"
            async with session.post(url, json=BODY, headers=headers) as response:
                return response.status, await response.json(content_type=None)

        results = await asyncio.gather(*(one(i) for i in range(CONCURRENT)))

    by_status = Counter(status for status, _ in results)
    assert by_status == {200: N, 429: CONCURRENT - N}, by_status
    refusals = {a["error"]["type"] for status, a in results if status == 429}
    assert refusals == {"rate_limit_error"}
    usages = [answer["usage"] for status, answer in results if status == 200]
    expected_cost = sum(priced(u) for u in usages)
    expected_tokens = sum(
        u["input_tokens"]
        + u["cache_read_input_tokens"]
        + u["cache_creation_input_tokens"]
        + u["output_tokens"]
        for u in usages
    )
    month = datetime.now(UTC).strftime("%Y-%m")
    p = f"bp:{{o:{org}}}:"
    cost, tokens = await store.hmget(f"{p}spend:o:{month}", "c", "t")
    settled = int(cost) if kind == "cost" else int(tokens)
    print(
        f"\n[{kind}] admitted {N}/{CONCURRENT}; reserve {reserve} each, line {line}, settled "
        f"{settled}, overshoot {max(0, settled - line)}; spend {cost} nano == mock's usage "
        f"priced with cache rates {expected_cost}"
    )
    assert int(cost) == expected_cost and int(tokens) == expected_tokens
    assert settled <= line
    assert await store.xlen(p + "usage") == N
    assert await store.zcard(p + "leases") == 0
    for h in (p + "infl:o", p + f"infl:k:{kid}"):
        assert await store.exists(h) == 0, "an idle scope keeps no in-flight hash"
