"""What a Redis server says about itself, in the words an operator needs.

The proxy runs on Redis 6.2 (the bundled binary), 7.x and Valkey alike, and people start it on
whichever ``redis-server`` they have: so the start-up log names the server and version that
actually runs. With ``durability = "replicated"`` every admission waits (``WAIT``) for a replica;
a replica that is attached but has not finished its first sync acknowledges nothing (Redis 7's
diskless sync waits 5 s by default before it even starts), so readiness and refusals say that
this is what is missing, rather than a bare "store unavailable".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis
from redis.asyncio.cluster import RedisCluster

from proxy.store.client import Redis
from proxy.store.pipelined import ReplicaTimeout

__all__ = [
    "Shortfall",
    "replication_shortfall",
    "running_version",
    "server_version",
    "unavailable_reason",
]


def server_version(info: Mapping[str, Any]) -> str:
    """``INFO server`` as ``Redis 7.0.15`` or ``Valkey 9.1.2``: Valkey reports, as
    ``redis_version``, the Redis version it is compatible with, not its own."""
    if "valkey_version" in info:
        return f"Valkey {info['valkey_version']}"
    return f"Redis {info.get('redis_version', '(unknown version)')}"


def running_version(url: str) -> str:
    """The version of the server answering at ``url`` (a local, just-started one)."""
    try:
        with redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2) as client:
            info: Mapping[str, Any] = client.info("server")
    except redis.RedisError as exc:
        return f"(version unknown: {type(exc).__name__})"
    return server_version(info)


def _in_sync(info: Mapping[str, Any]) -> int:
    """Replicas past their first sync (``state=online``); ``wait_bgsave`` / ``send_bulk`` ones
    are connected but acknowledge nothing yet."""
    count = int(info.get("connected_slaves", 0))
    online = 0
    for index in range(count):
        replica = info.get(f"slave{index}")
        if isinstance(replica, Mapping) and replica.get("state") == "online":
            online += 1
    return online


@dataclass(frozen=True)
class Shortfall:
    """Masters whose replicas cannot acknowledge a ``WAIT`` yet. ``everywhere``: all of them
    (nothing can be admitted); on a cluster, orgs on the other shards are still served."""

    detail: str
    everywhere: bool


async def replication_shortfall(client: Redis, needed: int) -> Shortfall | None:
    """Why ``WAIT`` for ``needed`` replicas cannot succeed now, or None if it can.

    One ``INFO replication`` on the master (on a cluster, on every master): a readiness probe's
    cost, never a request's."""
    if isinstance(client, RedisCluster):
        replies = await client.info("replication", target_nodes=RedisCluster.PRIMARIES)
        per_node: Mapping[str, Any] = replies if "role" not in replies else {"master": replies}
    else:
        per_node = {"master": await client.info("replication")}
    short = [
        f"{_in_sync(info)} of {needed} replica(s) in sync"
        + ("" if name == "master" else f" on {name}")
        for name, info in sorted(per_node.items())
        if _in_sync(info) < needed
    ]
    if not short:
        return None
    detail = "; ".join(short) + (
        f' (durability = "replicated" admits nothing there until {needed} replica(s) have '
        "finished their first sync)"
    )
    return Shortfall(detail, everywhere=len(short) == len(per_node))


def unavailable_reason(exc: BaseException) -> str | None:
    """The refusal's wording when Redis answered but no replica confirmed the write."""
    if isinstance(exc, ReplicaTimeout):
        return (
            f'could not confirm the reservation on a replica ({exc}; durability = "replicated"); '
            "a replica may still be syncing"
        )
    return None
