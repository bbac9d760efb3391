"""The request path every billable route shares: auth → model → reserve → admit → forward →
settle, top to bottom in ``handle``.

A route's API (OpenAI's, Anthropic's, ...) is a ``proxy.dialects.Dialect``: how its clients
pass their key, how a request's worst case is reserved, the body its upstream gets and how the
answer is metered. Everything else — key checks, model permissions, the one admit call, the
lease kept alive, forwarding (``proxy.gateway.forward``), the settle that runs exactly once —
is here, so no route can forward a request without it.

Every admitted request is settled exactly once — on success, upstream error, timeout, and when
the client goes away mid-stream — in a ``finally`` that cancellation cannot skip.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from proxy.catalog.routes import ModelRoute, UnpricedModel
from proxy.dialects import Dialect, by_name
from proxy.dialects.base import Reservation, Usage
from proxy.errors import ApiError, bad_request, store_unavailable, unauthorized
from proxy.gateway.body import read_form, read_json
from proxy.gateway.decisions import (
    budget_error,
    dialect_refusal_headers,
    end_user_required,
    end_users_capped,
    rate_limited_error,
)
from proxy.gateway.exchange import Exchange
from proxy.gateway.forward import forward
from proxy.gateway.request_context import OUTCOME, Outcome, new_request_id
from proxy.gateway.state import GATEWAY, Gateway
from proxy.gateway.stored import note_stored
from proxy.gateway.worst_case import check_reservation, clamp_asked, clamp_terms
from proxy.ledger.admission import (
    Admitted,
    BudgetRefused,
    ClampTerms,
    Decision,
    EndUserRequired,
    EndUsersCapped,
    RateLimited,
    Revoked,
)
from proxy.ledger.api_keys import Identity
from proxy.ledger.end_users import MAX_END_USER_ID, valid_end_user
from proxy.ledger.keys import end_user_tag
from proxy.ledger.records import UsageRecord
from proxy.store.server_info import unavailable_reason


def on_behalf_of(request: web.Request) -> str | None:
    given = request.headers.getall("X-On-Behalf-Of", ())
    if not given:
        return None
    if len(given) > 1:  # which one would be charged? Refused, as a doubled identity is.
        raise bad_request("X-On-Behalf-Of must be sent once.", param="X-On-Behalf-Of")
    value = given[0]
    if not valid_end_user(value):
        raise bad_request(
            f"X-On-Behalf-Of must be 1-{MAX_END_USER_ID} printable characters.",
            param="X-On-Behalf-Of",
        )
    return value


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
    params: Mapping[str, str] = MappingProxyType({}),
) -> Prepared:
    """Model, reservation and clamp terms of a request: shared by the LLM routes and the quote
    endpoint, so a quote is priced exactly as the request itself would be. ``params``: the
    route's path parameters (a model named in the path; none for a quote)."""
    model = dialect.requested_model(params, body)
    route = model_route(gw, model, identity, dialect, endpoint)
    reservation = await dialect.reserve(headers, endpoint, body, route)
    check_reservation(reservation.tokens, reservation.cost_nano, reservation.cap_param)
    lowest = gw.settings.budgets.clamp_min_output_tokens
    return Prepared(route, reservation, clamp_terms(reservation, lowest), clamp_asked(headers))


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
        model=prepared.route.counted_as,  # counters: a bounded name, never a client's
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
        error.headers.update(dialect_refusal_headers(dialect, decision, gw.clock()))
        return error
    if isinstance(decision, BudgetRefused):
        now = gw.clock()
        return budget_error(
            decision, gw.admission.windows(now), now, org_id=identity.org_id, end_user=end_user
        )
    if isinstance(decision, EndUserRequired):
        return end_user_required()
    if isinstance(decision, EndUsersCapped):
        now = gw.clock()
        return end_users_capped(decision.cap, gw.admission.windows(now).monthly_end - now)
    if isinstance(decision, Revoked):
        return unauthorized("Incorrect API key provided (unknown or revoked).")
    return None


