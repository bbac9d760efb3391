"""The lease sweeper: nothing a dead proxy reserved stays held, with or without traffic.

Admission reclaims expired leases of its own org on the way (bounded per call), but an org
whose only traffic came through a proxy that died would keep that proxy's reservations and
concurrency slots until its next request. Every proxy process runs this loop; one of them at a
time (a short Redis lock) walks every org and reclaims what has expired — releasing it and
charging its whole reservation (``ledger/lua/reclaims.lua``). The same tick adopts settle spool
files left by processes that are gone, so their usage is replayed without waiting for a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator

from aiohttp import web
from redis.exceptions import RedisError

from proxy.gateway import metrics
from proxy.gateway.state import GATEWAY, Gateway
from proxy.ledger.keys import ORGS_KEY, SWEEPER_LOCK, org_key

log = logging.getLogger(__name__)

LOCK_KEY = SWEEPER_LOCK
_SCAN_BATCH = 200


async def sweep_once(gw: Gateway) -> tuple[int, int]:
    """Reclaims every org's expired leases; returns (reclaimed, set aside in all).

    Orgs are checked in pipelined batches with two plain reads each (an expired lease? records
    set aside?); only an org with something expired costs a script call."""
    reclaimed = set_aside_total = 0
    batch: list[str] = []
    async for org_id in _orgs(gw):
        batch.append(org_id)
        if len(batch) == _SCAN_BATCH:
            done, aside = await _sweep_batch(gw, batch)
            reclaimed, set_aside_total = reclaimed + done, set_aside_total + aside
            batch = []
    if batch:
        done, aside = await _sweep_batch(gw, batch)
        reclaimed, set_aside_total = reclaimed + done, set_aside_total + aside
    metrics.LEASES_SET_ASIDE.set(set_aside_total)
    return reclaimed, set_aside_total


async def _sweep_batch(gw: Gateway, orgs: list[str]) -> tuple[int, int]:
    now_ms = int(gw.clock() * 1000)
    pipe = gw.redis.pipeline(transaction=False)
    for org_id in orgs:
        pipe.zrangebyscore(org_key(org_id, "leases"), "-inf", now_ms, start=0, num=1)
        pipe.zcard(org_key(org_id, "stuck"))
    answers = await pipe.execute()
    reclaimed = set_aside_total = 0
    for index, org_id in enumerate(orgs):
        expired, aside = answers[2 * index], int(answers[2 * index + 1])
        if expired:
            done, aside_now, aside = await gw.admission.reclaim(org_id)
            reclaimed += done
            _report(org_id, done, aside_now)
        set_aside_total += aside
    return reclaimed, set_aside_total


def _report(org_id: str, reclaimed: int, set_aside: int) -> None:
    if reclaimed:
        metrics.LEASES_RECLAIMED.inc(reclaimed)
        log.warning(
            "reclaimed %d expired lease(s) of org %s (their proxy stopped renewing them); "
            "each was charged its reservation",
            reclaimed,
            org_id,
        )
    if set_aside:
        log.error(
            "set aside %d unreadable lease record(s) of org %s (bp:{o:%s}:leases:stuck)",
            set_aside,
            org_id,
            org_id,
        )


async def _orgs(gw: Gateway) -> AsyncIterator[str]:
    cursor = 0
    while True:
        cursor, batch = await gw.redis.sscan(ORGS_KEY, cursor, count=_SCAN_BATCH)
        for org_id in batch:
            yield org_id
        if cursor == 0:
            return


async def _take_turn(gw: Gateway, token: str, interval: float) -> bool:
    """At most one sweeper per round across all processes: the others find the lock taken."""
    taken = await gw.redis.set(LOCK_KEY, token, nx=True, px=max(int(interval * 900), 100))
    return bool(taken)


async def run(gw: Gateway, interval: float, stop: asyncio.Event) -> None:
    token = secrets.token_hex(8)
    while not stop.is_set():
        try:
            await gw.admission.deferred.adopt_orphans()
            if await _take_turn(gw, token, interval):
                await sweep_once(gw)
        except (RedisError, OSError) as exc:
            log.debug("lease sweep skipped: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


async def sweeper_ctx(app: web.Application) -> AsyncIterator[None]:
    """A flag, not only ``cancel()``, ends the loop: redis-py (8.1, Python 3.11) can swallow
    a cancellation that lands while a command completes."""
    gw = app[GATEWAY]
    stop = asyncio.Event()
    task = asyncio.create_task(run(gw, gw.settings.limits.sweep_interval(), stop))
    yield
    stop.set()
    task.cancel()
    await asyncio.wait([task], timeout=5)
