"""The hot path on a Redis Cluster: calls go to the master of their org's slot, follow a slot
that moved, refuse to run against a slot half-way through a migration, and load scripts on a
master that lacks them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Proxy
from helpers import chat_json
from redis_topologies import RedisClusterTopology, client, command, running

from proxy.ledger.keys import org_prefix
from proxy.ledger.windows import windows_at

pytestmark = pytest.mark.slow  # a Redis cluster of its own

pytestmark = pytest.mark.redis

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterTopology]:
    with running(RedisClusterTopology(tmp_path_factory.mktemp("cluster"))) as started:
        yield started


@pytest.fixture
def redis_url(cluster: RedisClusterTopology) -> str:
    cluster.flushall()
    return cluster.url


def slot_keys(node: Any, slot: int) -> list[str]:
    keys: list[str] = command(node, "CLUSTER", "GETKEYSINSLOT", slot, 1000)
    return keys


def begin_migration(cluster: RedisClusterTopology, slot: int, source: Any, target: Any) -> None:
    source_id = command(source, "CLUSTER", "MYID")
    target_id = command(target, "CLUSTER", "MYID")
    command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)


def finish_migration(cluster: RedisClusterTopology, slot: int, source: Any, target: Any) -> None:
    keys = slot_keys(source, slot)
    if keys:
        command(source, "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
    target_id = command(target, "CLUSTER", "MYID")
    for master in cluster.masters():
        command(master, "CLUSTER", "SETSLOT", slot, "NODE", target_id)


def org_tokens(node: Any, org: str) -> int:
    window = windows_at(time.time()).daily
    return int(client(node).hget(f"{org_prefix(org)}spend:o:{window}", "t") or 0)


async def test_a_call_follows_its_slot_to_a_new_master(
    proxy: Proxy, cluster: RedisClusterTopology
) -> None:
    _, key = await proxy.create_key("mover")
    status, first = await chat_json(proxy.session, proxy.url, key, CHAT)
    assert status == 200
    prefix = org_prefix("mover")
    source = cluster.master_of(prefix)
    target = next(m for m in cluster.masters() if m is not source)
    slot = client(source).cluster("KEYSLOT", prefix)
    begin_migration(cluster, slot, source, target)
    finish_migration(cluster, slot, source, target)

    # The hot path's map still says source.
    status, second = await chat_json(proxy.session, proxy.url, key, CHAT)
    assert status == 200, second
    assert slot_keys(source, slot) == []
    used = first["usage"]["total_tokens"] + second["usage"]["total_tokens"]
    assert org_tokens(target, "mover") == used
    assert client(target).xlen(prefix + "usage") == 2


async def test_a_slot_half_migrated_refuses_rather_than_splits_the_books(
    proxy: Proxy, cluster: RedisClusterTopology
) -> None:
    """Redis answers ASK for every script call on a migrating slot (a script declares only the
    org prefix, which never exists); following it would run admission against the importing
    node's partial copy of the org (here: no key record, so a 401, or spend read as 0). The
    call is refused (503) instead, and served again once the slot has moved."""
    _, key = await proxy.create_key("migrating")
    status, first = await chat_json(proxy.session, proxy.url, key, CHAT)
    assert status == 200
    prefix = org_prefix("migrating")
    source = cluster.master_of(prefix)
    target = next(m for m in cluster.masters() if m is not source)
    slot = client(source).cluster("KEYSLOT", prefix)
    begin_migration(cluster, slot, source, target)

    status, body = await chat_json(proxy.session, proxy.url, key, CHAT)
    assert (status, body["error"]["code"]) == (503, "store_unavailable")
    assert slot_keys(target, slot) == []  # nothing was written on the importing node

    finish_migration(cluster, slot, source, target)
    status, second = await chat_json(proxy.session, proxy.url, key, CHAT)
    assert status == 200, second
    used = first["usage"]["total_tokens"] + second["usage"]["total_tokens"]
    assert org_tokens(target, "migrating") == used
    assert client(target).zcard(prefix + "leases") == 0


async def test_scripts_are_loaded_on_a_master_that_lacks_them(
    proxy: Proxy, cluster: RedisClusterTopology
) -> None:
    """As on a replica promoted by a failover, whose script cache is empty."""
    _, key = await proxy.create_key("forgetful")
    assert (await chat_json(proxy.session, proxy.url, key, CHAT))[0] == 200
    master = cluster.master_of(org_prefix("forgetful"))
    command(master, "SCRIPT", "FLUSH")
    for _ in range(3):
        status, body = await chat_json(proxy.session, proxy.url, key, CHAT)
        assert status == 200, body
