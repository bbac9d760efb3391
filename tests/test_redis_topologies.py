"""Everything the proxy keeps in Redis works on a Redis Cluster (three masters, one replica
each) and under Redis Sentinel (a master, two replicas, three sentinels): keys and auth, org
limits and rate limits, budgets and their reports, webhook deliveries, readiness.

Each topology is started once per module from local ``redis-server`` processes and flushed
between tests; ``redis_url`` and ``store`` are overridden here, so the proxy fixtures of
``conftest`` run against it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import Proxy, eventually
from helpers import chat_json
from redis_topologies import (
    HOST,
    RedisClusterTopology,
    RedisSentinelTopology,
    client,
    command,
    running,
)

from proxy.ledger.keys import org_prefix
from proxy.ledger.scripts import ADMIT, SETTLE
from proxy.ledger.windows import windows_at
from proxy.store.client import Redis

pytestmark = pytest.mark.redis

Topology = RedisClusterTopology | RedisSentinelTopology
pytestmark = pytest.mark.slow  # a Redis cluster and a sentinel set of their own

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


@pytest.fixture(scope="module", params=["cluster", "sentinel"])
def topology(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Topology]:
    base = tmp_path_factory.mktemp(request.param)
    made: Topology = (
        RedisClusterTopology(base) if request.param == "cluster" else RedisSentinelTopology(base)
    )
    with running(made) as started:
        yield started


@pytest.fixture
def redis_url(topology: Topology) -> str:
    topology.flushall()
    return topology.url


async def daily_tokens(store: Redis, org: str, scope: str) -> int:
    window = windows_at(time.time()).daily
    return int(await store.hget(f"{org_prefix(org)}spend:{scope}:{window}", "t") or 0)


async def test_keys_auth_and_admin_api(proxy: Proxy, store: Redis) -> None:
    orgs = [f"org{n}" for n in range(6)]
    keys = {org: await proxy.create_key(org, name=f"k-{org}") for org in orgs}
    for org, (kid, key) in keys.items():
        status, body = await chat_json(proxy.session, proxy.url, key, CHAT)
        assert status == 200, body
        status, listed = await proxy.admin("GET", f"/api/v1/keys?org_id={org}")
        assert status == 200 and [k["id"] for k in listed["data"]] == [kid]
    kid, key = keys["org3"]
    status, patched = await proxy.admin("PATCH", f"/api/v1/keys/{kid}", {"name": "renamed"})
    assert (status, patched["name"]) == (200, "renamed")
    status, _ = await proxy.admin("DELETE", f"/api/v1/keys/{kid}")
    assert status == 200
    status, body = await chat_json(proxy.session, proxy.url, key, CHAT)
    assert status == 401, body
    # The org set (its own slot) lists every org that got a key.
    assert set(orgs) <= await store.smembers("bp:orgs")


async def test_org_limits_put_and_enforced(proxy: Proxy, store: Redis) -> None:
    """The org limits hash (org slot) and the org set (global slot) are written apart: one
    MULTI across both would be refused by a cluster (CROSSSLOT)."""
    _, key = await proxy.create_key("limited")
    status, body = await proxy.admin("PUT", "/api/v1/orgs/limited/limits", {"rpm": 3})
    assert status == 200, body
    assert (await proxy.admin("GET", "/api/v1/orgs/limited/limits"))[1]["limits"]["rpm"] == 3
    statuses = [(await chat_json(proxy.session, proxy.url, key, CHAT))[0] for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    assert "limited" in await store.smembers("bp:orgs")


async def test_budget_blocks_without_overshoot_and_reports_exact_spend(
    proxy: Proxy, store: Redis
) -> None:
    kid, key = await proxy.create_key("budgeted")
    budget = {
        "period": "daily",
        "limit_kind": "tokens",
        "limit": 200,
        "thresholds": [{"pct": 50, "action": "alert"}, {"pct": 100, "action": "block"}],
    }
    status, body = await proxy.admin("PUT", "/api/v1/llm/budgets/org/budgeted", budget)
    assert status == 200, body
    used = 0
    refused = None
    for _ in range(40):
        status, body = await chat_json(proxy.session, proxy.url, key, CHAT)
        if status != 200:
            refused = (status, body["error"]["code"])
            break
        used += body["usage"]["total_tokens"]
    assert refused == (429, "budget_exceeded")
    assert used <= 200  # never past the block line
    status, report = await proxy.admin("GET", "/api/v1/llm/budgets/org/budgeted")
    assert status == 200
    spend = report["data"][0]["spend"]
    assert int(spend["tokens_spent"]) == used == await daily_tokens(store, "budgeted", "o")
    assert await daily_tokens(store, "budgeted", f"k:{kid}") == used
    status, events = await proxy.admin("GET", "/api/v1/llm/budgets/org/budgeted/events")
    assert status == 200 and {e["pct"] for e in events["data"]} >= {50}
    assert await store.zcard(org_prefix("budgeted") + "leases") == 0
    # Deleting is one MULTI within the org's slot.
    status, _ = await proxy.admin("DELETE", "/api/v1/llm/budgets/org/budgeted")
    assert status == 200
    assert (await chat_json(proxy.session, proxy.url, key, CHAT))[0] == 200


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    hits: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        hits.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("/hook")), hits
    await server.close()


async def test_webhooks_delivered_from_every_orgs_outbox(
    start_proxy: Any, receiver: tuple[str, list[dict[str, Any]]]
) -> None:
    """The poller reads the org set, then each org's outbox on its own shard."""
    url, hits = receiver
    proxy: Proxy = await start_proxy(
        webhooks={"allow_private_targets": ["127.0.0.0/8"], "poll_seconds": 0.02}
    )
    orgs = [f"hooked{n}" for n in range(4)]
    for org in orgs:
        _, key = await proxy.create_key(org)
        budget = {
            "period": "daily",
            "limit_kind": "tokens",
            "limit": 1000,
            "thresholds": [{"pct": 1, "action": "alert"}],
            "webhook_url": url,
        }
        status, body = await proxy.admin("PUT", f"/api/v1/llm/budgets/org/{org}", budget)
        assert status == 200, body
        assert (await chat_json(proxy.session, proxy.url, key, CHAT))[0] == 200

    async def all_delivered() -> bool:
        return len(hits) == len(orgs)

    await eventually(all_delivered, within=15, what="one delivery per org")
    assert {hit["budget"]["scope_id"] for hit in hits} == set(orgs)

    async def recorded() -> bool:
        status, body = await proxy.admin("GET", "/api/v1/webhooks/deliveries")
        return status == 200 and [d["status"] for d in body["data"]] == ["delivered"] * 4

    await eventually(recorded, within=10, what="deliveries recorded as delivered")


