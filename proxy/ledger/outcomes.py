"""What an admission decided: the admit script's reply, read in one place.

The reply shapes are the script's (``lua/admit.lua``); everything above the ledger sees only
these records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.ledger.keys import budget_owner, budget_scope


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
    field: str  # a budget field (ledger.keys.budget_field)
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
        return budget_owner(self.field)

    @property
    def left(self) -> int:
        return max(self.line - self.spent, 0)


@dataclass(frozen=True)
class Revoked:
    pass


@dataclass(frozen=True)
class EndUserRequired:
    """The org requires every request to name its end user (``X-On-Behalf-Of``)."""


@dataclass(frozen=True)
class EndUsersCapped:
    """A new end user past the org's cap of distinct end users this month."""

    cap: int


ALREADY_ADMITTED = Admitted(None, 0, 0, None, 0, 0, None, None, "", "", "")
"""A retried admit of a request that already holds its lease: admitted, with no figures for
the headers (the first call's reply, which had them, was lost)."""


Decision = Admitted | RateLimited | BudgetRefused | Revoked | EndUserRequired | EndUsersCapped


def _optional(value: int) -> int | None:
    return None if value < 0 else value


def decision_of(result: list[Any], reserve_tokens: int, reserve_cost_nano: int) -> Decision:
    """The admit script's reply as a decision; the reservation asked for is what was reserved
    unless the reply says it was clamped."""
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
    if kind == "users":
        return EndUsersCapped(int(result[1]))
    if kind == "invalid":
        raise ValueError(f"admit refused argument {result[1]}")
    return Revoked()
