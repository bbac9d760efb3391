"""What the admin API answers, as pydantic models: the OpenAPI document's response schemas.

Each model states exactly the JSON a handler sends today, field for field and in order (the
handlers build plain dicts; the contract tests and the schemathesis run check every answer
against these schemas, which forbid unknown fields). The budget shapes are the MKA1 budget
contract (``docs/spec/budgets-api.md``). Request models live beside the code that validates
with them (``proxy.ledger.api_keys``, ``proxy.admin.budget_shapes``, the API modules' query
models).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from proxy.admin.budget_shapes import Threshold
from proxy.config import Role
from proxy.ledger.api_keys import Limits
from proxy.ledger.budgets import Owner
from proxy.ledger.keys import Scope
from proxy.ledger.windows import Period

DIGITS = r"^[0-9]+$"
DeliveryStatus = Literal["pending", "delivered", "failed"]


class Strict(BaseModel):
    """Every field is always present (defaults are only for building), and nothing else is."""

    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)


# --- keys ----------------------------------------------------------------------------------


class ApiKey(Strict):
    object: Literal["api_key"] = "api_key"
    id: str
    org_id: str
    name: str
    role: Role
    status: Literal["active", "revoked", "expired"] = Field(
        description="`expired`: past `expires_at` (refused with `key_expired`, kept for audit)."
    )
    models: list[str] | None = Field(description="The models this key may use; null: all.")
    limits: Limits = Field(description="Every limit, null where none is set.")
    created_at: int = Field(description="Unix seconds.")
    key_prefix: str = Field(description="The first characters of the key, to recognise it.")
    expires_at: int | None = Field(description="Unix seconds; null: never expires.")
    metadata: dict[str, str] = Field(description="The operator's own string map (≤ 16 entries).")
    last_used_at: int | None = Field(
        description="Unix seconds, to within a minute (each process writes it once a minute)."
    )
    rotated_at: int | None = Field(description="When the secret was last rotated (unix seconds).")


class ApiKeyCreated(ApiKey):
    key: str = Field(description="The plaintext key: shown in this answer only, never again.")


class ApiKeyRotated(ApiKeyCreated):
    previous_valid_until: int | None = Field(
        description="Until when (unix seconds) the previous secret still works; null: it "
        "stopped at once."
    )


class ApiKeyList(Strict):
    object: Literal["list"] = "list"
    data: list[ApiKey]


class ApiKeyRevoked(Strict):
    id: str
    object: Literal["api_key"] = "api_key"
    revoked: Literal[True] = True


class OrgLimits(Strict):
    org_id: str
    limits: Limits


class OrgEndUserPolicy(Strict):
    org_id: str
    require_on_behalf_of: bool
    track_spend: bool
    limits: Limits = Field(description="For each end user separately: rpm, tpm, concurrency.")


class Caller(Strict):
    """Who the bearer key is: what the console shows and scopes itself by."""

    object: Literal["identity"] = "identity"
    key_id: str
    org_id: str
    role: Role


# --- budgets (docs/spec/budgets-api.md) ----------------------------------------------------


class BudgetSpend(Strict):
    window: str = Field(description="Daily `2026-11-24`, weekly `2026-W48`, monthly `2026-11`.")
    cost_spent_nano: str = Field(
        pattern=DIGITS, description="Integer nano-units (1e9 per major unit, NOT cents)."
    )
    cost_spent: float = Field(description="The same amount in major currency units.")
    tokens_spent: str = Field(pattern=DIGITS)
    pct: float = Field(description="Settled spend / limit x 100, in the budget's limit_kind.")
    status: Literal["ok", "blocked"]
    reset_at: str = Field(description="When the window ends and its spend starts over (RFC 3339).")


class Budget(BaseModel):
    """Some fields are present on some scopes only (not ``Strict``): end-user budgets name
    their org, and the default for each end user has no spend of its own."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Stable for one (scope, scope_id, owner) across edits.")
    scope: Scope
    scope_id: str = Field(
        description="The org, the key, or the end user; the org for the default for each end user."
    )
    owner: Owner
    period: Period
    limit_kind: Literal["cost", "tokens"]
    limit: int | float
    thresholds: list[Threshold]
    alert_webhook_url: str | None
    clamp: bool = Field(
        description="Requests whose worst case does not fit are admitted with a lower output "
        "cap when a minimum output still fits."
    )
    scope_org_id: str | None = Field(
        None, description="End-user scopes only: the org whose end user this is."
    )
    spend: BudgetSpend | None = Field(
        None, description="Live spend; absent on the default for each end user."
    )


