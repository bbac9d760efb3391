"""Waiting, at start-up, for a Redis that is not ready yet.

A Redis restarted with data answers ``LOADING`` to every command until its AOF or RDB is read
back (a 16.5 MB AOF takes about 0.4 s); a Redis started beside the proxy (a container, a
service manager) may not accept connections for a moment. A proxy that starts serving then
answers 503 and, worse, skips what start-up must write (the bootstrap admin key). So start-up
waits, for a bounded time, saying what it waits for, and fails loudly if Redis never comes.
"""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import BusyLoadingError, RedisError

from proxy.store.client import Redis

log = logging.getLogger(__name__)

_POLL_SECONDS = 0.05


class StoreNotReady(RuntimeError):
    """Redis did not become usable at start-up; the message says where and why."""


def describe(redis: Redis) -> str:
    """Where a client connects, without credentials (a URL may carry a password)."""
    kwargs = redis.connection_pool.connection_kwargs
    if kwargs.get("path"):
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"


async def wait_until_ready(redis: Redis, within: float) -> None:
    """Returns once Redis answers and has loaded its data; raises ``StoreNotReady`` after
    ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    said = ""
    while True:
        try:
            await redis.ping()
        except BusyLoadingError:
            reason = "loading its data"
        except (RedisError, OSError) as exc:
            reason = f"not answering ({type(exc).__name__}: {exc})"
        else:
            if said:
                log.warning("Redis at %s is ready", describe(redis))
            return
        if loop.time() >= deadline:
            raise StoreNotReady(
                f"Redis at {describe(redis)} was not ready within {within:g} s: {reason}"
            )
        if reason.split(" (")[0] != said:
            said = reason.split(" (")[0]
            log.warning(
                "waiting for Redis at %s: %s (up to %g s, [redis] startup_wait_seconds)",
                describe(redis),
                reason,
                within,
            )
        await asyncio.sleep(_POLL_SECONDS)
