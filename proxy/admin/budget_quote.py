"""``POST /api/v1/llm/budgets/quote``: what a request would reserve and which budget or limit
would bind, without reserving or charging anything.

The quote runs the request path's own steps — the dialect's reservation, the clamp terms, and
the admit script itself with its dry-run flag, which returns the decision just before the
script's first write — so it cannot drift from a real admission on the same state. (Like any
admission, it reclaims leases whose proxy died.) Admins only: cluster admins for any key, org
admins for their org's keys.
"""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web
from multidict import CIMultiDict
from pydantic import BaseModel, ConfigDict, Field, field_validator

from proxy.admin.access import find_key
from proxy.admin.auth import caller_of
from proxy.dialects import ANTHROPIC, GEMINI, OPENAI, Dialect
from proxy.errors import ApiError, parse_body
from proxy.gateway import pipeline
from proxy.gateway.body import read_json
from proxy.gateway.decisions import admitted_headers, nano_to_major, period_of
from proxy.gateway.request_context import new_request_id
from proxy.gateway.state import GATEWAY, Gateway
from proxy.ledger.admission import Admitted, BudgetRefused, RateLimited
from proxy.ledger.api_keys import Identity, KeyRecord
from proxy.ledger.end_users import MAX_END_USER_ID, valid_end_user
from proxy.ledger.keys import budget_key_id, budget_owner, budget_scope
from proxy.ledger.windows import rfc3339
from proxy.openapi import Reply, operation

Endpoint = Literal[
    "chat/completions",
    "completions",
    "embeddings",
    "responses",
    "messages",
    "generateContent",
    "streamGenerateContent",
    "embedContent",
    "batchEmbedContents",
]
"""Gemini's methods take the model from the request body here (``"model": "gemini-…"``):
a quote has no path."""


class QuoteInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_key_id: str = Field(min_length=1)
    external_user_id: str | None = None
    endpoint: Endpoint = "chat/completions"
    request: dict[str, Any]
    """The LLM request's body, as the client would send it."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Request headers that change the reservation: ``x-budget-clamp``, ``anthropic-beta``."""

    @field_validator("external_user_id")
    @classmethod
    def _end_user(cls, value: str | None) -> str | None:
        if value is not None and not valid_end_user(value):
            raise ValueError(f"must be 1-{MAX_END_USER_ID} printable characters")
        return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QuoteWorstCase(_Strict):
    prompt_tokens: int
    output_tokens: int
    tokens: int
    cost_nano: str = Field(pattern=r"^[0-9]+$")
    cost: float


class QuoteClamp(_Strict):
    possible: bool = Field(description="Whether this request's output cap can be lowered.")
    asked: bool = Field(description="Whether the request asks for it (x-budget-clamp).")
    max_tokens: int | None = Field(description="The lowered cap per choice, when clamped.")


class QuoteReserved(_Strict):
    tokens: int
    cost_nano: str = Field(pattern=r"^[0-9]+$")
    cost: float


class QuoteResponse(_Strict):
    status: int = Field(description="What the real request would be answered.")
    headers: dict[str, str]
    body: Any = Field(description="The refusal's error body; null when admitted.")


class QuoteAnswer(_Strict):
    object: Literal["budget.quote"]
    api_key_id: str
    org_id: str
    external_user_id: str | None
    endpoint: Endpoint
    model: str | None
    worst_case: QuoteWorstCase | None
    clamp: QuoteClamp | None
    binding: dict[str, Any] | None = Field(
        description="The budget or limit that binds: the refusing one, or when admitted the "
        "budget with the smallest share of its line left after this reservation."
    )
    decision: Literal["admit", "clamp", "refuse"]
    reserved: QuoteReserved | None
    response: QuoteResponse


def _identity(record: KeyRecord) -> Identity:
    models = frozenset(record.models) if record.models is not None else None
    return Identity(record.id, record.org_id, record.role, models)


def _amount(value: int, unit: str) -> str:
    return nano_to_major(value) if unit == "c" else str(value)


