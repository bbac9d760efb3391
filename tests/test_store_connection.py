"""Redis URLs and the redis-py clients made from them: the ``limits`` library's forms for
Sentinel and Cluster, passwords from the URL or the environment (never in a message), what
``durability = "replicated"`` needs, and connection errors that stay connection errors."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_TOPOLOGY
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy.config import ConfigError, RedisConfig, load_settings
from proxy.store import topology
from proxy.store.connection import connect

pytestmark = pytest.mark.redis

ONE_SERVER = pytest.mark.skipif(
    TEST_TOPOLOGY != "single", reason="talks to the test Redis as one server"
)


def test_sentinel_url_forms() -> None:
    parsed = topology.parse("redis+sentinel://:pw@h1:26380,h2/mymaster/2")
    assert parsed.kind == "sentinel"
    assert parsed.nodes == (("h1", 26380), ("h2", 26379))
    assert (parsed.service, parsed.db) == ("mymaster", 2)
    assert parsed.password == parsed.sentinel_password == "pw"
    assert "pw" not in repr(parsed)
    env = {"REDIS_PASSWORD": "data", "REDIS_SENTINEL_PASSWORD": "watch"}
    parsed = topology.parse("redis+sentinel://u:pw@h1:26379/svc", env)
    assert (parsed.username, parsed.password, parsed.sentinel_password) == ("u", "data", "watch")
    assert topology.parse("rediss+sentinel://h1:26379/svc").tls


def test_cluster_url_forms() -> None:
    parsed = topology.parse("redis+cluster://127.0.0.1:7000,[::1]:7001,node3")
    assert parsed.kind == "cluster"
    assert parsed.nodes == (("127.0.0.1", 7000), ("::1", 7001), ("node3", 6379))
    assert parsed.tcp and topology.parse("rediss+cluster://h:7000").tls
    assert topology.parse("redis+cluster://:x@h:7000", {"REDIS_PASSWORD": "y"}).password == "y"


def test_single_server_urls_stay_as_they_are() -> None:
    parsed = topology.parse("redis://:x@localhost:6380/3")
    assert (parsed.kind, parsed.nodes, parsed.db, parsed.password) == (
        "single",
        (("localhost", 6380),),
        3,
        "x",
    )
    # REDIS_PASSWORD is for the new forms; a redis:// URL means what redis-py says it means.
    assert topology.parse("redis://h:1/0", {"REDIS_PASSWORD": "y"}).password is None
    assert topology.parse("unix:///run/redis.sock").nodes == ()
    assert topology.parse("rediss://h:6380/0").tls


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel://:secret@h1:26379", "service_name"),
        ("redis+sentinel://h1:26379/svc/x", "service_name"),
        ("redis+cluster://:secret@h:7000/1", "database 0"),
        ("redis+cluster://h:port", "bad host:port"),
        ("memcached://:secret@h:11211", "unknown scheme"),
    ],
)
def test_bad_urls_are_config_errors_naming_the_problem_not_the_password(
    url: str, problem: str, tmp_path: Path
) -> None:
    empty = tmp_path / "proxy.toml"
    empty.write_text("")
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"REDIS_URL": url, "PROXY_CONFIG": str(empty)})
    assert problem in str(caught.value)
    assert "secret" not in str(caught.value)


def test_replicated_durability_needs_what_it_waits_for() -> None:
    url = "redis+cluster://h:7000"
    with pytest.raises(ValueError, match="replica_ack_timeout"):
        RedisConfig(url=url, durability="replicated", replica_ack_timeout=2, hot_path_timeout=2)
    for url in ("", "unix:///run/redis.sock"):  # embedded: no replica; unix: no hot path
        with pytest.raises(ValueError, match="replicas"):
            RedisConfig(url=url, durability="replicated")


def test_cluster_url_makes_a_cluster_client() -> None:
    client = connect(RedisConfig(), "redis+cluster://127.0.0.1:7000,127.0.0.1:7001")
    assert isinstance(client, RedisCluster)
    assert [n.port for n in client.startup_nodes] == [7000, 7001]


@ONE_SERVER
async def test_a_write_racing_a_close_is_a_connection_error(redis_url: str) -> None:
    """redis-py closes connections from its own error handling (``disconnect(nowait=True)``),
    also ones another call is writing on; that call then raised AttributeError — not a
    RedisError, so a 500 instead of a 503 and no retry (seen in a cluster failover)."""
    client = connect(RedisConfig(), redis_url)
    pool: Any = client.connection_pool
    connection = pool.make_connection()
    try:
        await connection.connect()
        sending = asyncio.create_task(
            connection.send_packed_command(connection.pack_command("PING"))
        )
        await asyncio.sleep(0)  # the write has started and waits for its turn
        await connection.disconnect(nowait=True)
        with pytest.raises(RedisConnectionError):
            await sending
    finally:
        await connection.disconnect()
        await client.aclose()
