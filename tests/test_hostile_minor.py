"""Small refusals a hostile or careless client met with the wrong answer (issue 21, item 7)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from conftest import ADMIN_KEY, Proxy, make_settings
from multidict import CIMultiDict
from redis.exceptions import ResponseError

from proxy.app import create_app
from proxy.gateway.deferred_settles import store_unavailable
from proxy.store.embedded_redis import EmbeddedRedis

MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize("page", ["0-0", "99999999999999999999-0", "0-99999999999999999999"])
async def test_a_page_redis_cannot_take_is_a_400_not_a_503(proxy: Proxy, page: str) -> None:
    status, body = await proxy.admin("GET", f"/api/v1/llm/usage/requests?org_id=acme&page={page}")
    assert status == 400, body
    assert body["error"]["param"] == "page"


async def test_a_page_that_is_a_real_cursor_is_still_taken(proxy: Proxy) -> None:
    status, body = await proxy.admin("GET", "/api/v1/llm/usage/requests?org_id=acme&page=1-0")
    assert status == 200, body


async def test_usage_costs_refuses_an_all_orgs_that_is_not_a_boolean(proxy: Proxy) -> None:
    span = "start_time=0&end_time=86400"
    status, body = await proxy.admin("GET", f"/api/v1/llm/usage/completions?{span}&all_orgs=maybe")
    assert status == 400, body  # the premise: completions refuses it
    status, body = await proxy.admin("GET", f"/api/v1/llm/usage/costs?{span}&all_orgs=maybe")
    assert status == 400, body
    assert body["error"]["param"] == "all_orgs"
    status, body = await proxy.admin("GET", f"/api/v1/llm/usage/costs?{span}&all_orgs=true")
    assert status == 200, body


async def test_x_on_behalf_of_sent_twice_is_refused(proxy: Proxy) -> None:
    _, key = await proxy.create_key()
    headers: CIMultiDict[str] = CIMultiDict(Authorization=f"Bearer {key}")
    headers.add("X-On-Behalf-Of", "alice")
    headers.add("X-On-Behalf-Of", "bob")
    async with proxy.session.post(
        proxy.url + "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": MESSAGES},
        headers=headers,
    ) as response:
        body = await response.json()
        assert response.status == 400, body
    assert body["error"]["param"] == "X-On-Behalf-Of"
    assert not proxy.received(), "refused before anything reached the upstream"


@pytest.fixture
async def proxy_on_own_redis(
    tmp_path: Path, mock_upstream: TestServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[str, EmbeddedRedis]]:
    """A proxy on a Redis of its own, which the test may fill."""
    monkeypatch.setenv("TEST_PROXY_ADMIN_KEY", ADMIN_KEY)
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-upstream-secret")
    redis = EmbeddedRedis(tmp_path / "redis", persist=False)
    await redis.astart()
    app = create_app(make_settings(str(mock_upstream.make_url("/v1"))), redis.url)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), redis
    finally:
        await server.close()
        await redis.astop()


async def test_readyz_is_not_ready_while_redis_refuses_writes(
    proxy_on_own_redis: tuple[str, EmbeddedRedis],
) -> None:
    url, redis = proxy_on_own_redis
    async with aioredis.Redis.from_url(redis.url) as store, aiohttp.ClientSession() as session:
        async with session.get(url + "/readyz") as response:
            assert response.status == 200
        await store.config_set("maxmemory", "1")
        with pytest.raises(ResponseError, match="maxmemory") as refused:
            await store.set("premise", "an admit would be refused too")
        # A settle refused so waits for Redis (it is not this item's fault): never quarantined.
        assert store_unavailable(refused.value)
        async with session.get(url + "/readyz") as response:
            body = await response.json()
            assert response.status == 503, body
        assert body["redis"] == "refuses writes: OOM (maxmemory reached)"
        await store.config_set("maxmemory", "0")
        async with session.get(url + "/readyz") as response:
            assert response.status == 200