class BudgetList(Strict):
    object: Literal["list"] = "list"
    data: list[Budget]


class BudgetDeleted(Strict):
    scope: Scope
    scope_id: str
    owner: Owner
    deleted: Literal[True] = True


class BudgetEvent(BaseModel):
    """``target_id`` is present on end-user budgets' events only (not ``Strict``)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    budget_id: str
    type: Literal["threshold_alert", "blocked"]
    pct: int | float | None
    period_key: str
    spend_snapshot: str = Field(description="Spend at that moment, in the budget's unit.")
    limit_snapshot: str
    created_at: str = Field(description="ISO 8601 UTC.")
    target_id: str | None = Field(
        None, description="End-user budgets only: the end user it fired for."
    )


class BudgetEventList(Strict):
    """Newest first."""

    object: Literal["list"] = "list"
    data: list[BudgetEvent]


# --- webhooks ------------------------------------------------------------------------------


class WebhookDelivery(Strict):
    object: Literal["webhook_delivery"] = "webhook_delivery"
    event_id: str
    org_id: str
    budget_id: str | None
    type: str = Field(description="`budget.threshold_alert` or `budget.blocked`.")
    url: str | None
    status: DeliveryStatus
    attempts: int
    last_error: str | None
    created_at: str | None
    last_attempt_at: str | None
    next_attempt_at: str | None
    delivered_at: str | None


class WebhookDeliveryList(Strict):
    """Newest first."""

    object: Literal["list"] = "list"
    data: list[WebhookDelivery]


# --- operations -----------------------------------------------------------------


class Health(Strict):
    status: Literal["ok"] = "ok"


class Readiness(Strict):
    status: Literal["ready", "unavailable"]
    redis: str


class Unready(Readiness):
    spool: str
    """``ok``, or why the settle spool cannot hold a settle (``unwritable: …``)."""


# --- usage and cost reports (docs/spec/usage-api.md) ---------------------------------------


class CostGroupRow(Strict):
    model: str | None
    api_key_id: str | None
    team_id: str | None = Field(description="Always null: the proxy has no teams.")
    external_user_id: str | None = Field(description="The X-On-Behalf-Of of the requests.")
    org_id: str | None
    cost: float = Field(description="Major currency units.")
    cost_nano: str = Field(pattern=DIGITS, description="Integer nano-units (1e9 per major unit).")
    num_model_requests: int = Field(description="An extension: requests counted in the row.")
    input_tokens: int
    input_cached_tokens: int
    output_tokens: int


class UsageCosts(Strict):
    object: Literal["usage.costs"] = "usage.costs"
    currency: str | None
    start_time: int
    end_time: int
    group_by: list[str]
    data: list[CostGroupRow]
    total_cost: float
    total_cost_nano: str = Field(pattern=DIGITS)


class UsageBucket(Strict):
    object: Literal["bucket"] = "bucket"
    start_time: int = Field(description="Unix seconds, inclusive.")
    end_time: int = Field(description="Unix seconds, exclusive.")
    results: list[dict[str, Any]] = Field(
        description="One item per combination of the grouped dimensions, in OpenAI's usage "
        "result shape (`organization.usage.completions.result` or `...embeddings.result`)."
    )


class UsagePage(Strict):
    object: Literal["page"] = "page"
    data: list[UsageBucket]
    has_more: bool
    next_page: str | None = Field(description="The cursor of the next page; null on the last.")


class RecentRequests(Strict):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]] = Field(
        description="The org's most recent requests, newest first (request id, key, end user, "
        "model, endpoint, tokens, cost, status, time)."
    )
    has_more: bool
    next_page: str | None


class PriceRow(Strict):
    model: str
    org_id: str | None
    rates: dict[str, float] = Field(description="Major currency units per token.")
    effective_from: str = Field(description="When this process resolved the price (ISO 8601).")
    effective_to: str | None
    set_by: str = Field(description="Where the price comes from: config, genai-prices, default.")
    price_nano_per_1m: dict[str, str] = Field(
        description="An extension: the exact integer rates the proxy charges, nano-units per 1M."
    )


class PriceList(Strict):
    object: Literal["list"] = "list"
    data: list[PriceRow]


class Currency(Strict):
    currency: str | None
