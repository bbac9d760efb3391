"""Admit and settle: the two Redis round trips of every LLM request.

``admit.lua`` decides and reserves atomically (idempotent by request id, so a call retried
after a lost reply reserves once); ``settle.lua`` replaces the reservation with actual usage
exactly once. Settles that cannot reach Redis are spooled to disk and retried
(``deferred_settles``), so neither a Redis outage nor a stop during one loses spend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.config import RoleLimits, UsageConfig
from proxy.gateway import metrics
from proxy.gateway.deferred_settles import DeferredSettles
from proxy.gateway.settle_spool import SettleRequest, SettleSpool
from proxy.store.connection import LuaScript, Redis, org_prefix
from proxy.store.keys import Identity
from proxy.store.pipelined import ConnectionLost, PipelinedConnection, ReplicaTimeout
from proxy.store.windows import Clock, WindowCache, Windows, iso_millis

log = logging.getLogger(__name__)

_LEDGER = ("store/budget_events.lua", "gateway/lease.lua")
ADMIT = LuaScript(*_LEDGER, "gateway/admit.lua")
SETTLE = LuaScript(*_LEDGER, "gateway/settle.lua")
RECLAIM = LuaScript(*_LEDGER, "gateway/reclaim.lua")
MAX_EXACT = 2**53 - 1
"""The largest integer a Lua number (a double) holds exactly: no reservation, usage or limit
past it may reach a script."""
_ADMIT_TIME = metrics.REDIS_TIME.labels("admit")
_SETTLE_TIME = metrics.REDIS_TIME.labels("settle")


# Hot-path records: slots, not frozen (a frozen dataclass's __init__ costs ~6x more).
def budget_scope(field: str) -> str:
    """The API's scope name of a budget field (``k:<kid>:<owner>``, ``o:<owner>``,
    ``u:<hex>:<owner>``, ``ud:<owner>``)."""
    if field.startswith("k:"):
        return "apikey"
    if field.startswith("u:"):
        return "external_user"
    if field.startswith("ud:"):
        return "external_user_default"
    return "org"


@dataclass(slots=True)  # per request: not frozen (a frozen __init__ costs several times more)
class ClampTerms:
    """How far a request's output cap may be lowered, and what its reservation costs then:
    ``cost(output) = ceil((input_cost + output * output_rate) / 1e6)`` in nano-units, the same
    formula that priced the reservation (rates are nano-units per 1M tokens)."""

    choices: int
    cap: int
    """The cap per choice the reservation was made with."""
    lowest: int
    """The lowest cap per choice a clamped request may get (below ``cap``)."""
    input_cost: int
    output_rate: int

    def arg(self) -> str:
        """One script argument, parsed only when a budget is squeezed: the script's numbers
        are doubles, so the products are split where each part stays exact."""
        a_q, a_r = divmod(self.input_cost, 1_000_000)
        r_q, r_r = divmod(self.output_rate, 1_000_000)
        return f"{self.choices} {self.cap} {self.lowest} {a_q} {a_r} {r_q} {r_r}"


# Hot-path records: slots, not frozen (a frozen dataclass's __init__ costs ~6x more).
@dataclass(slots=True)
class Admitted:
    request_limit: int | None
    request_remaining: int
    request_reset_ms: int
    token_limit: int | None
    token_remaining: int
    token_reset_ms: int
    budget_remaining: int | None
    budget_line: int | None
    budget_unit: str
    budget_window: str
    budget_field: str
    clamped_cap: int | None = None
    """The output cap per choice the request was lowered to (None: not clamped)."""
    reserved_tokens: int = 0
    reserved_cost_nano: int = 0


@dataclass(frozen=True)
class RateLimited:
    scope: str  # "key" | "org" | "end_user"
    limit_name: str  # rps, rpm, rph, rpd, tpm, concurrency
    limit: int
    retry_after_ms: int  # -1: unknown, or never for this request
    current: int


@dataclass(frozen=True)
class BudgetRefused:
    field: str  # "k:<kid>:<owner>" | "o:<owner>" | "u:<hex>:<owner>" | "ud:<owner>"
    why: str  # "blocked" | "exceeds"
    window: str
    spent: int
    """Settled spend, plus what is in flight when the worst case does not fit."""
    line: int
    reserved: int = 0
    """What this request would reserve, in the budget's unit."""
    unit: str = "t"  # "c" (nano-units) | "t" (tokens)

    @property
    def scope(self) -> str:
        return budget_scope(self.field)

    @property
    def owner(self) -> str:
        return self.field.rsplit(":", 1)[1]

    @property
    def left(self) -> int:
        return max(self.line - self.spent, 0)


