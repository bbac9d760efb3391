"""The hot path's pipelined connection on its own: a connection Redis closed is replaced and the
call resent (once), a missing script is loaded on the node that lacks it, and with
``durability = "replicated"`` a batch is acknowledged only once a replica has it."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
import trustme
from conftest import TEST_TOPOLOGY
from redis_topologies import REPLICATION_ARGS, client, command, pause, resume, wait_in_sync

from proxy.config import RedisConfig
from proxy.store.connection import hot_path
from proxy.store.embedded_redis import EmbeddedRedis
from proxy.store.pipelined import (
    ConnectionLost,
    Link,
    PipelinedConnection,
    ReplicaTimeout,
    SingleNode,
)

pytestmark = pytest.mark.redis

ONE_SERVER = pytest.mark.skipif(
    TEST_TOPOLOGY != "single", reason="talks to the test Redis as one server"
)


def link_to(url: str) -> Link:
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    return Link("127.0.0.1", port, timeout=2.0, connect_timeout=0.5)


@ONE_SERVER
async def test_a_connection_redis_closed_is_replaced_and_the_call_resent(redis_url: str) -> None:
    """Issue #12: after a Redis restart the first calls failed on connections to the old
    server. The hot path resends a call whose connection died before the reply."""
    hot = hot_path(RedisConfig(), redis_url)
    assert hot is not None
    try:
        assert await hot.execute("PING") == "PONG"
        # Redis drops the hot path's connection. This blocking call keeps the event loop from
        # running, so the hot path learns of it only after it has queued its next call.
        with redis.Redis.from_url(redis_url) as killer:
            assert killer.client_kill_filter(_type="normal", skipme=True) >= 1
        assert await hot.execute("SET", "after-kill", "1") is not None
        with redis.Redis.from_url(redis_url) as check:
            assert check.get("after-kill") == b"1"
    finally:
        hot.close()


@pytest.fixture
async def dropping_server() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A TCP server that closes every connection once it has read a command: a Redis that
    dies with each call (a fault injector, not a Redis)."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(4096)
        if data:
            received.append(data)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield port, received
    server.close()
    await server.wait_closed()


async def test_a_call_is_resent_once_not_again(dropping_server: tuple[int, list[bytes]]) -> None:
    """A call that may have run is resent once (admit and settle are idempotent by request
    id), never in a loop: a server that keeps dying gets the call twice, then a 503."""
    port, received = dropping_server
    link = Link("127.0.0.1", port, timeout=2.0, connect_timeout=0.5)
    hot = PipelinedConnection(SingleNode(link))
    with pytest.raises(ConnectionLost) as caught:
        await hot.execute("SET", "k", "v")
    assert caught.value.written
    assert len(received) == 2
    hot.close()


@ONE_SERVER
async def test_a_script_missing_on_the_node_is_loaded_there(
    redis_url: str, store: aioredis.Redis
) -> None:
    source = "return redis.call('INCR', KEYS[1])"
    sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 - Redis's script id
    hot = PipelinedConnection(SingleNode(link_to(redis_url)), {sha: source})
    try:
        await store.script_flush()
        assert await hot.execute("EVALSHA", sha, 1, "counter") == 1
        assert await hot.execute("EVALSHA", sha, 1, "counter") == 2
        unknown = hashlib.sha1(b"never loaded").hexdigest()  # noqa: S324
        with pytest.raises(redis.exceptions.NoScriptError):
            await hot.execute("EVALSHA", unknown, 1, "counter")
    finally:
        hot.close()


@pytest.fixture
def master_and_replica(tmp_path: Path) -> Iterator[tuple[EmbeddedRedis, EmbeddedRedis]]:
    master = EmbeddedRedis(tmp_path / "master", persist=False, extra_args=REPLICATION_ARGS)
    replica = EmbeddedRedis(
        tmp_path / "replica", persist=False, extra_args=["--replicaof", "127.0.0.1", "0"]
    )
    master.start()
    replica.start()
    try:
        command(replica, "REPLICAOF", "127.0.0.1", master.port)
        wait_in_sync(master, 1)
        yield master, replica
    finally:
        resume(replica)
        replica.stop()
        master.stop()


def replicated(**fields: Any) -> RedisConfig:
    return RedisConfig(
        url="redis://replicated", durability="replicated", replica_ack_timeout=0.2, **fields
    )


async def test_replicated_calls_return_once_a_replica_has_them_one_wait_per_batch(
    master_and_replica: tuple[EmbeddedRedis, EmbeddedRedis],
) -> None:
    master, replica = master_and_replica
    hot = hot_path(replicated(), f"redis://127.0.0.1:{master.port}/0")
    assert hot is not None
    try:
        command(master, "CONFIG", "RESETSTAT")
        replies = await asyncio.gather(*(hot.execute("INCR", "n") for _ in range(200)))
        assert sorted(replies) == list(range(1, 201))
        # Acknowledged means the replica has it: read there at once, no waiting.
        assert command(replica, "GET", "n") == "200"
        waits = client(master).info("commandstats")["cmdstat_wait"]["calls"]
        assert 1 <= waits < 200  # batches share a WAIT
    finally:
        hot.close()


async def test_replicated_call_fails_when_no_replica_acknowledges(
    master_and_replica: tuple[EmbeddedRedis, EmbeddedRedis],
) -> None:
    """The write exists on the master alone: the caller must not take it as durable (an admit
    becomes a 503, a settle is retried)."""
    master, replica = master_and_replica
    hot = hot_path(replicated(), f"redis://127.0.0.1:{master.port}/0")
    assert hot is not None
    try:
        assert await hot.execute("INCR", "n") == 1
        pause(replica)
        with pytest.raises(ReplicaTimeout, match="0 of 1 replica"):
            await hot.execute("INCR", "n")
        resume(replica)
        assert await hot.execute("INCR", "n") == 3
    finally:
        hot.close()


def test_replicated_needs_the_pipelined_hot_path() -> None:
    with pytest.raises(ValueError, match="replicated"):
        hot_path(replicated(), "unix:///tmp/redis.sock")
    assert hot_path(RedisConfig(), "unix:///tmp/redis.sock") is None


@pytest.fixture
async def tls_front(
    master_and_replica: tuple[EmbeddedRedis, EmbeddedRedis],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[int]:
    """TLS in front of the real master (what stunnel or a managed service's endpoint does),
    with a certificate for 127.0.0.1 from a CA that ``SSL_CERT_FILE`` names."""
    master, _ = master_and_replica
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))

    async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        to_reader, to_writer = await asyncio.open_connection("127.0.0.1", master.port)
        await asyncio.gather(copy(reader, to_writer), copy(to_reader, writer))

    server = await asyncio.start_server(relay, "127.0.0.1", 0, ssl=context)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def test_the_hot_path_speaks_tls_with_replicated_durability(
    tls_front: int, master_and_replica: tuple[EmbeddedRedis, EmbeddedRedis]
) -> None:
    """``rediss://`` (managed services) keeps the pipelined path and its WAIT."""
    _, replica = master_and_replica
    hot = hot_path(replicated(), f"rediss://127.0.0.1:{tls_front}/0")
    assert hot is not None
    try:
        assert await asyncio.gather(*(hot.execute("INCR", "n") for _ in range(20))) == list(
            range(1, 21)
        )
        assert command(replica, "GET", "n") == "20"
    finally:
        hot.close()


async def test_tls_verifies_the_server(tls_front: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE")  # the test CA is trusted no more
    hot = hot_path(RedisConfig(), f"rediss://127.0.0.1:{tls_front}/0")
    assert hot is not None
    try:
        with pytest.raises(redis.exceptions.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            await hot.execute("PING")
    finally:
        hot.close()


async def test_a_caller_cancelled_while_connecting_does_not_cancel_the_others() -> None:
    """Handlers are cancelled when their client leaves: one that was waiting for the shared
    connection attempt must not take that attempt down with it for everyone else."""
    asked, answer = asyncio.Event(), asyncio.Event()

    async def slow_redis(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Answers AUTH (which the connection sends before anything else) only when told to.
        await reader.read(4096)
        asked.set()
        await answer.wait()
        writer.write(b"+OK\r\n")
        await writer.drain()
        while data := await reader.read(4096):
            writer.write(b"+PONG\r\n" * data.count(b"PING"))
            await writer.drain()

    server = await asyncio.start_server(slow_redis, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    link = Link("127.0.0.1", port, timeout=5.0, connect_timeout=5.0, password="pw")
    try:
        leaving = asyncio.create_task(link.call("PING"))
        staying = asyncio.create_task(link.call("PING"))
        await asked.wait()  # both are waiting for the one connection attempt, mid-AUTH
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        answer.set()
        assert await asyncio.wait_for(staying, 5) == "PONG"
    finally:
        link.close()
        server.close()
        await server.wait_closed()
