"""The budget API's shapes (the MKA1 budget contract): what a PUT takes (``BudgetInput``) and
what a budget looks like in an answer or a webhook (``public`` and its ``gauge``).

The store keeps budgets as it needs them (lines precomputed for the scripts, the secret
sealed) and returns them as records; these shapes are the API's, so they live with it.
The limits the input is held to (``MAX_LINE``, ``MIN_LIMIT``, ``MAX_PCT``) are the ledger's:
its scripts compare integer lines held exactly by a double.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
)

from proxy.ledger.budgets import (
    END_USER_SCOPES,
    MAX_LINE,
    MAX_PCT,
    MIN_LIMIT,
    NANO,
    BudgetRecord,
    Owner,
    Spend,
    _unit_amount,
)
from proxy.ledger.windows import Period, rfc3339


class Threshold(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pct: StrictInt = Field(gt=0, le=MAX_PCT)
    action: Literal["alert", "block"]


def _most(kind: str) -> str:
    if kind == "cost":
        return f"{Decimal(MAX_LINE) / NANO} (currency units; {MAX_LINE} nano-units)"
    return f"{MAX_LINE} tokens"


class BudgetInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    period: Period
    limit_kind: Literal["cost", "tokens"]
    limit: int | float = Field(json_schema_extra={"minimum": float(MIN_LIMIT)})
    thresholds: list[Threshold] = Field(min_length=1)
    owner: Owner = "org"
    webhook_url: str | None = Field(
        None, json_schema_extra={"format": "uri", "pattern": "^https?://"}
    )
    webhook_secret: str | None = Field(None, min_length=1)
    clamp: StrictBool = False
    """A request whose worst case does not fit this budget is admitted with a lower output cap
    when its prompt plus ``[budgets] clamp_min_output_tokens`` does (instead of refused)."""

    @field_validator("limit", mode="before")
    @classmethod
    def _a_json_number(cls, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("must be a number")
        return value

    @field_validator("limit")
    @classmethod
    def _finite_positive_exact(cls, value: int | float, info: ValidationInfo) -> int | float:
        # isinstance first: math.isfinite(10**400) raises OverflowError.
        if (isinstance(value, float) and not math.isfinite(value)) or value <= 0:
            raise ValueError("must be a finite number greater than 0")
        if Decimal(str(value)) < MIN_LIMIT:
            raise ValueError(f"must be at least {MIN_LIMIT} (one nano-unit)")
        kind = info.data.get("limit_kind")
        if kind is not None and _unit_amount(value, kind) > MAX_LINE:
            most = _most(kind)
            raise ValueError(f"must be at most {most} for limit_kind '{kind}'")
        return value

    @field_validator("thresholds")
    @classmethod
    def _lines_exact(cls, value: list[Threshold], info: ValidationInfo) -> list[Threshold]:
        kind, limit = info.data.get("limit_kind"), info.data.get("limit")
        if kind is None or limit is None:
            return value
        amount = _unit_amount(limit, kind)
        for threshold in value:
            if math.ceil(amount * threshold.pct / 100) > MAX_LINE:
                raise ValueError(
                    f"pct {threshold.pct} puts a line past the largest one: limit x pct / 100 "
                    f"must be at most {_most(kind)}"
                )
        return value

    @field_validator("webhook_url")
    @classmethod
    def _absolute_http(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http or https URI")
        return value


def gauge(budget: dict[str, Any], window: str, spend: Spend, reset_at: str) -> dict[str, Any]:
    """The contract's ``spend`` object: settled spend of the budget's window, and when that
    window ends (``reset_at``, RFC 3339 UTC)."""
    limit = Decimal(str(budget["limit"]))
    if budget["limit_kind"] == "cost":
        used = Decimal(spend.cost_nano) / NANO
    else:
        used = Decimal(spend.tokens)
    blocked = (
        "block_ceil" in budget
        and (spend.cost_nano if budget["unit"] == "c" else spend.tokens) >= budget["block_ceil"]
    )
    return {
        "window": window,
        "cost_spent_nano": str(spend.cost_nano),
        "cost_spent": float(Decimal(spend.cost_nano) / NANO),
        "tokens_spent": str(spend.tokens),
        "pct": round(float(used / limit * 100), 2),
        "status": "blocked" if blocked else "ok",
        "reset_at": reset_at,
    }


def public(budget: dict[str, Any], org_id: str) -> dict[str, Any]:
    """The contract's ``Budget``. End-user budgets also carry ``scope_org_id`` (an end-user id
    does not name its org); the default for each end user has no ``spend`` of its own."""
    shown: dict[str, Any] = {
        "id": budget["id"],
        "scope": budget["scope"],
        "scope_id": budget["scope_id"],
        "owner": budget["owner"],
        "period": budget["period"],
        "limit_kind": budget["limit_kind"],
        "limit": budget["limit"],
        "thresholds": budget["thresholds"],
        "alert_webhook_url": budget["alert_webhook_url"],
        "clamp": bool(budget.get("clamp", False)),
    }
    if budget["scope"] in END_USER_SCOPES:
        shown["scope_org_id"] = org_id
    return shown


def shown(record: BudgetRecord, org_id: str) -> dict[str, Any]:
    """A stored budget as the API answers it: ``public`` with its live ``spend``."""
    budget = public(record.budget, org_id)
    if record.spend is not None:
        reset_at = rfc3339(record.window_end)
        budget["spend"] = gauge(record.budget, record.window, record.spend, reset_at)
    return budget
