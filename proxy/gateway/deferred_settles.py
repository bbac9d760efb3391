"""Retrying the settles Redis did not take, one item at a time.

While Redis is away every settle fails the same way, so nothing is counted against any one of
them: the queue waits (with back-off) and replays them all when Redis answers again. A settle
that fails while Redis answers is a different matter — the script refused that item — so it
is retried on its own schedule and, after a few attempts, quarantined (kept on disk, counted,
logged) instead of blocking the settles behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from redis.exceptions import (
    BusyLoadingError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.gateway import metrics
from proxy.gateway.settle_spool import SettleRequest, SettleSpool, SpoolWriteError

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5
"""Refusals by a Redis that answers, before an item is quarantined."""
_FIRST_DELAY, _STORE_DELAY_MAX, _ITEM_DELAY_MAX = 0.05, 2.0, 30.0
# Replies that mean "the store cannot take writes right now", not "this item is bad".
_STORE_STATES = (
    "READONLY",
    "OOM",
    "LOADING",
    "MASTERDOWN",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "NOREPLICAS",
    "BUSY",
    "MOVED",
    "ASK",
)


def store_unavailable(exc: BaseException) -> bool:
    """Whether a failure is Redis being away (retry everything later) rather than this item."""
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
        return True
    # redis-py turns some of these replies into their own classes and drops the prefix
    # ("OOM command not allowed..." arrives as "command not allowed..."): match the class.
    if isinstance(exc, OutOfMemoryError | ReadOnlyError | BusyLoadingError):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(_STORE_STATES)


@dataclass(slots=True)
class _Pending:
    req: SettleRequest
    attempts: int
    next_at: float


class DeferredSettles:
    def __init__(
        self,
        write: Callable[[SettleRequest], Awaitable[object]],
        spool: SettleSpool,
    ) -> None:
        self._write = write
        self.spool = spool
        self._items: dict[str, _Pending] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False

    def __len__(self) -> int:
        return len(self._items)

    async def add(self, req: SettleRequest, error: BaseException) -> None:
        """Kept on disk before this returns: from here on the usage survives the process.
        When the disk refuses it, the settle is still retried from memory (the upstream has
        answered; failing the client would not unspend it), but that is said: counted in
        ``llm_proxy_settles_unspooled_total``, logged as an error, and ``/readyz`` reports the
        spool until an append succeeds again."""
        try:
            await self.spool.keep(req)
        except SpoolWriteError as disk:
            metrics.SETTLES_UNSPOOLED.inc()
            log.error(
                "settle of %s deferred (%s) but NOT kept on disk (%s): held in memory only, "
                "lost if this process stops before Redis takes it",
                req.request_id,
                error,
                disk,
            )
        else:
            log.warning(
                "settle of %s deferred (%s); kept in %s", req.request_id, error, self.spool.path
            )
        self._queue([req])

    async def adopt_orphans(self) -> int:
        """Settles left on disk by processes that are gone (see ``SettleSpool.adopt``)."""
        adopted = await self.spool.adopt()
        # Replayed before this returns: the sweeper that adopted them sweeps next, and a lease
        # whose usage is on disk is settled at that usage, not reclaimed at its reservation.
        for index, req in enumerate(adopted):
            try:
                await self._write(req)
            except (RedisError, OSError):
                self._queue(adopted[index:])  # retried (or quarantined) on the usual schedule
                break
            await self.spool.done(req.request_id)
        else:
            if adopted and not self._items:
                await self.spool.empty()
        return len(adopted)

    def _queue(self, reqs: list[SettleRequest]) -> None:
        if not reqs:
            return
        now = time.monotonic()
        for req in reqs:
            self._items.setdefault(req.request_id, _Pending(req, 0, now + _FIRST_DELAY))
        metrics.SETTLES_PENDING.set(len(self._items))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        self._wake.set()

    async def _run(self) -> None:
        store_delay = _FIRST_DELAY
        while self._items and not self._stopping:
            now = time.monotonic()
            due = sorted(
                (p for p in self._items.values() if p.next_at <= now), key=lambda p: p.next_at
            )
            if not due:
                self._wake.clear()
                wait = min(p.next_at for p in self._items.values()) - now
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                continue
            for pending in due:
                if self._stopping:
                    break
                try:
                    await self._write(pending.req)
                except (RedisError, OSError) as exc:
                    if store_unavailable(exc):
                        store_delay = min(store_delay * 2, _STORE_DELAY_MAX)
                        later = time.monotonic() + store_delay
                        for other in self._items.values():
                            other.next_at = max(other.next_at, later)
                        break
                    await self._refused(pending, exc)
                    continue
                store_delay = _FIRST_DELAY
                del self._items[pending.req.request_id]
                await self.spool.done(pending.req.request_id)
                metrics.SETTLES_PENDING.set(len(self._items))
        if not self._items:
            await self.spool.empty()

    async def _refused(self, pending: _Pending, exc: BaseException) -> None:
        pending.attempts += 1
        rid = pending.req.request_id
        if pending.attempts < MAX_ATTEMPTS:
            pending.next_at = time.monotonic() + min(
                _FIRST_DELAY * 2**pending.attempts, _ITEM_DELAY_MAX
            )
            log.warning("settle of %s refused (attempt %d): %s", rid, pending.attempts, exc)
            return
        try:
            path = await self.spool.quarantine(pending.req, str(exc))
        except OSError as disk:
            # Kept, and retried at the slowest pace: losing it would under-charge, and a
            # dead retry task would strand every settle behind it.
            pending.next_at = time.monotonic() + _ITEM_DELAY_MAX
            metrics.SETTLES_UNSPOOLED.inc()
            log.error(
                "settle of %s refused %d times (%s) and could not be set aside (%s): held in "
                "memory and retried",
                rid,
                pending.attempts,
                exc,
                disk,
            )
            return
        del self._items[rid]
        metrics.SETTLES_QUARANTINED.inc()
        metrics.SETTLES_PENDING.set(len(self._items))
        log.error(
            "settle of %s quarantined after %d refusals (%s); kept in %s for an operator",
            rid,
            pending.attempts,
            exc,
            path,
        )

    async def drain(self, grace: float) -> None:
        """At shutdown: a last chance to write them; what remains stays in the spool."""
        if self._task is not None and not self._task.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task), grace)
        if self._items:
            log.error(
                "stopping with %d unsettled request(s) kept in %s: they are replayed by the "
                "next proxy process to start on this spool directory",
                len(self._items),
                self.spool.path,
            )
        # A flag as well as cancel(): redis-py can swallow a cancellation (see lease_sweeper).
        self._stopping = True
        self._wake.set()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait([self._task], timeout=5)
        self.spool.close()
