"""The ledger without HTTP: an ``Admission`` on a real Redis, an injected clock, and a reader of
the books it writes.

The script tests (``test_ledger_scripts.py``) and the state-machine test
(``test_ledger_state_machine.py``) know the proxy's internals only through this module: every
import of ``proxy`` and every Redis key name they read is here, so a move of the ledger's
modules or a rename of its keys is one edit in one file.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from proxy.admin.budget_shapes import BudgetInput
from proxy.config import RedisConfig
from proxy.gateway.settle_spool import SettleRequest, SettleSpool
from proxy.ledger.admission import Admission
from proxy.ledger.api_keys import Identity, KeyCreate, KeyStore, Limits
from proxy.ledger.args import ClampTerms
from proxy.ledger.budgets import BudgetStore
from proxy.ledger.end_users import EndUserPolicies, EndUserPolicy
from proxy.ledger.keys import end_user_tag, org_prefix
from proxy.ledger.outcomes import (
    ALREADY_ADMITTED,
    Admitted,
    BudgetRefused,
    Decision,
    EndUserRequired,
    RateLimited,
    Revoked,
)
from proxy.ledger.usage import parse_bucket
from proxy.ledger.windows import Period, windows_at
from proxy.store.connection import connect

__all__ = [
    "ALREADY_ADMITTED",
    "Admitted",
    "Books",
    "BudgetRefused",
    "ClampTerms",
    "Decision",
    "EndUserRequired",
    "Ledger",
    "Period",
    "RateLimited",
    "Revoked",
    "Scope",
    "Usage",
    "end_user_tag",
    "open_client",
    "open_ledger",
    "spend_windows",
]

ORG = "acme"
NANO = 1_000_000_000
Scope = Literal["apikey", "org", "external_user", "external_user_default"]


class Clock:
    """Injected time in whole seconds, so ``int(now * 1000)`` is exact and lease expiry is
    reproducible to the millisecond."""

    def __init__(self, start: int) -> None:
        self.now = start

    def __call__(self) -> float:
        return float(self.now)

    def advance(self, seconds: int) -> None:
        self.now += seconds


class _SpoolThatFails(SettleSpool):
    """A settle the script refused would be spooled and retried in the background, and the
    test would see only missing spend. Here it fails the test at once, the script's error
    attached as the cause."""

    async def keep(self, req: SettleRequest) -> None:
        raise AssertionError(f"settle of {req.request_id} was refused by Redis")


def usage_record(
    rid: str, kid: str, tokens: int, cost: int, inp: int, user: str | None
) -> dict[str, str | int | None]:
    """What the proxy passes to settle for one request (the usage counters read in, out,
    model, endpoint and user from it)."""
    return {
        "rid": rid,
        "kid": kid,
        "model": "gpt-test",
        "endpoint": "chat/completions",
        "user": user,
        "in": inp,
        "out": tokens - inp,
        "cached": 0,
        "cost_nano": cost,
        "reported": 1,
        "status": 200,
    }


@dataclass(frozen=True)
class Usage:
    """Totals of the usage counters over every bucket of one width."""

    requests: int = 0
    input: int = 0
    cached: int = 0
    output: int = 0
    cost: int = 0


@dataclass
class Books:
    """Everything an org's ledger holds, read in one pass. Zero entries are left out: a spend
    window or counter holding nothing is the same books as none."""

    spend: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    """(tag, window id) -> (cost nano, tokens)."""
    inflight: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    """tag -> (leases, cost nano, tokens)."""
    leases: dict[str, int] = field(default_factory=dict)
    """request id -> expiry (ms)."""
    lease_sums: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    """What the lease records themselves add up to per tag (to check ``inflight`` against)."""
    usage: dict[str, Usage] = field(default_factory=dict)
    """width ("m", "h", "d") -> totals."""
    usage_by_day: dict[int, Usage] = field(default_factory=dict)
    """day bucket start (epoch s) -> totals."""
    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """events list tag ("k:<kid>", "o", "u:<hex>", "ud") -> events, oldest first."""
    records: int = 0
    """Entries in the usage stream."""
    stuck: int = 0


@dataclass
class Ledger:
    redis: Any
    admission: Admission
    budgets: BudgetStore
    keys: KeyStore
    clock: Clock
    org: str = ORG

    @property
    def prefix(self) -> str:
        return org_prefix(self.org)

    # --- set-up -------------------------------------------------------------------------------

    async def add_key(self, kid: str, **limits: int) -> Identity:
        spec = KeyCreate(name=kid, limits=Limits(**limits))
        await self.keys.create(spec, self.org, key_id=kid)
        return self.identity(kid)

    def identity(self, kid: str) -> Identity:
        return Identity(kid, self.org, "member")

    async def revoke(self, kid: str) -> None:
        record = await self.keys.get(self.org, kid)
        assert record is not None
        await self.keys.revoke(record)

    async def org_limits(self, **limits: int) -> None:
        await self.keys.set_org_limits(self.org, Limits(**limits))

    async def end_user_policy(
        self, *, track: bool = False, require: bool = False, limits: Mapping[str, int] = {}
    ) -> None:
        policy = EndUserPolicy(
            require_on_behalf_of=require, track_spend=track, limits=Limits(**limits)
        )
        await EndUserPolicies(self.redis).put(self.org, policy)

    async def put_budget(
        self,
        scope: Scope,
        scope_id: str,
        line: int,
        *,
        period: Period = "daily",
        unit: Literal["t", "c"] = "t",
        thresholds: tuple[tuple[int, str], ...] = ((100, "block"),),
        clamp: bool = False,
    ) -> None:
        """``line``: the limit in the budget's unit (tokens, or nano-units for cost)."""
        limit: int | float = line if unit == "t" else float(Decimal(line) / NANO)
        spec = BudgetInput.model_validate(
            {
                "period": period,
                "limit_kind": "tokens" if unit == "t" else "cost",
                "limit": limit,
                "thresholds": [{"pct": p, "action": a} for p, a in thresholds],
                "clamp": clamp,
            }
        )
        now = self.clock()
        await self.budgets.put(self.org, scope, scope_id, spec, self.admission.windows(now), now)

    # --- the scripts --------------------------------------------------------------------------

    async def admit(
        self,
        kid: str,
        rid: str,
        tokens: int,
        cost: int = 0,
        *,
        user: str | None = None,
        prompt: int = 0,
        clamp: ClampTerms | None = None,
        clamp_asked: bool = False,
        dry_run: bool = False,
    ) -> Decision:
        return await self.admission.admit(
            self.identity(kid),
            rid,
            tokens,
            cost,
            prompt_tokens=prompt,
            model="gpt-test",
            endpoint="chat/completions",
            end_user=user,
            end_user_tag=end_user_tag(user) if user else "",
            clamp=clamp,
            clamp_asked=clamp_asked,
            dry_run=dry_run,
        )

    async def settle(
        self,
        kid: str,
        rid: str,
        tokens: int,
        cost: int = 0,
        *,
        inp: int = 0,
        user: str | None = None,
    ) -> int:
        """``inp``: input tokens of ``tokens`` (the rest is output). Returns the events
        recorded."""
        record = usage_record(rid, kid, tokens, cost, inp, user)
        req = self.admission.settle_request(self.identity(kid), rid, tokens, cost, record)
        events = await self.admission.settle(req)
        assert len(self.admission.deferred) == 0, "a settle was deferred"
        return events

    async def settle_together(
        self, items: Sequence[tuple[str, str, int, int, int]], *, resend: bool = False
    ) -> list[int]:
        """Settles (kid, rid, tokens, cost, inp) of requests finishing at once, as a busy proxy
        settles them (``SettleBatcher``): handed over within one turn of the event loop, they
        go in one call (``settle_batch``; ``settle`` for one alone). ``resend``: the batch is
        sent again as it was, as after a reply lost to a failover (every item a no-op)."""
        reqs = [
            self.admission.settle_request(
                self.identity(kid),
                rid,
                tokens,
                cost,
                usage_record(rid, kid, tokens, cost, inp, None),
            )
            for kid, rid, tokens, cost, inp in items
        ]
        batches = self.admission.batches
        assert batches is not None, "a ledger opened with batch_settles"
        calls = batches.calls
        events = list(await asyncio.gather(*(self.admission.settle(req) for req in reqs)))
        assert batches.calls - calls == 1, "not batched"
        assert len(self.admission.deferred) == 0, "a settle was deferred"
        if resend:
            again = await self.admission.settle_batch(self.org, reqs)
            assert again == [0] * len(reqs), again
        return events

    async def reclaim(self) -> tuple[int, int, int]:
        return await self.admission.reclaim(self.org)

    # --- the books ----------------------------------------------------------------------------

    async def books(self, widths: str = "mhd") -> Books:
        """One round trip (a script of the harness's own, not the proxy's). ``widths``: which
        usage counter widths to read ("d" alone is much cheaper than every minute's bucket)."""
        p = self.prefix
        # The org's own key routes the script to the node holding the org (on a cluster).
        found = await self.redis.eval(_SNAPSHOT, 1, p + "leases", p, widths)
        books = Books(records=int(found[-2]), stuck=int(found[-1]))
        lease_ids: dict[str, int] = {}
        for name, kind, value in found[:-2]:
            part, _, rest = name[len(p) :].partition(":")
            if kind == "list":
                books.events[rest] = [json.loads(e) for e in value][::-1]
                continue
            if kind == "zset":
                lease_ids = {
                    rid: int(score) for rid, score in zip(value[::2], value[1::2], strict=True)
                }
                continue
            fields = dict(zip(value[::2], value[1::2], strict=True))
            if part == "spend":
                tag, window = rest.rsplit(":", 1)
                c, t = int(fields.get("c", 0)), int(fields.get("t", 0))
                if c or t:
                    books.spend[(tag, window)] = (c, t)
            elif part == "infl":
                n, c, t = (int(fields.get(f, 0)) for f in ("n", "c", "t"))
                if n or c or t:
                    books.inflight[rest] = (n, c, t)
            elif part == "usage":
                width, start = rest.split(":")
                total = _sum(parse_bucket(self.org, fields).values())
                books.usage[width] = _add(books.usage.get(width, Usage()), total)
                if width == "d":
                    books.usage_by_day[int(start)] = total
            else:  # a lease
                tags = ["k:" + fields["k"], "o", *fields.get("x", "").split()]
                for tag in tags:
                    n0, c0, t0 = books.lease_sums.get(tag, (0, 0, 0))
                    books.lease_sums[tag] = (n0 + 1, c0 + int(fields["c"]), t0 + int(fields["t"]))
        books.leases = lease_ids
        return books


