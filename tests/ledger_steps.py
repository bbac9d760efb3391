"""The step language of the ledger's table-driven tests (``test_ledger_scripts.py``): what a
case does (admit, settle, reclaim, move the clock, set limits and budgets) and the exact books
it expects, checked against what the harness reads from Redis."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from ledger_harness import (
    ALREADY_ADMITTED,
    Admitted,
    Books,
    ClampTerms,
    Decision,
    Ledger,
    Scope,
    Usage,
)


@dataclass(frozen=True)
class Ok:
    """Admitted, with these fields as given (others unchecked)."""

    fields: dict[str, Any] = field(default_factory=dict)


def ok(**fields: Any) -> Ok:
    return Ok(fields)


Expected = Ok | Decision


@dataclass(frozen=True)
class Admit:
    rid: str
    tokens: int
    cost: int = 0
    expect: Expected = Ok()
    key: str = "k1"
    user: str | None = None
    prompt: int = 0
    clamp: ClampTerms | None = None
    clamp_asked: bool = False
    dry_run: bool = False


@dataclass(frozen=True)
class Settle:
    rid: str
    tokens: int
    cost: int = 0
    events: int = 0
    inp: int = 0
    key: str = "k1"
    user: str | None = None


@dataclass(frozen=True)
class Reclaim:
    expect: tuple[int, int, int]


@dataclass(frozen=True)
class Advance:
    seconds: int


@dataclass(frozen=True)
class Budget:
    scope: Scope
    scope_id: str
    line: int
    period: Literal["daily", "weekly", "monthly"] = "daily"
    unit: Literal["t", "c"] = "t"
    thresholds: tuple[tuple[int, str], ...] = ((100, "block"),)
    clamp: bool = False


@dataclass(frozen=True)
class KeyLimits:
    key: str = "k1"
    limits: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class OrgLimits:
    limits: dict[str, int]


@dataclass(frozen=True)
class EndUserLimits:
    limits: dict[str, int]


@dataclass(frozen=True)
class RequireEndUsers:
    """The org requires every request to name its end user."""


@dataclass(frozen=True)
class Revoke:
    key: str = "k1"


SpendBook = dict[tuple[str, str], tuple[int, int]]


@dataclass(frozen=True)
class Expect:
    """The exact books at this point: spend by (tag, window), in-flight by tag, open leases,
    usage counter totals (every width alike), events by list as "type:pct:window", and the
    number of usage records. Anything not listed must be zero or absent."""

    spend: SpendBook = field(default_factory=dict)
    inflight: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    leases: Sequence[str] = ()
    usage: Usage = field(default_factory=Usage)
    events: dict[str, list[str]] = field(default_factory=dict)
    records: int = 0


Step = (
    Admit
    | Settle
    | Reclaim
    | Advance
    | Budget
    | KeyLimits
    | OrgLimits
    | EndUserLimits
    | RequireEndUsers
    | Revoke
    | Expect
)


async def apply(ledger: Ledger, step: Step) -> None:
    if isinstance(step, Admit):
        decision = await ledger.admit(
            step.key,
            step.rid,
            step.tokens,
            step.cost,
            user=step.user,
            prompt=step.prompt,
            clamp=step.clamp,
            clamp_asked=step.clamp_asked,
            dry_run=step.dry_run,
        )
        if isinstance(step.expect, Ok):
            assert isinstance(decision, Admitted) and decision is not ALREADY_ADMITTED, decision
            got = {name: getattr(decision, name) for name in step.expect.fields}
            assert got == step.expect.fields
        else:
            assert decision == step.expect
    elif isinstance(step, Settle):
        events = await ledger.settle(
            step.key, step.rid, step.tokens, step.cost, inp=step.inp, user=step.user
        )
        assert events == step.events
    elif isinstance(step, Reclaim):
        assert await ledger.reclaim() == step.expect
    elif isinstance(step, Advance):
        ledger.clock.advance(step.seconds)
    elif isinstance(step, Budget):
        await ledger.put_budget(
            step.scope,
            step.scope_id,
            step.line,
            period=step.period,
            unit=step.unit,
            thresholds=step.thresholds,
            clamp=step.clamp,
        )
    elif isinstance(step, KeyLimits):
        await ledger.add_key(step.key, **step.limits)
    elif isinstance(step, OrgLimits):
        await ledger.org_limits(**step.limits)
    elif isinstance(step, EndUserLimits):
        await ledger.end_user_policy(limits=step.limits)
    elif isinstance(step, RequireEndUsers):
        await ledger.end_user_policy(require=True)
    elif isinstance(step, Revoke):
        await ledger.revoke(step.key)
    else:
        check(await ledger.books(), step)


def check(books: Books, expect: Expect) -> None:
    assert books.spend == expect.spend
    assert books.inflight == expect.inflight
    assert books.lease_sums == expect.inflight, "in-flight counters differ from the leases"
    assert sorted(books.leases) == sorted(expect.leases)
    for width in ("m", "h", "d"):
        assert books.usage.get(width, Usage()) == expect.usage, width
    # Usage counters equal spend, day by day (the org's daily window is the day bucket).
    for start, usage in books.usage_by_day.items():
        day = datetime.fromtimestamp(start, UTC).date().isoformat()
        assert (usage.cost, usage.input + usage.output) == books.spend.get(("o", day), (0, 0))
    shown = {
        tag: [f"{e['type']}:{e['pct']}:{e['period_key']}" for e in events]
        for tag, events in books.events.items()
    }
    assert shown == expect.events
    assert books.records == expect.records
    assert books.stuck == 0


class Case:
    """One row of the table: a name (the test id) and its steps, in order."""

    def __init__(self, name: str, *steps: Step) -> None:
        self.name = name
        self.steps = steps
