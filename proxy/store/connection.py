"""Redis clients (key names are ``proxy.ledger.keys``'s, scripts ``proxy.store.scripts``).

Two clients per process: redis-py (pooled) for key look-ups, the admin APIs, webhooks and
script loading, and the pipelined hot path (``proxy.store.pipelined``) for admit and settle.
The URL decides the kind of both (``proxy.store.topology``).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterable
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy.config import RedisConfig
from proxy.store import topology
from proxy.store.client import Redis
from proxy.store.cluster import ClusterRouter
from proxy.store.pipelined import Link, PipelinedConnection, Router, SingleNode
from proxy.store.scripts import LuaScript
from proxy.store.sentinel import SentinelRouter


def _retry() -> Retry:
    """A pooled connection that turns out dead (Redis restarted, a master failed over) is
    replaced and the call sent once more, at once. Only connection errors: a timeout is not
    retried, so a hung Redis still becomes a fast 503. Every command sent through this client
    is idempotent or harmless twice (plain writes of given values, budget PUTs, webhook claims
    keyed by event id); admit and settle go through the hot path, which has its own rules."""
    return Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


class _WriteGuard:
    """redis-py 8.1 lets a write race a close of the same connection (its own error handling
    closes connections other calls are using, e.g. a cluster client's reset during a
    failover): the write then fails with ``AttributeError``/``TypeError`` instead of a
    ``ConnectionError`` (redis-py issues #3546, #4287), which no retry policy catches and
    which surfaced as a 500. Here it is the ``OSError`` redis-py turns into a
    ``ConnectionError``: retried, else a 503."""

    _writer: Any

    async def _send_packed_command(self, command: Iterable[bytes]) -> None:
        writer = self._writer  # one reference for the whole write
        if writer is None or writer.transport.is_closing():
            raise ConnectionResetError("the connection was closed while a command was sent")
        writer.writelines(command)
        await writer.drain()


class _Connection(_WriteGuard, Connection):  # type: ignore[misc]
    pass


class _SSLConnection(_WriteGuard, SSLConnection):  # type: ignore[misc]
    pass


class _SentinelConnection(_WriteGuard, SentinelManagedConnection):  # type: ignore[misc]
    pass


class _SentinelSSLConnection(_WriteGuard, SentinelManagedSSLConnection):  # type: ignore[misc]
    pass


class _Cluster(RedisCluster):  # type: ignore[misc]
    """RedisCluster has no ``connection_class`` parameter: its nodes get the guarded one here,
    before any node is discovered."""

    def __init__(self, *, ssl: bool, **kwargs: Any) -> None:
        super().__init__(ssl=ssl, **kwargs)
        guarded = _SSLConnection if ssl else _Connection
        self.connection_kwargs["connection_class"] = guarded
        for node in self.nodes_manager.startup_nodes.values():
            node.connection_class = guarded


class _SentinelMaster(aioredis.Redis):  # type: ignore[misc]
    """The master client of a Sentinel set; closing it closes the sentinel clients too."""

    sentinel: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinel is not None:
            await self.sentinel.aclose()


def connect(config: RedisConfig, url: str) -> Redis:
    """Short socket timeouts: a dead Redis must turn into a fast 503, not a hung request."""
    topo = topology.parse(url, os.environ)
    common: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": config.socket_timeout,
        "socket_connect_timeout": config.socket_connect_timeout,
        "health_check_interval": 0,
    }
    if topo.kind == "sentinel":
        sentinel = Sentinel(
            topo.nodes,
            sentinel_kwargs={
                "socket_timeout": config.socket_timeout,
                "socket_connect_timeout": config.socket_connect_timeout,
                "username": topo.sentinel_username,
                "password": topo.sentinel_password,
                "ssl": topo.tls,
            },
        )
        master: _SentinelMaster = sentinel.master_for(
            topo.service,
            redis_class=_SentinelMaster,
            db=topo.db,
            username=topo.username,
            password=topo.password,
            connection_class=_SentinelSSLConnection if topo.tls else _SentinelConnection,
            retry=_retry(),
            max_connections=config.max_connections,
            **common,
        )
        master.sentinel = sentinel
        return cast(Redis, master)
    if topo.kind == "cluster":
        cluster = _Cluster(
            startup_nodes=[ClusterNode(host, port) for host, port in topo.nodes],
            username=topo.username,
            password=topo.password,
            ssl=topo.tls,
            # Orgs on healthy shards keep working while one shard has no master.
            require_full_coverage=False,
            # A dead node's connection: the slot map is read again and the call resent.
            retry=Retry(NoBackoff(), 2),
            max_connections=config.max_connections,
            **common,
        )
        return cast(Redis, cluster)
    if topo.nodes:  # TCP, not a unix socket
        common["connection_class"] = _SSLConnection if topo.tls else _Connection
    client = aioredis.Redis.from_url(
        url, retry=_retry(), max_connections=config.max_connections, **common
    )
    return cast(Redis, client)


def hot_path(config: RedisConfig, url: str) -> PipelinedConnection | None:
    """The pipelined admit/settle connection for this URL; None for a unix socket, where
    admission goes through redis-py. TLS (``rediss``) verifies the server against the system's
    certificates, or the bundle ``SSL_CERT_FILE`` names (as redis-py does)."""
    topo = topology.parse(url, os.environ)
    wait = (
        (config.replicas, int(config.replica_ack_timeout * 1000))
        if config.durability == "replicated"
        else None
    )
    if not topo.tcp:
        if wait is not None:
            raise ValueError(
                'durability = "replicated" needs a TCP URL (redis[s]://, redis[s]+sentinel://, '
                "redis[s]+cluster://): the pipelined hot path issues the WAIT"
            )
        return None
    tls = ssl.create_default_context() if topo.tls else None

    def data_link(host: str, port: int) -> Link:
        return Link(
            host,
            port,
            timeout=config.hot_path_timeout,
            connect_timeout=config.socket_connect_timeout,
            username=topo.username,
            password=topo.password,
            db=topo.db,
            wait=wait,
            tls=tls,
        )

    def control_link(host: str, port: int) -> Link:
        return Link(
            host,
            port,
            timeout=config.socket_timeout,
            connect_timeout=config.socket_connect_timeout,
            username=topo.username,
            password=topo.password,
            tls=tls,
        )

    def sentinel_link(host: str, port: int) -> Link:
        return Link(
            host,
            port,
            timeout=config.socket_timeout,
            connect_timeout=config.socket_connect_timeout,
            username=topo.sentinel_username,
            password=topo.sentinel_password,
            tls=tls,
        )

    router: Router
    if topo.kind == "cluster":
        router = ClusterRouter(topo.nodes, data_link, control_link)
    elif topo.kind == "sentinel":
        router = SentinelRouter(topo.nodes, topo.service, data_link, sentinel_link)
    else:
        router = SingleNode(data_link(*topo.nodes[0]))
    return PipelinedConnection(router, LuaScript.sources)
