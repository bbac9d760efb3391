"""The admission every billable route shares: auth → model → reserve → admit → forward → settle.

A route's API (OpenAI's or Anthropic's) is a ``Dialect``: how its clients pass their key, how a
request's worst case is reserved, and how it is forwarded and metered. Everything else — key
checks, model permissions, the one admit call, the lease kept alive, the settle that runs
exactly once — is here, so no route can forward a request without it.

Every admitted request is settled exactly once — on success, upstream error, timeout, and when
the client goes away mid-stream — in a ``finally`` that cancellation cannot skip.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web
from redis.exceptions import RedisError

from proxy.config import Protocol as ApiProtocol
from proxy.errors import ApiError, bad_request, store_unavailable, unauthorized
from proxy.gateway.admission import (
    Admitted,
    BudgetRefused,
    ClampTerms,
    Decision,
    EndUserRequired,
    RateLimited,
    Revoked,
)
from proxy.gateway.body import read_json
from proxy.gateway.decisions import budget_error, end_user_required, rate_limited_error
from proxy.gateway.metering import Usage, check_reservation
from proxy.gateway.model_routes import ModelRoute, UnpricedModel
from proxy.gateway.request_context import OUTCOME, new_request_id
from proxy.gateway.state import GATEWAY, Gateway
from proxy.store.end_users import MAX_END_USER_ID, end_user_tag, valid_end_user
from proxy.store.keys import Identity
from proxy.store.server_info import unavailable_reason

# A model serves the endpoints of its kind only (an embedding model on chat answered 200).
_KIND_ENDPOINTS = {
    "chat": frozenset(
        {"chat/completions", "completions", "responses", "messages", "messages/count_tokens"}
    ),
    "embedding": frozenset({"embeddings"}),
}
CLAMP_HEADER = "x-budget-clamp"
_OTHER_ROUTE = {
    "anthropic": "it is served over Anthropic's Messages API: use POST /v1/messages",
    "openai": "it is served over the OpenAI API: use /v1/chat/completions or /v1/responses",
}


@dataclass(frozen=True, slots=True)
class Reservation:
    """What a request may cost at most, fixed before it is admitted."""

    prompt_tokens: int
    """Prompt tokens as counted (OpenAI: tiktoken) or bounded (Anthropic) by the proxy."""
    output_tokens: int
    """The output cap reserved."""
    cost_nano: int
    stream: bool = False
    cap_param: str | None = None
    """The request parameter that set the output cap, named when the worst case is refused."""
    choices: int = 1
    """Answers the output cap applies to each (OpenAI's ``n``)."""
    input_cost: int | None = None
    """The prompt's part of the cost in nano-units x 1M (tokens x rate per 1M), when the
    output cap may be lowered (clamped): then ``cost_nano`` = ceil((input_cost + output x
    output_rate) / 1M)."""
    output_rate: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens

    def clamp_terms(self, lowest: int) -> ClampTerms | None:
        """None when the cap cannot be lowered: no output, already at or below ``lowest``, or
        a cost that does not follow the clamp formula exactly."""
        if self.input_cost is None or self.choices < 1 or self.output_tokens % self.choices:
            return None
        cap = self.output_tokens // self.choices
        if cap <= lowest:
            return None
        if -(-(self.input_cost + self.output_tokens * self.output_rate) // 1_000_000) != (
            self.cost_nano
        ):
            return None
        return ClampTerms(self.choices, cap, lowest, self.input_cost, self.output_rate)


@dataclass
class Exchange:
    """One admitted request, from reservation to settlement."""

    identity: Identity
    request_id: str
    endpoint: str
    route: ModelRoute
    prompt_tokens: int
    on_behalf_of: str | None
    usage: Usage | None = None
    status: int = 0
    client_gone: bool = False
    upstream_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    upstream: str = ""
    """The upstream that served (the first of the model's list unless a fallback did)."""
    output_cap: int = 0
    clamped_cap: int | None = None
    """The lowered output cap per choice the upstream gets, when the request was clamped."""


class Dialect(Protocol):
    """What differs between the APIs clients speak."""

    protocol: ApiProtocol

    def api_key(self, request: web.Request) -> str:
        """The client's proxy key; raises a 401 ``ApiError`` when it sent none."""
        ...

    async def reserve(
        self, headers: Mapping[str, str], endpoint: str, body: dict[str, Any], route: ModelRoute
    ) -> Reservation:
        """Validates what the reservation depends on (400 naming the param) and bounds it
        (``headers``: the request's, case-insensitive)."""
        ...

    def refusal_headers(self, decision: RateLimited, now: float) -> dict[str, str]:
        """Extra headers on a rate-limit refusal."""
        ...

    async def forward(
        self,
        request: web.Request,
        gw: Gateway,
        exchange: Exchange,
        body: dict[str, Any],
        reservation: Reservation,
        decision: Admitted,
    ) -> web.StreamResponse:
        """Sends the admitted request upstream and relays the answer, leaving the usage in
        ``exchange.usage`` (also when the client or the upstream breaks off)."""
        ...


def on_behalf_of(request: web.Request) -> str | None:
    value = request.headers.get("X-On-Behalf-Of")
    if value is None:
        return None
    if not valid_end_user(value):
        raise bad_request(
            f"X-On-Behalf-Of must be 1-{MAX_END_USER_ID} printable characters.",
            param="X-On-Behalf-Of",
        )
    return value


def clamp_asked(headers: Mapping[str, str]) -> bool:
    value = headers.get(CLAMP_HEADER)
    if value is None:
        return False
    if value.lower() not in ("true", "false"):
        raise bad_request(f"{CLAMP_HEADER} must be 'true' or 'false'.", param=CLAMP_HEADER)
    return value.lower() == "true"


@dataclass(slots=True)  # per request: not frozen (a frozen __init__ costs several times more)
class Prepared:
    """Everything admission needs to know about a request before it is admitted."""

    route: ModelRoute
    reservation: Reservation
    clamp: ClampTerms | None
    clamp_asked: bool


async def prepare(
    gw: Gateway,
    dialect: Dialect,
    identity: Identity,
    endpoint: str,
    body: dict[str, Any],
    headers: Mapping[str, str],
) -> Prepared:
    """Model, reservation and clamp terms of a request: shared by the LLM routes and the quote
    endpoint, so a quote is priced exactly as the request itself would be."""
    route = model_route(gw, body, identity, dialect.protocol, endpoint)
    reservation = await dialect.reserve(headers, endpoint, body, route)
    check_reservation(reservation.tokens, reservation.cost_nano, reservation.cap_param)
    lowest = gw.settings.budgets.clamp_min_output_tokens
    return Prepared(route, reservation, reservation.clamp_terms(lowest), clamp_asked(headers))


async def decide(
    gw: Gateway,
    identity: Identity,
    request_id: str,
    endpoint: str,
    prepared: Prepared,
    end_user: str | None,
    dry_run: bool = False,
) -> Decision:
    reservation = prepared.reservation
    return await gw.admission.admit(
        identity,
        request_id,
        reservation.tokens,
        reservation.cost_nano,
        prompt_tokens=reservation.prompt_tokens,
        model=prepared.route.name,
        endpoint=endpoint,
        end_user=end_user,
        end_user_tag=end_user_tag(end_user) if end_user is not None else "",
        clamp=prepared.clamp,
        clamp_asked=prepared.clamp_asked,
        dry_run=dry_run,
    )


def refusal(
    gw: Gateway,
    decision: Decision,
    dialect: Dialect,
    identity: Identity,
    end_user: str | None,
    reservation: Reservation,
) -> ApiError | None:
    """The error a refused request gets (None when admitted)."""
    if isinstance(decision, RateLimited):
        error = rate_limited_error(
            decision, reservation.tokens if decision.limit_name == "tpm" else 1
        )
        error.headers.update(dialect.refusal_headers(decision, gw.clock()))
        return error
    if isinstance(decision, BudgetRefused):
        now = gw.clock()
        return budget_error(
            decision, gw.admission.windows(now), now, org_id=identity.org_id, end_user=end_user
        )
    if isinstance(decision, EndUserRequired):
        return end_user_required()
    if isinstance(decision, Revoked):
        return unauthorized("Incorrect API key provided (unknown or revoked).")
    return None


def model_route(
    gw: Gateway, body: dict[str, Any], identity: Identity, protocol: ApiProtocol, endpoint: str
) -> ModelRoute:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("You must provide a model parameter.", param="model")
    try:
        route = gw.routes.get(model)
    except UnpricedModel as exc:
        raise ApiError(404, str(exc), code="model_not_found", param="model") from None
    if route is None:
        raise ApiError(
            404,
            f"The model '{model}' does not exist or you do not have access to it.",
            code="model_not_found",
            param="model",
        )
    if identity.models is not None and not any(
        identity.may_use(name) for name in (model, route.name, route.entry)
    ):
        raise ApiError(
            403,
            f"This API key is not allowed to use the model '{model}'.",
            type="permission_error",
            code="model_not_allowed",
            param="model",
        )
    if endpoint not in _KIND_ENDPOINTS.get(route.kind, frozenset()):
        raise ApiError(
            400,
            f"The model '{model}' is a {route.kind} model and is not served on {endpoint}.",
            code="model_not_supported",
            param="model",
        )
    if route.protocol != protocol:
        raise bad_request(
            f"The model '{model}' is not available on this endpoint: "
            f"{_OTHER_ROUTE[route.protocol]}.",
            param="model",
            code="wrong_endpoint",
        )
    return route


async def handle(request: web.Request, endpoint: str, dialect: Dialect) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    started = time.perf_counter()
    outcome: dict[str, Any] = {"endpoint": endpoint, "decision": "auth"}
    request[OUTCOME] = outcome
    identity = await gw.auth.identify_key(dialect.api_key(request))
    outcome.update(key_id=identity.key_id, org_id=identity.org_id, decision="invalid")
    outcome["on_behalf_of"] = end_user = on_behalf_of(request)
    body = await read_json(request)
    prepared = await prepare(gw, dialect, identity, endpoint, body, request.headers)
    route, reservation = prepared.route, prepared.reservation
    outcome["model"] = route.name
    request_id = new_request_id()
    outcome["request_id"] = request_id
    exchange = Exchange(identity, request_id, endpoint, route, reservation.prompt_tokens, end_user)
    exchange.upstream = route.upstream.name
    exchange.output_cap = reservation.output_tokens
    try:
        decision = await _admit(
            gw, identity, request_id, prepared, outcome, dialect, endpoint, end_user
        )
    except asyncio.CancelledError:
        # The client left while Redis decided; the admit was already sent and may have
        # reserved. A settle queued behind it releases that reservation at once, charging
        # nothing (nothing was forwarded), instead of leaving it to the lease's expiry; when
        # nothing was reserved the settle finds no lease and does nothing.
        exchange.client_gone = True
        await settle(gw, exchange, outcome)
        raise
    outcome["decision"] = "admitted"
    outcome["overhead_before_ms"] = (time.perf_counter() - started) * 1000
    if decision.clamped_cap is not None:
        exchange.clamped_cap = decision.clamped_cap
        exchange.output_cap = decision.clamped_cap * reservation.choices
        outcome["clamped_max_tokens"] = decision.clamped_cap
    lease = gw.admission.keep_alive(identity.org_id, request_id)
    try:
        return await dialect.forward(request, gw, exchange, body, reservation, decision)
    finally:
        lease.cancel()
        # Not shielded: the settle command is queued on the Redis connection before this
        # coroutine can be interrupted, so even a cancelled handler's request is settled.
        await settle(gw, exchange, outcome)


async def _admit(
    gw: Gateway,
    identity: Identity,
    request_id: str,
    prepared: Prepared,
    outcome: dict[str, Any],
    dialect: Dialect,
    endpoint: str,
    end_user: str | None,
) -> Admitted:
    try:
        decision = await decide(gw, identity, request_id, endpoint, prepared, end_user)
    except (RedisError, OSError) as exc:
        outcome["decision"] = "store_unavailable"
        raise store_unavailable(unavailable_reason(exc)) from None
    if isinstance(decision, Admitted):
        return decision
    if isinstance(decision, RateLimited):
        outcome["decision"] = f"rate_limit_{decision.limit_name}"
    elif isinstance(decision, BudgetRefused):
        outcome["decision"] = "budget"
    elif isinstance(decision, Revoked):
        outcome["decision"] = "auth"
        gw.auth.forget()
    error = refusal(gw, decision, dialect, identity, end_user, prepared.reservation)
    assert error is not None
    raise error


async def settle(gw: Gateway, exchange: Exchange, outcome: dict[str, Any]) -> None:
    usage = exchange.usage or Usage(0, 0, reported=False)
    cost = usage.cost_nano(exchange.route.price)
    record: dict[str, str | int | None] = {
        "rid": exchange.request_id,
        "kid": exchange.identity.key_id,
        "user": exchange.on_behalf_of,
        "model": exchange.route.name,
        "endpoint": exchange.endpoint,
        "in": usage.input_tokens,
        "out": usage.output_tokens,
        "cached": usage.cached_tokens,
        "cache_write": usage.cache_write_tokens,
        "cache_write_1h": usage.cache_write_1h_tokens,
        "reasoning": usage.reasoning_tokens,
        "cost_nano": cost,
        "reported": int(usage.reported),
        "status": exchange.status,
        "client_gone": int(exchange.client_gone),
        "upstream": exchange.upstream,
    }
    outcome.update(
        status_upstream=exchange.status,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cost_nano=cost,
        upstream_ms=exchange.upstream_ms,
        client_gone=exchange.client_gone,
        upstream=exchange.upstream,
        **exchange.extra,
    )
    await gw.admission.settle(
        gw.admission.settle_request(
            exchange.identity, exchange.request_id, usage.total_tokens, cost, record
        )
    )
