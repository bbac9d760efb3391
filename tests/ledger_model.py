"""The model of the ledger's state-machine test (``test_ledger_state_machine.py``): what the
books must hold after any sequence of admits, settles, reclaims, late settles, budget PUTs and
clock moves, computed in plain Python from the requests alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from ledger_harness import (
    BudgetRefused,
    ClampTerms,
    Period,
    Scope,
    Usage,
    end_user_tag,
    spend_windows,
)

START = int(datetime(2026, 1, 31, 22, tzinfo=UTC).timestamp())
"""Two hours before midnight, the end of a month and (a day later) of an ISO week."""
LEASE = 30
MAX_OPEN = 12
"""Open leases at most (an admit reclaims at most 32 expired ones before it decides)."""
USERS = (None, "alice", "bob")
ALICE = end_user_tag("alice")


@dataclass(frozen=True)
class BudgetDef:
    name: str
    scope: Scope
    scope_id: str
    field: str
    period: Period
    unit: Literal["t", "c"]
    first_line: int

    def tag(self, kid: str, user: str | None) -> str | None:
        """The scope tag whose spend this budget judges for a request (None: not applicable)."""
        if self.scope == "apikey":
            return "k:" + kid if kid == self.scope_id else None
        if self.scope == "org":
            return "o"
        if self.scope == "external_user":
            return end_user_tag(user) if user == self.scope_id else None
        if user is None or user == "alice":
            return None  # alice's own budget of the same period replaces the default for her
        return end_user_tag(user)


BUDGETS = (
    BudgetDef("key", "apikey", "k1", "k:k1:org", "daily", "t", 3000),
    BudgetDef("org", "org", "acme", "o:org", "monthly", "c", 300_000),
    BudgetDef("alice", "external_user", "alice", ALICE + ":org", "weekly", "t", 1200),
    BudgetDef("each user", "external_user_default", "acme", "ud:org", "weekly", "t", 2000),
)
"""In the order the admit script judges them (key, org, end user, default for each end
user)."""
THRESHOLDS = ((50, "alert"), (100, "block"))


@dataclass
class Lease:
    tags: tuple[str, ...]
    tokens: int
    cost: int
    prompt: int
    expiry_ms: int


@dataclass
class Charge:
    """A reclaimed lease: charged its reservation in these windows, until its late settle."""

    lease: Lease
    windows: tuple[str, ...]


@dataclass
class Model:
    now: int = START
    lines: dict[str, int] = field(default_factory=lambda: {b.name: b.first_line for b in BUDGETS})
    open: dict[str, Lease] = field(default_factory=dict)
    reclaimed: dict[str, Charge] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)
    """Settled, corrected, or settled before ever being admitted (a tombstone)."""
    tombstones: set[str] = field(default_factory=set)
    spend: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)
    serial: int = 0

    def windows(self) -> tuple[str, ...]:
        return tuple(spend_windows(self.now).values())

    def charge(
        self, tags: tuple[str, ...], windows: tuple[str, ...], cost: int, tokens: int
    ) -> None:
        for tag in tags:
            for w in windows:
                c, t = self.spend.get((tag, w), (0, 0))
                self.spend[(tag, w)] = (c + cost, t + tokens)

    def count(self, requests: int, inp: int, out: int, cost: int) -> None:
        u = self.usage
        self.usage = Usage(u.requests + requests, u.input + inp, 0, u.output + out, u.cost + cost)

    def held(self, tag: str) -> tuple[int, int, int]:
        leases = [lease for lease in self.open.values() if tag in lease.tags]
        return len(leases), sum(x.cost for x in leases), sum(x.tokens for x in leases)

    def reclaim_expired(self) -> int:
        expired = [rid for rid, lease in self.open.items() if lease.expiry_ms <= self.now * 1000]
        for rid in expired:
            lease = self.open.pop(rid)
            self.charge(lease.tags, self.windows(), lease.cost, lease.tokens)
            self.count(1, lease.prompt, lease.tokens - lease.prompt, lease.cost)
            self.reclaimed[rid] = Charge(lease, self.windows())
        return len(expired)

    def decide(
        self, kid: str, user: str | None, tokens: int, cost: int, clamp: Clamp | None
    ) -> BudgetRefused | Reservation:
        """What the admit script must answer (after reclaiming), judging the budgets in the
        script's order of fields: the first that is blocked, or that the worst case does not
        fit (unless it may be clamped); then, where some did not fit, the highest output cap
        that fits them all, or a refusal by the first that not even the lowest cap fits."""
        squeezed: list[tuple[BudgetDef, int]] = []
        for budget in BUDGETS:
            tag = budget.tag(kid, user)
            if tag is None:
                continue
            w = spend_windows(self.now)[budget.period]
            at = 0 if budget.unit == "c" else 1
            spent = self.spend.get((tag, w), (0, 0))[at]
            used = spent + self.held(tag)[1 + at]
            line = self.lines[budget.name]
            r = cost if budget.unit == "c" else tokens
            if spent >= line:
                return BudgetRefused(budget.field, "blocked", w, spent, line, r, budget.unit)
            if used + r > line:
                if clamp is None:
                    return BudgetRefused(budget.field, "exceeds", w, used, line, r, budget.unit)
                squeezed.append((budget, used))
        if not squeezed:
            return Reservation(tokens, cost, None)
        assert clamp is not None

        def misfit(cap: int) -> tuple[BudgetDef, int] | None:
            t, c = clamp.reservation(cap)
            for budget, used in squeezed:
                if used + (c if budget.unit == "c" else t) > self.lines[budget.name]:
                    return budget, used
            return None

        worst = misfit(clamp.terms.lowest)
        if worst is not None:
            budget, used = worst
            w = spend_windows(self.now)[budget.period]
            r = cost if budget.unit == "c" else tokens
            line = self.lines[budget.name]
            return BudgetRefused(budget.field, "exceeds", w, used, line, r, budget.unit)
        terms = clamp.terms
        cap = next(c for c in range(terms.cap - 1, terms.lowest - 1, -1) if misfit(c) is None)
        return Reservation(*clamp.reservation(cap), cap)


@dataclass(frozen=True)
class Reservation:
    """An admitted request's reservation, and its output cap per choice if it was lowered."""

    tokens: int
    cost: int
    clamped_cap: int | None


@dataclass(frozen=True)
class Clamp:
    """A request whose output cap may be lowered: its prompt tokens and the script's terms."""

    prompt: int
    terms: ClampTerms

    def reservation(self, cap: int) -> tuple[int, int]:
        """Tokens and cost (nano) reserved with this output cap per choice, in exact integers:
        prompt + cap * choices, and ceil((input cost + output * rate) / 1e6)."""
        output = cap * self.terms.choices
        cost = -(-(self.terms.input_cost + output * self.terms.output_rate) // 10**6)
        return self.prompt + output, cost
