"""Admit and settle: the two Redis round trips of every LLM request.

``ADMIT`` decides and reserves atomically (idempotent by request id, so a call retried after a
lost reply reserves once); ``SETTLE`` replaces the reservation with actual usage exactly once
(``proxy.ledger.scripts``; their arguments are ``proxy.ledger.args``'s). Settles that cannot
reach Redis are spooled to disk and retried (``deferred_settles``), so neither a Redis outage
nor a stop during one loses spend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.config import RoleLimits, UsageConfig
from proxy.gateway import metrics
from proxy.gateway.deferred_settles import DeferredSettles
from proxy.gateway.settle_spool import SettleRequest, SettleSpool
from proxy.ledger.api_keys import Identity
from proxy.ledger.args import (
    NO_LIMITS,
    AdmitArgs,
    ClampTerms,
    ReclaimArgs,
    SettleArgs,
    settle_batch_argv,
)
from proxy.ledger.keys import org_key
from proxy.ledger.outcomes import (
    ALREADY_ADMITTED,
    Admitted,
    BudgetRefused,
    Decision,
    EndUserRequired,
    EndUsersCapped,
    RateLimited,
    Revoked,
    decision_of,
)
from proxy.ledger.records import UsageRecord
from proxy.ledger.scripts import ADMIT, RECLAIM, SETTLE, SETTLE_BATCH
from proxy.ledger.settle_batches import SettleBatcher
from proxy.ledger.windows import Clock, WindowCache, Windows
from proxy.store.client import Redis
from proxy.store.pipelined import ConnectionLost, PipelinedConnection, ReplicaTimeout

__all__ = [
    "ALREADY_ADMITTED",
    "Admission",
    "Admitted",
    "BudgetRefused",
    "ClampTerms",
    "Decision",
    "EndUserRequired",
    "EndUsersCapped",
    "LeaseKeeper",
    "RateLimited",
    "Revoked",
]

log = logging.getLogger(__name__)

MAX_EXACT = 2**53 - 1
"""The largest integer a Lua number (a double) holds exactly: no reservation, usage or limit
past it may reach a script."""
_ADMIT_TIME = metrics.REDIS_TIME.labels("admit")
_SETTLE_TIME = metrics.REDIS_TIME.labels("settle")


def _may_have_run(exc: BaseException) -> bool:
    """Whether a failed script call may still have run: it was sent and its reply never came
    (a timeout, a connection lost after writing, a write no replica acknowledged)."""
    if isinstance(exc, ConnectionLost):
        return exc.written
    return isinstance(exc, RedisTimeoutError | ReplicaTimeout | TimeoutError)


class Admission:
    def __init__(
        self,
        redis: Redis,
        role_defaults: Mapping[Any, RoleLimits],
        lease_seconds: float,
        clock: Clock,
        spool: SettleSpool,
        hot_path: PipelinedConnection | None = None,
        usage: UsageConfig | None = None,
        end_user_cap: int = 0,
        batch_settles: bool = False,
    ) -> None:
        self.redis = redis
        self._end_user_cap = end_user_cap
        self._usage_policy = (usage or UsageConfig()).lua_policy()
        self._hot = hot_path
        self._defaults = {
            role: tuple(
                str(getattr(limits, name) or "")
                for name in ("rps", "rpm", "rph", "rpd", "tpm", "concurrency")
            )
            for role, limits in role_defaults.items()
        }
        self._lease_ms = int(lease_seconds * 1000)
        self.clock = clock
        self._windows = WindowCache()
        self.deferred = DeferredSettles(self._settle_now, spool)
        self.batches = SettleBatcher(self._settle_now, self.settle_batch) if batch_settles else None

    async def admit(
        self,
        identity: Identity,
        request_id: str,
        reserve_tokens: int,
        reserve_cost_nano: int,
        *,
        prompt_tokens: int = 0,
        model: str = "",
        endpoint: str = "",
        end_user: str | None = None,
        end_user_tag: str = "",
        clamp: ClampTerms | None = None,
        clamp_asked: bool = False,
        dry_run: bool = False,
    ) -> Decision:
        """The lease records the request's model, endpoint and end user so that a lease
        reclaimed from a dead proxy is charged and reported like any other request.

        ``clamp`` says how the output cap may be lowered where a budget allows it (or the
        request asks, ``clamp_asked``). ``dry_run`` decides exactly as a real admission on the
        same state would, and reserves nothing (expired leases are reclaimed all the same)."""
        for value in (reserve_tokens, reserve_cost_nano, prompt_tokens):
            if not 0 <= value <= MAX_EXACT:
                raise ValueError(f"reservation out of the exact range: {value}")
        now = self.clock()
        args = AdmitArgs(
            org_id=identity.org_id,
            now=now,
            request_id=request_id,
            key_id=identity.key_id,
            reserve_tokens=reserve_tokens,
            reserve_cost_nano=reserve_cost_nano,
            lease_ms=self._lease_ms,
            windows=self._windows.current(now),
            role_limits=self._defaults.get(identity.role) or NO_LIMITS,
            usage_policy=self._usage_policy,
            prompt_tokens=prompt_tokens,
            model=model,
            endpoint=endpoint,
            end_user=end_user or "",
            end_user_tag=end_user_tag,
            clamp=clamp,
            clamp_asked=clamp_asked,
            dry_run=dry_run,
            end_user_cap=self._end_user_cap,
        )
        started = time.perf_counter()
        try:
            result = await ADMIT.run(self.redis, args.keys(), args.argv(), self._hot)
        except (RedisError, OSError) as exc:
            if _may_have_run(exc):
                await self.release(identity, request_id, model, endpoint)
            raise
        _ADMIT_TIME.observe(time.perf_counter() - started)
        return decision_of(result, reserve_tokens, reserve_cost_nano)

    async def release(self, identity: Identity, request_id: str, model: str, endpoint: str) -> None:
        """Gives back a reservation that was (or may have been) made for a request that was
        not forwarded: a settle of nothing, spooled like any settle if Redis is away. Without
        it, an admit whose reply was lost would hold its reservation until the lease expired,
        and then be charged all of it."""
        record = UsageRecord(
            rid=request_id, kid=identity.key_id, model=model, endpoint=endpoint, released=True
        )
        await self.settle(self.settle_request(identity, request_id, 0, 0, record))

    def close(self) -> None:
        if self._hot is not None:
            self._hot.close()

    def windows(self, now: float) -> Windows:
        return self._windows.current(now)

    async def renew(self, org_id: str, request_id: str) -> None:
        expiry = int(self.clock() * 1000) + self._lease_ms
        await self.redis.zadd(org_key(org_id, "leases"), {request_id: expiry}, xx=True)

    def keep_alive(self, org_id: str, request_id: str) -> LeaseKeeper:
        return LeaseKeeper(self, org_id, request_id, self._lease_ms / 3000)

    def settle_request(
        self,
        identity: Identity,
        request_id: str,
        tokens: int,
        cost_nano: int,
        record: UsageRecord | Mapping[str, str | int | None],
    ) -> SettleRequest:
        """A settle as the spool keeps it: ``record`` (a ``UsageRecord``; a mapping of stream
        fields is taken as it is) becomes the usage stream entry's pairs."""
        if isinstance(record, UsageRecord):
            pairs = record.pairs()
        else:
            pairs = [
                item
                for name, value in record.items()
                for item in (name, "" if value is None else value)
            ]
        return SettleRequest(
            org_id=identity.org_id,
            request_id=request_id,
            key_id=identity.key_id,
            tokens=tokens,
            cost_nano=cost_nano,
            at=self.clock(),
            usage_record=pairs,
        )

    async def settle(self, req: SettleRequest) -> int:
        """Returns the number of budget events recorded. A settle Redis does not take is
        spooled to disk before this returns, and retried."""
        try:
            if self.batches is not None:
                return await self.batches.settle(req)
            return await self._settle_now(req)
        except (RedisError, OSError) as exc:
            await self.deferred.add(req, exc)
            return 0

    async def _settle_now(self, req: SettleRequest) -> int:
        """Spend goes to the windows (and usage buckets) of the moment the request ended, also
        when replayed later; only their expiry is reckoned from now."""
        args = self._settle_args(req)
        started = time.perf_counter()
        result = await SETTLE.run(self.redis, args.keys(), args.argv(), self._hot)
        _SETTLE_TIME.observe(time.perf_counter() - started)
        return max(int(result), 0)

    async def settle_batch(self, org_id: str, reqs: list[SettleRequest]) -> list[int | str | bytes]:
        """One call for many settles of one org (``lua/settle_batch.lua``): per item, what
        ``_settle_now`` returns, or the message of an item Redis refused. Raises what the call
        raised; the batch may then have landed, and is safe to send again."""
        items = [self._settle_args(req) for req in reqs]
        started = time.perf_counter()
        results = await SETTLE_BATCH.run(
            self.redis, items[0].keys(), settle_batch_argv(items), self._hot
        )
        _SETTLE_TIME.observe(time.perf_counter() - started)
        return [max(r, 0) if isinstance(r, int) else r for r in results]

    def _settle_args(self, req: SettleRequest) -> SettleArgs:
        return SettleArgs(
            org_id=req.org_id,
            at=req.at,
            now=self.clock(),
            request_id=req.request_id,
            key_id=req.key_id,
            tokens=req.tokens,
            cost_nano=req.cost_nano,
            windows=self._windows.current(req.at),
            record=req.usage_record,
            usage_policy=self._usage_policy,
        )

    async def reclaim(self, org_id: str, limit: int = 100) -> tuple[int, int, int]:
        """One org's expired leases (the sweeper's pass): (reclaimed, set aside now, set
        aside in all)."""
        now = self.clock()
        args = ReclaimArgs(org_id, now, self._windows.current(now), limit, self._usage_policy)
        result = await RECLAIM.run(self.redis, args.keys(), args.argv())
        return int(result[0]), int(result[1]), int(result[2])

    async def drain(self, grace: float) -> None:
        """At shutdown: give deferred settles a last chance (the spool keeps the rest)."""
        if self.batches is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.batches.wait_idle(), grace)
        await self.deferred.drain(grace)


class LeaseKeeper:
    """Pushes a live request's lease expiry forward every third of its life, so only a dead
    proxy's reservations are ever reclaimed — however long a request or a silent stream runs.
    A timer, not a task: the common short request pays only for scheduling and cancelling it."""

    def __init__(self, admission: Admission, org_id: str, request_id: str, every: float) -> None:
        self._admission = admission
        self._org_id = org_id
        self._request_id = request_id
        self._every = every
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(every, self._fire)
        self._renewing: asyncio.Future[None] | None = None

    def _fire(self) -> None:
        self._renewing = asyncio.ensure_future(self._renew())
        self._handle = self._loop.call_later(self._every, self._fire)

    async def _renew(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._admission.renew(self._org_id, self._request_id)

    def cancel(self) -> None:
        self._handle.cancel()
