"""Whatever redis-server people have (the bundled 6.2, Debian's 7.x, Valkey): the embedded start
says which one runs, and ``durability = "replicated"`` says plainly that it waits for a replica
still making its first copy, in ``/readyz`` and in the refusal, rather than a bare 503.

A replica "still syncing" is made deterministic with diskless sync and a long delay on the
master (what Redis 7 does by default, for 5 s): it is attached, yet acknowledges nothing.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import Proxy
from redis_topologies import HOST, client, command, poll, wait_in_sync

from proxy.config import Settings
from proxy.serving import redis_url_for
from proxy.store.embedded_redis import EmbeddedRedis, find_redis_server
from proxy.store.server_info import server_version

pytestmark = pytest.mark.redis

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def test_server_version_names_redis_or_valkey() -> None:
    assert server_version({"redis_version": "7.0.15"}) == "Redis 7.0.15"
    # Valkey reports the Redis version it is compatible with as redis_version.
    assert server_version({"redis_version": "7.2.4", "valkey_version": "9.1.2"}) == "Valkey 9.1.2"


def test_embedded_start_logs_binary_and_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings.model_validate({"redis": {"data_dir": str(tmp_path / "data")}})
    with caplog.at_level(logging.INFO, logger="proxy.serving"), redis_url_for(settings) as url:
        with redis.Redis.from_url(url) as running:
            version = server_version(running.info("server"))
    assert re.fullmatch(r"(Redis|Valkey) \d+\.\d+\.\d+", version), version
    lines = [r.getMessage() for r in caplog.records if "embedded redis-server" in r.getMessage()]
    assert len(lines) == 1, lines
    assert version in lines[0]
    assert find_redis_server() in lines[0]
    assert url in lines[0]


@pytest.fixture
def syncing(tmp_path: Path) -> Iterator[tuple[EmbeddedRedis, EmbeddedRedis]]:
    """A master whose replica is attached but waits 60 s for its first copy."""
    master = EmbeddedRedis(
        tmp_path / "master",
        persist=False,
        extra_args=["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "60"],
    )
    master.start()
    replica = EmbeddedRedis(
        tmp_path / "replica", persist=False, extra_args=["--replicaof", HOST, str(master.port)]
    )
    replica.start()
    try:
        poll(
            lambda: client(master).info("replication")["connected_slaves"] == 1,
            10,
            "the replica to attach",
        )
        yield master, replica
    finally:
        replica.stop()
        master.stop()


@pytest.fixture
def redis_url(syncing: tuple[EmbeddedRedis, EmbeddedRedis]) -> str:
    return syncing[0].url


async def _chat(proxy: Proxy, key: str) -> tuple[int, Any]:
    async with proxy.session.post(
        proxy.url + "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        return response.status, await response.json()


async def _ready(proxy: Proxy) -> tuple[int, Any]:
    async with proxy.session.get(proxy.url + "/readyz") as response:
        return response.status, await response.json()


async def test_replicated_durability_says_a_replica_is_still_syncing(
    syncing: tuple[EmbeddedRedis, EmbeddedRedis], start_proxy: Any
) -> None:
    master = syncing[0]
    proxy: Proxy = await start_proxy(
        redis={"url": master.url, "durability": "replicated", "replica_ack_timeout": 0.2}
    )
    _, key = await proxy.create_key("acme")

    status, body = await _ready(proxy)
    assert status == 503
    assert body["status"] == "unavailable"
    assert body["redis"].startswith("0 of 1 replica(s) in sync"), body
    assert "first sync" in body["redis"]

    status, body = await _chat(proxy, key)
    assert status == 503
    assert body["error"]["code"] == "store_unavailable"  # what clients and dashboards key on
    message = body["error"]["message"]
    assert "0 of 1 replica(s) acknowledged" in message, message
    assert "still be syncing" in message
    assert "not forwarded" in message

    # The first sync happens: ready, and requests go through, without a restart.
    command(master, "CONFIG", "SET", "repl-diskless-sync-delay", "0")
    await asyncio.to_thread(wait_in_sync, master, 1)
    assert await _ready(proxy) == (200, {"status": "ready", "redis": "ok"})
    status, body = await _chat(proxy, key)
    assert status == 200, body


async def test_async_durability_does_not_wait_for_replicas(
    syncing: tuple[EmbeddedRedis, EmbeddedRedis], start_proxy: Any
) -> None:
    """Readiness asks about replicas only when requests wait for them."""
    proxy: Proxy = await start_proxy(redis={"url": syncing[0].url})
    _, key = await proxy.create_key("acme")
    assert await _ready(proxy) == (200, {"status": "ready", "redis": "ok"})
    status, body = await _chat(proxy, key)
    assert status == 200, body