def _binding(
    gw: Gateway, decision: Admitted | RateLimited | BudgetRefused, org_id: str, end_user: str | None
) -> dict[str, Any] | None:
    if isinstance(decision, RateLimited):
        return {
            "kind": "rate_limit",
            "scope": decision.scope,
            "limit_name": decision.limit_name,
            "limit": decision.limit,
            "current": decision.current,
            "retry_after_ms": decision.retry_after_ms if decision.retry_after_ms >= 0 else None,
        }
    if isinstance(decision, BudgetRefused):
        return None  # the refusal's error.budget says it all
    if decision.budget_field == "" or decision.budget_line is None:
        return None
    # Admitted: the budget with the smallest share of its line left after this reservation.
    field, unit = decision.budget_field, decision.budget_unit
    scope = budget_scope(field)
    window = decision.budget_window
    period = period_of(window)
    scope_id = {"apikey": budget_key_id(field), "external_user": end_user or ""}
    return {
        "kind": "budget",
        "scope": scope,
        "scope_id": scope_id.get(scope, org_id),
        "owner": budget_owner(field),
        "period": period,
        "window": window,
        "limit_kind": "cost" if unit == "c" else "tokens",
        "line": _amount(decision.budget_line, unit),
        "remaining_after": _amount(max(decision.budget_remaining or 0, 0), unit),
        "reset_at": rfc3339(gw.admission.windows(gw.clock()).end(period)),
    }


def _refused(answer: dict[str, Any], error: ApiError, dialect: Dialect) -> web.Response:
    answer["decision"] = "refuse"
    answer["reserved"] = None
    answer["response"] = {
        "status": error.status,
        "headers": error.headers,
        "body": error.body(dialect),
    }
    return web.json_response(answer)


@operation(
    "Quote a request: what it would reserve and what would bind",
    tag="budgets",
    auth="admin",
    body=QuoteInput,
    answers=Reply(200, "The dry run's decision; nothing reserved, nothing charged.", QuoteAnswer),
    errors={404: "No such API key (or one of another org)."},
    description="Runs the admission of a request body for a key (and end user) with the "
    "admit script's dry-run flag: the same reservation, clamp and checks as the real request, "
    "stopping before any write.",
)
async def quote(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    spec = parse_body(QuoteInput, await read_json(request))
    record = await find_key(gw.keys, caller_of(request), spec.api_key_id)
    identity = _identity(record)
    dialect: Dialect = (
        ANTHROPIC
        if spec.endpoint == "messages"
        else GEMINI
        if spec.endpoint in GEMINI.endpoints
        else OPENAI
    )
    end_user = spec.external_user_id
    answer: dict[str, Any] = {
        "object": "budget.quote",
        "api_key_id": identity.key_id,
        "org_id": identity.org_id,
        "external_user_id": end_user,
        "endpoint": spec.endpoint,
        "model": None,
        "worst_case": None,
        "clamp": None,
        "binding": None,
    }
    try:
        prepared = await pipeline.prepare(
            gw, dialect, identity, spec.endpoint, spec.request, CIMultiDict(spec.headers)
        )
    except ApiError as exc:  # the request itself is invalid: the answer it would get
        return _refused(answer, exc, dialect)
    reservation = prepared.reservation
    answer["model"] = prepared.route.name
    answer["worst_case"] = {
        "prompt_tokens": reservation.prompt_tokens,
        "output_tokens": reservation.output_tokens,
        "tokens": reservation.tokens,
        "cost_nano": str(reservation.cost_nano),
        "cost": float(nano_to_major(reservation.cost_nano)),
    }
    answer["clamp"] = {
        "possible": prepared.clamp is not None,
        "asked": prepared.clamp_asked,
        "max_tokens": None,
    }
    decision = await pipeline.decide(
        gw, identity, new_request_id(), spec.endpoint, prepared, end_user, dry_run=True
    )
    if not isinstance(decision, Admitted):
        if isinstance(decision, RateLimited):
            answer["binding"] = _binding(gw, decision, identity.org_id, end_user)
        error = pipeline.refusal(gw, decision, dialect, identity, end_user, prepared.reservation)
        assert error is not None
        if isinstance(decision, BudgetRefused):
            answer["binding"] = {"kind": "budget", **error.details["budget"]}
        return _refused(answer, error, dialect)
    answer["decision"] = "clamp" if decision.clamped_cap is not None else "admit"
    answer["clamp"]["max_tokens"] = decision.clamped_cap
    answer["reserved"] = {
        "tokens": decision.reserved_tokens,
        "cost_nano": str(decision.reserved_cost_nano),
        "cost": float(nano_to_major(decision.reserved_cost_nano)),
    }
    answer["binding"] = _binding(gw, decision, identity.org_id, end_user)
    answer["response"] = {"status": 200, "headers": admitted_headers(decision), "body": None}
    return web.json_response(answer)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/llm/budgets/quote", quote)