_SNAPSHOT = """
local p, widths = ARGV[1], ARGV[2]
local out = {}
for _, name in ipairs(redis.call('KEYS', p .. '*')) do
  local rest = string.sub(name, #p + 1)
  local part = string.match(rest, '^[^:]+')
  if part == 'spend' or part == 'infl' or part == 'lease'
      or string.find(widths, string.match(rest, '^usage:(%a):') or '-', 1, true) then
    out[#out + 1] = {name, 'hash', redis.call('HGETALL', name)}
  elseif part == 'events' then
    out[#out + 1] = {name, 'list', redis.call('LRANGE', name, 0, -1)}
  end
end
out[#out + 1] = {p .. 'leases', 'zset', redis.call('ZRANGE', p .. 'leases', 0, -1, 'WITHSCORES')}
out[#out + 1] = redis.call('XLEN', p .. 'usage')
out[#out + 1] = redis.call('ZCARD', p .. 'leases:stuck')
return out
"""
"""Every key of the org the books are made of: spend windows, in-flight counters, leases,
usage counter buckets (of the given widths), events; then the usage stream's length and the
number of records set aside."""


def _sum(counts: Any) -> Usage:
    total = Usage()
    for c in counts:
        total = _add(
            total, Usage(c.requests, c.input_tokens, c.cached_tokens, c.output_tokens, c.cost_nano)
        )
    return total


