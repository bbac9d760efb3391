"""The checks ``/readyz`` makes beyond "Redis answers": that a call would not fail anyway.

A Redis at ``maxmemory`` (``noeviction``) answers ``PING`` and ``SCRIPT EXISTS`` but refuses
every admit and settle with ``OOM``; a spool on a full or read-only disk is only found out
when an outage needs it. Each check here costs one small write: one ``SET`` with a short
expiry, and one probe file written, fsynced and removed (in a thread). ``/readyz`` is asked
every few seconds by a load balancer, never per request.
"""

from __future__ import annotations

import asyncio
import os

from redis.exceptions import OutOfMemoryError, RedisError, ResponseError

from proxy.gateway.settle_spool import SettleSpool, SpoolUnwritable
from proxy.store.client import Redis

PROBE_KEY = "llm-proxy:readyz"
"""Outside every org's key space; it expires on its own."""


async def refuses_writes(redis: Redis) -> str | None:
    """Why Redis would refuse an admit or settle now, or None when it takes writes."""
    try:
        await redis.set(PROBE_KEY, str(os.getpid()), px=10_000)
    except OutOfMemoryError:
        return "refuses writes: OOM (maxmemory reached)"
    except ResponseError as exc:
        return f"refuses writes: {type(exc).__name__}"
    except (RedisError, OSError) as exc:
        return f"unreachable: {type(exc).__name__}"
    return None


async def spool_fault(spool: SettleSpool) -> str | None:
    """Why the spool could not hold a settle now, or None."""
    try:
        await asyncio.to_thread(spool.check)
    except SpoolUnwritable as exc:
        return f"unwritable: {os.strerror(exc.errno) if exc.errno else 'cannot write'}"
    return None
