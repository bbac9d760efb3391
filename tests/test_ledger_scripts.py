"""The ledger's scripts called directly (admit, settle, reclaim, clamping), without HTTP.

A wrong argument position or a wrong sum in a script used to surface only through the HTTP
tests, as a wrong header or a 429 somewhere. Here every case is a table row: the limits and
budgets it sets, a sequence of admits, settles, reclaims and clock moves (each with the exact
decision it must get) and the exact books afterwards, read straight from Redis: spend per scope
and window, in-flight counters, leases, usage counters (which must equal spend), budget events
and usage records. Time is injected, so lease expiry and window roll-over cost no waiting; the
whole table runs in a fraction of a second (the step language is in ``ledger_steps.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from ledger_harness import (
    ALREADY_ADMITTED,
    BudgetRefused,
    ClampTerms,
    EndUserRequired,
    Ledger,
    RateLimited,
    Revoked,
    Usage,
    end_user_tag,
    open_ledger,
)
from ledger_steps import (
    Admit,
    Advance,
    Budget,
    Case,
    EndUserLimits,
    Expect,
    KeyLimits,
    OrgLimits,
    Reclaim,
    RequireEndUsers,
    Revoke,
    Settle,
    SpendBook,
    apply,
    ok,
)

T0 = int(datetime(2026, 3, 10, 12, tzinfo=UTC).timestamp())
"""A Tuesday noon: the day, ISO week and month below are its windows."""
DAY, WEEK, MONTH = "2026-03-10", "2026-W11", "2026-03"
NEXT_DAY = "2026-03-11"
LEASE = 30
ALICE, BOB = end_user_tag("alice"), end_user_tag("bob")

# Clamping: input costs A nano-units, output R nano-units per 1M tokens; the reservation's
# cost for an output cap o (all choices) is ceil((A + o * R) / 1e6), as the proxy prices it.
A, R = 100 * 150_000_000, 600_000_000


def cost_of(output: int) -> int:
    return -(-(A + output * R) // 1_000_000)


def spent(tag: str, cost: int, tokens: int, *windows: str) -> SpendBook:
    """One scope's spend in each of ``windows`` (by default today's three)."""
    return {(tag, w): (cost, tokens) for w in windows or (DAY, WEEK, MONTH)}


def both(cost: int, tokens: int, *windows: str) -> SpendBook:
    """The same spend on key k1 and the org."""
    return spent("k:k1", cost, tokens, *windows) | spent("o", cost, tokens, *windows)


def held(n: int, cost: int, tokens: int) -> dict[str, tuple[int, int, int]]:
    """The same in flight on key k1 and the org."""
    return {"k:k1": (n, cost, tokens), "o": (n, cost, tokens)}


def over(field: str, window: str, used: int, line: int, reserved: int, unit: str = "t") -> Any:
    return BudgetRefused(field, "exceeds", window, used, line, reserved, unit)


def blocked(field: str, window: str, used: int, line: int, reserved: int) -> Any:
    return BudgetRefused(field, "blocked", window, used, line, reserved, "t")


ALERT_HALF = ((50, "alert"), (100, "block"))
KEY = "k:k1:org"
TERMS = ClampTerms(1, 1000, 16, A, R)
"""One choice reserved with an output cap of 1000, that may go down to 16."""

# fmt: off
CASES = [
    # --- budgets: within, at and over a line ---------------------------------------------------
    Case("admit within a line reserves on every scope",
        Budget("apikey", "k1", 1000),
        Admit("r1", 100, 5000, prompt=40, expect=ok(
            budget_remaining=900, budget_line=1000, budget_unit="t", budget_window=DAY,
            budget_field=KEY, request_limit=None, token_limit=None, clamped_cap=None,
            reserved_tokens=100, reserved_cost_nano=5000)),
        Expect(inflight=held(1, 5000, 100), leases=["r1"])),
    Case("admit exactly at the line",
        Budget("apikey", "k1", 1000),
        Admit("r1", 1000, expect=ok(budget_remaining=0, budget_line=1000)),
        Expect(inflight=held(1, 0, 1000), leases=["r1"])),
    Case("admit one over the line is refused and reserves nothing, not even a request",
        KeyLimits("k1", {"rpm": 1}),
        Budget("apikey", "k1", 1000),
        Admit("r1", 1001, expect=over(KEY, DAY, 0, 1000, 1001)),
        Expect(),
        Admit("r2", 1000, expect=ok(request_limit=1, request_remaining=0, budget_remaining=0)),
        Expect(inflight=held(1, 0, 1000), leases=["r2"])),
    Case("what is in flight counts against the line",
        Budget("org", "acme", 1000),
        Admit("r1", 600, key="k2"),
        Admit("r2", 500, expect=over("o:org", DAY, 600, 1000, 500)),
        Expect(inflight={"k:k2": (1, 0, 600), "o": (1, 0, 600)}, leases=["r1"])),
    Case("a cost line is judged in nano-units, the tightest budget reported",
        Budget("org", "acme", 100_000, period="monthly", unit="c"),
        Budget("apikey", "k1", 10_000),
        Admit("r1", 500, 50_000, prompt=200, expect=ok(
            budget_remaining=50_000, budget_line=100_000, budget_unit="c", budget_window=MONTH,
            budget_field="o:org")),
        Admit("r2", 500, 50_001, expect=over("o:org", MONTH, 50_000, 100_000, 50_001, "c")),
        Expect(inflight=held(1, 50_000, 500), leases=["r1"])),
    Case("settled spend at the block line blocks; both thresholds fire",
        Budget("apikey", "k1", 1000, thresholds=((80, "alert"), (100, "block"))),
        Admit("r1", 1000),
        Settle("r1", 1000, inp=300, events=2),
        Admit("r2", 1, expect=blocked(KEY, DAY, 1000, 1000, 1)),
        Expect(spend=both(0, 1000), usage=Usage(1, 300, 0, 700, 0), records=1,
               events={"k:k1": [f"threshold_alert:80:{DAY}", f"blocked:100:{DAY}"]})),
    # --- settle ----------------------------------------------------------------------------------
    Case("settle below the reservation charges actual use and frees the rest",
        Budget("org", "acme", 100_000, period="monthly", unit="c"),
        Admit("r1", 500, 50_000, prompt=200),
        Settle("r1", 300, 30_000, inp=200),
        Expect(spend=both(30_000, 300), usage=Usage(1, 200, 0, 100, 30_000), records=1),
        Admit("r2", 700, 70_000, expect=ok(budget_remaining=0)),
        Expect(spend=both(30_000, 300), inflight=held(1, 70_000, 700), leases=["r2"],
               usage=Usage(1, 200, 0, 100, 30_000), records=1)),
    Case("settle above the reservation charges all of it and crosses the lines",
        Budget("apikey", "k1", 200, thresholds=ALERT_HALF),
        Admit("r1", 100),
        Settle("r1", 250, inp=50, events=2),
        Admit("r2", 1, expect=blocked(KEY, DAY, 250, 200, 1)),
        Expect(spend=both(0, 250), usage=Usage(1, 50, 0, 200, 0), records=1,
               events={"k:k1": [f"threshold_alert:50:{DAY}", f"blocked:100:{DAY}"]})),
    Case("settle twice is settle once, whatever the replay says",
        Admit("r1", 100, 1000),
        Settle("r1", 80, 800, inp=30),
        Settle("r1", 80, 800, inp=30),
        Settle("r1", 999, 9999, inp=30),
        Expect(spend=both(800, 80), usage=Usage(1, 30, 0, 50, 800), records=1)),
    Case("settle of an unknown lease charges nothing and keeps that id from reserving later",
        Settle("ghost", 100, 1000),
        Admit("ghost", 100, 1000, expect=ALREADY_ADMITTED),
        Expect()),
    Case("spend goes to the key, the org and a tracked end user, each in its own windows",
        Budget("external_user", "alice", 1000, period="weekly"),
        Admit("r1", 100, 1000, user="alice"),
        Admit("r2", 100, 1000, key="k2", user="bob"),
        Settle("r1", 60, 600, inp=10, user="alice"),
        Settle("r2", 40, 400, key="k2", user="bob"),
        Expect(spend=spent("k:k1", 600, 60) | spent("k:k2", 400, 40) | spent("o", 1000, 100)
               | spent(ALICE, 600, 60), usage=Usage(2, 10, 0, 90, 1000), records=2)),
    # --- reclaim ---------------------------------------------------------------------------------
    Case("reclaim charges an expired lease its reservation; a late settle corrects it once",
        Budget("apikey", "k1", 1000, thresholds=ALERT_HALF),
        Admit("r1", 600, 6000, prompt=200),
        Advance(LEASE - 1),
        Reclaim((0, 0, 0)),
        Expect(inflight=held(1, 6000, 600), leases=["r1"]),
        Advance(1),
        Reclaim((1, 0, 0)),
        Expect(spend=both(6000, 600), usage=Usage(1, 200, 0, 400, 6000), records=1,
               events={"k:k1": [f"threshold_alert:50:{DAY}"]}),
        Settle("r1", 300, 3000, inp=200),
        Settle("r1", 300, 3000, inp=200),
        Expect(spend=both(3000, 300), usage=Usage(1, 200, 0, 100, 3000), records=2,
               events={"k:k1": [f"threshold_alert:50:{DAY}"]})),
    Case("a late settle above the reservation adds the difference and may cross a line",
        Budget("apikey", "k1", 1000, thresholds=ALERT_HALF),
        Admit("r1", 400, 4000, prompt=100),
        Advance(LEASE),
        Reclaim((1, 0, 0)),
        Settle("r1", 1200, 12_000, inp=100, events=2),
        Expect(spend=both(12_000, 1200), usage=Usage(1, 100, 0, 1100, 12_000), records=2,
               events={"k:k1": [f"threshold_alert:50:{DAY}", f"blocked:100:{DAY}"]})),
    Case("a late settle after midnight corrects the windows the reclaim charged",
        Admit("r1", 400, 4000),
        Advance(12 * 3600 - 10),
        Reclaim((1, 0, 0)),
        Advance(20),
        Settle("r1", 100, 1000),
        Expect(spend=both(1000, 100), usage=Usage(1, 0, 0, 100, 1000), records=2)),
    Case("an admit reclaims expired leases before it decides",
        Budget("apikey", "k1", 1000),
        Admit("r1", 800, 8000),
        Advance(LEASE),
        Admit("r2", 300, expect=over(KEY, DAY, 800, 1000, 300)),
        Expect(spend=both(8000, 800), usage=Usage(1, 0, 0, 800, 8000), records=1)),
    # --- clamping --------------------------------------------------------------------------------
    Case("clamp lowers the output cap to what fits the token line",
        Budget("apikey", "k1", 1000, clamp=True),
        Admit("r0", 400),
        Admit("r1", 1100, cost_of(1000), prompt=100, clamp=TERMS, expect=ok(
            clamped_cap=500, reserved_tokens=600, reserved_cost_nano=cost_of(500),
            budget_remaining=0)),
        Expect(inflight=held(2, cost_of(500), 1000), leases=["r0", "r1"])),
    Case("a request that asks for clamping is lowered to what fits a cost line, per choice",
        Budget("org", "acme", 400_000, period="monthly", unit="c"),
        Admit("r1", 2100, cost_of(2000), prompt=100, clamp=ClampTerms(2, 1000, 16, A, R),
              clamp_asked=True, expect=ok(
                  clamped_cap=320, reserved_tokens=740, reserved_cost_nano=399_000,
                  budget_remaining=1000, budget_unit="c")),
        Expect(inflight=held(1, 399_000, 740), leases=["r1"])),
    Case("clamping refuses when even the lowest cap does not fit",
        Budget("apikey", "k1", 1000, clamp=True),
        Admit("r0", 900),
        Admit("r1", 1100, cost_of(1000), prompt=100, clamp=TERMS,
              expect=over(KEY, DAY, 900, 1000, 1100)),
        Expect(inflight=held(1, 0, 900), leases=["r0"])),
    Case("no clamping where neither the budget nor the request allows it",
        Budget("apikey", "k1", 1000),
        Admit("r1", 1100, cost_of(1000), prompt=100, clamp=TERMS,
              expect=over(KEY, DAY, 0, 1000, 1100)),
        Expect()),
    # --- rate limits -----------------------------------------------------------------------------
    Case("requests per minute: N back to back, then one every window / N",
        KeyLimits("k1", {"rpm": 2}),
        Admit("r1", 10, expect=ok(request_limit=2, request_remaining=1, request_reset_ms=30_000)),
        Admit("r2", 10, expect=ok(request_remaining=0, request_reset_ms=60_000)),
        Admit("r3", 10, expect=RateLimited("key", "rpm", 2, 30_000, 2)),
        Settle("r1", 10),
        Settle("r2", 10),
        Admit("r3", 10, expect=RateLimited("key", "rpm", 2, 30_000, 2)),
        Advance(30),
        Admit("r4", 10, expect=ok(request_remaining=0, request_reset_ms=60_000)),
        Expect(spend=both(0, 20), inflight=held(1, 0, 10), leases=["r4"],
               usage=Usage(2, 0, 0, 20, 0), records=2)),
    Case("tokens per minute reserve the worst case and settle gives back the rest",
        OrgLimits({"tpm": 1000}),
        Admit("r1", 600, expect=ok(token_limit=1000, token_remaining=400, token_reset_ms=36_000)),
        Admit("r2", 500, expect=RateLimited("org", "tpm", 1000, 6000, 600)),
        Settle("r1", 100),
        Admit("r3", 500, expect=ok(token_remaining=400, token_reset_ms=36_000)),
        Admit("r4", 1001, expect=RateLimited("org", "tpm", 1000, -1, 600)),
        Expect(spend=both(0, 100), inflight=held(1, 0, 500), leases=["r3"],
               usage=Usage(1, 0, 0, 100, 0), records=1)),
    Case("concurrency counts live leases",
        KeyLimits("k1", {"concurrency": 1}),
        Admit("r1", 10),
        Admit("r2", 10, expect=RateLimited("key", "concurrency", 1, -1, 1)),
        Admit("r3", 10, key="k2"),
        Settle("r1", 10),
        Admit("r4", 10),
        Expect(spend=both(0, 10), inflight={"k:k1": (1, 0, 10), "k:k2": (1, 0, 10),
               "o": (2, 0, 20)}, leases=["r3", "r4"], usage=Usage(1, 0, 0, 10, 0), records=1)),
    Case("each end user has the org's limits for each end user to themselves",
        EndUserLimits({"rpm": 1}),
        Admit("r1", 10, user="alice"),
        Admit("r2", 10, user="alice", expect=RateLimited("end_user", "rpm", 1, 60_000, 1)),
        Admit("r3", 10, user="bob"),
        Expect(inflight=held(2, 0, 20) | {ALICE: (1, 0, 10), BOB: (1, 0, 10)},
               leases=["r1", "r3"])),
    Case("an admit retried by request id reserves once",
        KeyLimits("k1", {"rpm": 2}),
        Admit("r1", 100, 1000),
        Admit("r1", 100, 1000, expect=ALREADY_ADMITTED),
        Admit("r2", 100, 1000, expect=ok(request_remaining=0)),
        Admit("r3", 100, 1000, expect=RateLimited("key", "rpm", 2, 30_000, 2)),
        Expect(inflight=held(2, 2000, 200), leases=["r1", "r2"])),
    Case("a dry run decides as an admit would and reserves nothing",
        KeyLimits("k1", {"rpm": 1}),
        Budget("apikey", "k1", 1000),
        Admit("r1", 500, dry_run=True, expect=ok(budget_remaining=500, request_remaining=0)),
        Expect(),
        Admit("r2", 1000, expect=ok(budget_remaining=0, request_remaining=0)),
        Expect(inflight=held(1, 0, 1000), leases=["r2"])),
    Case("a revoked key is refused at once",
        Revoke("k1"),
        Admit("r1", 10, expect=Revoked()),
        Expect()),
    # --- end users -------------------------------------------------------------------------------
    Case("an end user's own budget judges only their spend",
        Budget("external_user", "alice", 300),
        Admit("r1", 200, user="alice", expect=ok(budget_remaining=100,
                                                  budget_field=f"{ALICE}:org")),
        Admit("r2", 200, user="alice", expect=over(f"{ALICE}:org", DAY, 200, 300, 200)),
        Admit("r3", 200, user="bob"),
        Expect(inflight=held(2, 0, 400) | {ALICE: (1, 0, 200)}, leases=["r1", "r3"])),
    Case("the default budget for each end user judges each one separately",
        Budget("external_user_default", "acme", 300, period="weekly"),
        Admit("r1", 200, user="alice"),
        Admit("r2", 200, user="bob", expect=ok(budget_field="ud:org", budget_window=WEEK)),
        Admit("r3", 200, user="alice", expect=over("ud:org", WEEK, 200, 300, 200)),
        Expect(inflight=held(2, 0, 400) | {ALICE: (1, 0, 200), BOB: (1, 0, 200)},
               leases=["r1", "r2"])),
    Case("an org that requires end users refuses a request without one",
        RequireEndUsers(),
        Admit("r1", 10, expect=EndUserRequired()),
        Admit("r2", 10, user="alice"),
        Expect(inflight=held(1, 0, 10), leases=["r2"])),
    # --- windows and events ----------------------------------------------------------------------
    Case("the daily window resets at midnight, the monthly one does not",
        Budget("apikey", "k1", 1000),
        Budget("org", "acme", 1500, period="monthly"),
        Admit("r1", 900),
        Settle("r1", 900),
        Advance(12 * 3600),
        Admit("r2", 700, expect=over("o:org", MONTH, 900, 1500, 700)),
        Admit("r3", 600, expect=ok(budget_field="o:org", budget_remaining=0)),
        Expect(spend=both(0, 900), inflight=held(1, 0, 600), leases=["r3"],
               usage=Usage(1, 0, 0, 900, 0), records=1)),
    Case("a threshold fires once per window",
        Budget("apikey", "k1", 1000, thresholds=ALERT_HALF),
        Admit("r1", 300), Settle("r1", 300),
        Admit("r2", 300), Settle("r2", 300, events=1),
        Admit("r3", 300), Settle("r3", 300),
        Advance(12 * 3600),
        Admit("r4", 600), Settle("r4", 600, events=1),
        Expect(spend=both(0, 900, DAY) | both(0, 600, NEXT_DAY) | both(0, 1500, WEEK, MONTH),
               usage=Usage(4, 0, 0, 1500, 0), records=4,
               events={"k:k1": [f"threshold_alert:50:{DAY}", f"threshold_alert:50:{NEXT_DAY}"]})),
]
# fmt: on


@pytest.fixture
async def ledger(redis_url: str, tmp_path: Path) -> AsyncIterator[Ledger]:
    opened = await open_ledger(redis_url, T0, lease_seconds=LEASE, spool_dir=tmp_path)
    await opened.add_key("k1")
    await opened.add_key("k2")
    yield opened
    await opened.redis.aclose()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_ledger_script(ledger: Ledger, case: Case) -> None:
    for number, step in enumerate(case.steps, 1):
        try:
            await apply(ledger, step)
        except AssertionError as exc:
            raise AssertionError(f"step {number} ({step}): {exc}") from exc