async def test_many_orgs_concurrently_books_exact(proxy: Proxy, store: Redis) -> None:
    orgs = [f"busy{n}" for n in range(12)]
    keys = {org: await proxy.create_key(org) for org in orgs}

    async def traffic(org: str) -> int:
        total = 0
        for _ in range(5):
            status, body = await chat_json(proxy.session, proxy.url, keys[org][1], CHAT)
            assert status == 200, body
            total += body["usage"]["total_tokens"]
        return total

    used = dict(zip(orgs, await asyncio.gather(*(traffic(o) for o in orgs)), strict=True))
    for org in orgs:
        assert await daily_tokens(store, org, "o") == used[org]
        assert await daily_tokens(store, org, f"k:{keys[org][0]}") == used[org]
        assert await store.zcard(org_prefix(org) + "leases") == 0
        assert await store.xlen(org_prefix(org) + "usage") == 5


async def test_readyz_loads_the_scripts_on_every_master(proxy: Proxy, topology: Topology) -> None:
    masters = (
        topology.masters() if isinstance(topology, RedisClusterTopology) else [topology.master()]
    )
    for master in masters:
        command(master, "SCRIPT", "FLUSH")
    async with proxy.session.get(proxy.url + "/readyz") as response:
        assert response.status == 200
    for master in masters:
        assert client(master).script_exists(ADMIT.sha, SETTLE.sha) == [True, True]


async def test_orgs_spread_over_every_shard(proxy: Proxy, topology: Topology, store: Redis) -> None:
    if not isinstance(topology, RedisClusterTopology):
        pytest.skip("one master: nothing to spread")
    orgs = [f"spread{n}" for n in range(12)]
    for org in orgs:
        _, key = await proxy.create_key(org)
        assert (await chat_json(proxy.session, proxy.url, key, CHAT))[0] == 200
    holders = {topology.master_of(org_prefix(org)).port for org in orgs}
    assert len(holders) == 3  # 12 orgs land on all three shards (checked for these names)
    for org in orgs:
        master = topology.master_of(org_prefix(org))
        assert client(master).exists(org_prefix(org) + "usage") == 1


async def test_replicated_readiness_counts_replicas_in_sync(
    start_proxy: Any, topology: Topology
) -> None:
    """With ``durability = "replicated"`` a master without a synced replica admits nothing:
    under Sentinel the process is not ready; on a cluster only that shard's orgs are refused,
    so the process stays ready and says which shard."""
    proxy: Proxy = await start_proxy(redis={"url": topology.url, "durability": "replicated"})

    async def ready() -> tuple[int, Any]:
        async with proxy.session.get(proxy.url + "/readyz") as response:
            return response.status, await response.json()

    assert await ready() == (200, {"status": "ready", "redis": "ok"})
    if isinstance(topology, RedisClusterTopology):
        master, replica = topology.shards()[0]
        stopped = [replica]
        expected = (200, f"ok except 0 of 1 replica(s) in sync on {HOST}:{master.port} (")
    else:
        stopped = topology.replicas()
        expected = (503, "0 of 1 replica(s) in sync (")
    for node in stopped:
        node.stop()
    try:
        status, body = await eventually(
            lambda: _changed(ready), within=10, what="readiness to see the replica gone"
        )
        assert (status, body["redis"][: len(expected[1])]) == expected, body
        assert "first sync" in body["redis"]
    finally:
        for node in stopped:
            node.start()
        await asyncio.to_thread(topology.wait_healthy)
    assert await ready() == (200, {"status": "ready", "redis": "ok"})


async def _changed(ready: Any) -> tuple[int, Any] | None:
    status, body = await ready()
    return None if body["redis"] == "ok" else (status, body)