@dataclass(frozen=True)
class Revoked:
    pass


@dataclass(frozen=True)
class EndUserRequired:
    """The org requires every request to name its end user (``X-On-Behalf-Of``)."""


ALREADY_ADMITTED = Admitted(None, 0, 0, None, 0, 0, None, None, "", "", "")
"""A retried admit of a request that already holds its lease: admitted, with no figures for
the headers (the first call's reply, which had them, was lost)."""


Decision = Admitted | RateLimited | BudgetRefused | Revoked | EndUserRequired


def _may_have_run(exc: BaseException) -> bool:
    """Whether a failed script call may still have run: it was sent and its reply never came
    (a timeout, a connection lost after writing, a write no replica acknowledged)."""
    if isinstance(exc, ConnectionLost):
        return exc.written
    return isinstance(exc, RedisTimeoutError | ReplicaTimeout | TimeoutError)


def _optional(value: int) -> int | None:
    return None if value < 0 else value


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
    ) -> None:
        self.redis = redis
        self._usage_policy = (usage or UsageConfig()).lua_policy()
        self._hot = hot_path
        self._defaults = {
            role: [
                str(getattr(limits, name) or "")
                for name in ("rps", "rpm", "rph", "rpd", "tpm", "concurrency")
            ]
            for role, limits in role_defaults.items()
        }
        self._lease_ms = int(lease_seconds * 1000)
        self.clock = clock
        self._windows = WindowCache()
        self.deferred = DeferredSettles(self._settle_now, spool)

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
        windows = self._windows.current(now)
        defaults = self._defaults.get(identity.role) or [""] * 6
        started = time.perf_counter()
        try:
            result = await self._run(
                ADMIT,
                [org_prefix(identity.org_id)],
                [
                    int(now * 1000),
                    request_id,
                    identity.key_id,
                    reserve_tokens,
                    reserve_cost_nano,
                    self._lease_ms,
                    windows.daily,
                    windows.weekly,
                    windows.monthly,
                    *defaults,
                    *windows.ttls(now),
                    iso_millis(now),
                    prompt_tokens,
                    model,
                    endpoint,
                    end_user or "",
                    end_user_tag,
                    ("d" if dry_run else "") + ("c" if clamp_asked else ""),
                    clamp.arg() if clamp is not None else "",
                    self._usage_policy,
                ],
            )
        except (RedisError, OSError) as exc:
            if _may_have_run(exc):
                await self.release(identity, request_id, model, endpoint)
            raise
        _ADMIT_TIME.observe(time.perf_counter() - started)
        kind = result[0]
        if kind == "ok":
            return Admitted(
                request_limit=_optional(int(result[1])),
                request_remaining=int(result[2]),
                request_reset_ms=int(result[3]),
                token_limit=_optional(int(result[4])),
                token_remaining=int(result[5]),
                token_reset_ms=int(result[6]),
                budget_remaining=int(result[7]) if result[7] else None,
                budget_line=int(result[8]) if result[8] else None,
                budget_unit=result[9],
                budget_window=result[10],
                budget_field=result[11],
                clamped_cap=int(result[12]) if result[12] != "" else None,
                reserved_tokens=int(result[13]) if result[13] != "" else reserve_tokens,
                reserved_cost_nano=int(result[14]) if result[14] != "" else reserve_cost_nano,
            )
        if kind == "dup":
            return ALREADY_ADMITTED
        if kind == "rate":
            return RateLimited(
                scope=result[1],
                limit_name=result[2],
                limit=int(result[3]),
                retry_after_ms=int(result[4]),
                current=int(result[5]),
            )
        if kind == "budget":
            return BudgetRefused(
                field=result[1],
                why=result[2],
                window=result[3],
                spent=int(result[4]),
                line=int(result[5]),
                reserved=int(result[6]),
                unit=result[7],
            )
        if kind == "need_user":
            return EndUserRequired()
        if kind == "invalid":
            raise ValueError(f"admit refused argument {result[1]}")
        return Revoked()

    async def release(self, identity: Identity, request_id: str, model: str, endpoint: str) -> None:
        """Gives back a reservation that was (or may have been) made for a request that was
        not forwarded: a settle of nothing, spooled like any settle if Redis is away. Without
        it, an admit whose reply was lost would hold its reservation until the lease expired,
        and then be charged all of it."""
        record: dict[str, str | int | None] = {
            "rid": request_id,
            "kid": identity.key_id,
            "model": model,
            "endpoint": endpoint,
            "in": 0,
            "out": 0,
            "cost_nano": 0,
            "reported": 0,
            "status": 0,
            "released": 1,
        }
        await self.settle(self.settle_request(identity, request_id, 0, 0, record))

    async def _run(self, script: LuaScript, keys: list[str], args: list[Any]) -> Any:
        if self._hot is None:
            return await script(self.redis, keys, args)
        try:
            return await self._hot.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            await script.load(self.redis)
            return await self._hot.execute("EVALSHA", script.sha, len(keys), *keys, *args)

    def close(self) -> None:
        if self._hot is not None:
            self._hot.close()

    def windows(self, now: float) -> Windows:
        return self._windows.current(now)

    async def renew(self, org_id: str, request_id: str) -> None:
        expiry = int(self.clock() * 1000) + self._lease_ms
        await self.redis.zadd(org_prefix(org_id) + "leases", {request_id: expiry}, xx=True)

    def keep_alive(self, org_id: str, request_id: str) -> LeaseKeeper:
        return LeaseKeeper(self, org_id, request_id, self._lease_ms / 3000)

    def settle_request(
        self,
        identity: Identity,
        request_id: str,
        tokens: int,
        cost_nano: int,
        record: dict[str, str | int | None],
    ) -> SettleRequest:
        return SettleRequest(
            org_id=identity.org_id,
            request_id=request_id,
            key_id=identity.key_id,
            tokens=tokens,
            cost_nano=cost_nano,
            at=self.clock(),
            usage_record=[
                item
                for name, value in record.items()
                for item in (name, "" if value is None else value)
            ],
        )

    async def settle(self, req: SettleRequest) -> int:
        """Returns the number of budget events recorded. A settle Redis does not take is
        spooled to disk before this returns, and retried."""
        try:
            return await self._settle_now(req)
        except (RedisError, OSError) as exc:
            await self.deferred.add(req, exc)
            return 0

    async def _settle_now(self, req: SettleRequest) -> int:
        """Spend goes to the windows (and usage buckets) of the moment the request ended, also
        when replayed later; only their expiry is reckoned from now."""
        now = self.clock()
        windows = self._windows.current(req.at)
        usage = _usage_args(req)
        started = time.perf_counter()
        result = await self._run(
            SETTLE,
            [org_prefix(req.org_id)],
            [
                int(req.at * 1000),
                req.request_id,
                req.key_id,
                req.tokens,
                req.cost_nano,
                windows.daily,
                windows.weekly,
                windows.monthly,
                *windows.ttls(now),
                iso_millis(req.at),
                *usage,
                self._usage_policy,
                int(now * 1000),
                *req.usage_record,
            ],
        )
        _SETTLE_TIME.observe(time.perf_counter() - started)
        return max(int(result), 0)

    async def reclaim(self, org_id: str, limit: int = 100) -> tuple[int, int, int]:
        """One org's expired leases (the sweeper's pass): (reclaimed, set aside now, set
        aside in all)."""
        now = self.clock()
        windows = self._windows.current(now)
        result = await RECLAIM(
            self.redis,
            [org_prefix(org_id)],
            [
                int(now * 1000),
                windows.daily,
                windows.weekly,
                windows.monthly,
                *windows.ttls(now),
                iso_millis(now),
                limit,
                self._usage_policy,
            ],
        )
        return int(result[0]), int(result[1]), int(result[2])

    async def drain(self, grace: float) -> None:
        """At shutdown: give deferred settles a last chance (the spool keeps the rest)."""
        await self.deferred.drain(grace)


def _usage_args(req: SettleRequest) -> tuple[int, int, int, str | int, str | int, str | int]:
    """What the usage counters need, taken from the usage record (which spooled settles
    written by earlier versions carry too): input, cached input and output tokens, model,
    endpoint, end user. Input + output is the settle's token count, also for a record that
    does not split it."""
    record = dict(zip(req.usage_record[::2], req.usage_record[1::2], strict=False))
    out = _count(record.get("out"))
    cached = _count(record.get("cached"))
    given = record.get("in")
    tokens_in = _count(given) if given is not None else max(req.tokens - out, 0)
    return (
        tokens_in,
        cached,
        out,
        record.get("usage_model") or record.get("model", ""),  # a pattern's, when matched
        record.get("endpoint", ""),
        record.get("user", ""),
    )


def _count(value: str | int | None) -> int:
    if isinstance(value, int):
        return value
    return int(value) if value and value.isdigit() else 0


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