def _add(a: Usage, b: Usage) -> Usage:
    return Usage(
        a.requests + b.requests,
        a.input + b.input,
        a.cached + b.cached,
        a.output + b.output,
        a.cost + b.cost,
    )


def open_client(redis_url: str) -> Any:
    """The proxy's own kind of client, with a generous timeout: the proxy's 0.5 s fails the odd
    call on a busy CI machine."""
    return connect(RedisConfig(socket_timeout=5), redis_url)


async def open_ledger(
    redis_url: str,
    start: int,
    *,
    lease_seconds: int = 30,
    spool_dir: Path | None = None,
    redis: Any = None,
    batch_settles: bool = False,
) -> Ledger:
    """A ledger on a clean org; ``redis``: a client to reuse (one per event loop)."""
    client = redis if redis is not None else open_client(redis_url)
    clock = Clock(start)
    spool = _SpoolThatFails(spool_dir or Path(tempfile.gettempdir()) / "ledger-tests-spool")
    admission = Admission(client, {}, lease_seconds, clock, spool, batch_settles=batch_settles)
    return Ledger(client, admission, BudgetStore(client), KeyStore(client), clock)


def spend_windows(at: float) -> Mapping[Period, str]:
    w = windows_at(at)
    return {"daily": w.daily, "weekly": w.weekly, "monthly": w.monthly}