def model_route(
    gw: Gateway, model: object, identity: Identity, dialect: Dialect, endpoint: str
) -> ModelRoute:
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
    # A model serves the endpoints of its kind only (an embedding model on chat answered 200).
    if dialect.endpoint_kinds.get(endpoint) != route.kind:
        raise ApiError(
            400,
            f"The model '{model}' is a {route.kind} model and is not served on {endpoint}.",
            code="model_not_supported",
            param="model",
        )
    if route.dialect != dialect.name:
        raise bad_request(
            f"The model '{model}' is not available on this endpoint: "
            f"{by_name(route.dialect).served_at}.",
            param="model",
            code="wrong_endpoint",
        )
    return route


async def handle(request: web.Request, endpoint: str, dialect: Dialect) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    outcome = request[OUTCOME] = Outcome(endpoint)
    identity = await gw.auth.identify_key(dialect.api_key(request))
    outcome.key_id, outcome.org_id, outcome.decision = identity.key_id, identity.org_id, "invalid"
    outcome.on_behalf_of = end_user = on_behalf_of(request)
    if endpoint in dialect.form_endpoints:
        body = await read_form(request, identity.key_id, gw.bodies)
    else:
        body = await read_json(request, identity.key_id, gw.bodies)
    prepared = await prepare(
        gw, dialect, identity, endpoint, body, request.headers, request.match_info
    )
    route, reservation = prepared.route, prepared.reservation
    outcome.model = route.name
    outcome.model_label = route.counted_as  # bounded: never a name a client invented
    outcome.request_id = request_id = new_request_id()
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
        gw.settles.finish(settle(gw, exchange))
        raise
    outcome.decision = "admitted"
    outcome.exchange = exchange
    if decision.clamped_cap is not None:
        exchange.clamped_cap = decision.clamped_cap
        exchange.output_cap = decision.clamped_cap * reservation.choices
        outcome.clamped_max_tokens = decision.clamped_cap
    lease = gw.admission.keep_alive(identity.org_id, request_id)
    try:
        return await forward(request, gw, dialect, exchange, body, reservation, decision)
    finally:
        lease.cancel()
        try:
            await settle(gw, exchange)
        except asyncio.CancelledError:
            # The client left while the settle waited (Redis slow or down): the settle is run
            # again in a task of its own, which no client can cancel, so the usage reaches
            # Redis or the spool; settles are idempotent, so one that had landed is a no-op.
            gw.settles.finish(settle(gw, exchange))
            raise


async def _admit(
    gw: Gateway,
    identity: Identity,
    request_id: str,
    prepared: Prepared,
    outcome: Outcome,
    dialect: Dialect,
    endpoint: str,
    end_user: str | None,
) -> Admitted:
    try:
        decision = await decide(gw, identity, request_id, endpoint, prepared, end_user)
    except (RedisError, OSError) as exc:
        outcome.decision = "store_unavailable"
        raise store_unavailable(unavailable_reason(exc)) from None
    if isinstance(decision, Admitted):
        return decision
    if isinstance(decision, RateLimited):
        outcome.decision = f"rate_limit_{decision.limit_name}"
    elif isinstance(decision, BudgetRefused):
        outcome.decision = "budget"
    elif isinstance(decision, Revoked):
        outcome.decision = "auth"
        gw.auth.forget()
    elif isinstance(decision, EndUsersCapped):
        outcome.decision = "end_user_limit"
    error = refusal(gw, decision, dialect, identity, end_user, prepared.reservation)
    assert error is not None
    raise error


async def settle(gw: Gateway, exchange: Exchange) -> None:
    usage = exchange.usage or Usage(0, 0, reported=False)
    exchange.cost_nano = cost = usage.cost_nano(exchange.route.price)
    record = UsageRecord(
        rid=exchange.request_id,
        kid=exchange.identity.key_id,
        user=exchange.on_behalf_of,
        model=exchange.route.name,
        endpoint=exchange.endpoint,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cached_tokens=usage.cached_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        cache_write_1h_tokens=usage.cache_write_1h_tokens,
        reasoning_tokens=usage.reasoning_tokens,
        cost_nano=cost,
        reported=usage.reported,
        status=exchange.status,
        client_gone=exchange.client_gone,
        upstream=exchange.upstream,
        usage_model=exchange.route.counted_as,
    )
    await gw.admission.settle(
        gw.admission.settle_request(
            exchange.identity, exchange.request_id, usage.total_tokens, cost, record
        )
    )
    if usage.stored_id is not None:  # the org that paid for a stored response may read it
        await note_stored(gw, exchange.identity.org_id, usage.stored_id, exchange.upstream)
