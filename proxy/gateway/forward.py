"""Forwarding an admitted request, once for every dialect: the dialect's body for each upstream
tried, the answer relayed (``proxy.gateway.relay``) and metered with the dialect's parsing,
and its headers carrying the admission's limits in the dialect's names too."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from proxy.dialects.base import Dialect, Reservation
from proxy.gateway import relay
from proxy.gateway.answer_cost import add_cost_headers, costing
from proxy.gateway.decisions import admitted_headers, with_dialect_limits
from proxy.gateway.exchange import Exchange
from proxy.gateway.state import Gateway
from proxy.ledger.admission import Admitted
from proxy.providers import fallback


async def forward(
    request: web.Request,
    gw: Gateway,
    dialect: Dialect,
    exchange: Exchange,
    body: dict[str, Any],
    reservation: Reservation,
    decision: Admitted,
) -> web.StreamResponse:
    """Sends the admitted request upstream and relays the answer, leaving the usage in
    ``exchange.usage`` (also when the client or the upstream breaks off)."""
    raw = await request.read()
    endpoint, stream, clamped_cap = exchange.endpoint, reservation.stream, exchange.clamped_cap
    exchange.upstream_endpoint = dialect.upstream_endpoint(endpoint, request)
    bodies: dict[str, tuple[bytes, bool]] = {}

    def body_for(candidate: fallback.Candidate) -> bytes:
        # Upstreams of one model may name it differently (an Azure deployment): one body each.
        sent = bodies.get(candidate.model)
        if sent is None:
            sent = bodies[candidate.model] = dialect.upstream_body(
                raw, body, endpoint, candidate.model, stream, clamped_cap
            )
        return sent[0]

    body_for(exchange.route.upstreams[0])  # an invalid body is a 400 before anything is sent
    sent_at = time.perf_counter()
    form = endpoint in dialect.form_endpoints  # sent under the client's own boundary
    content_type = request.headers["Content-Type"] if form else "application/json"
    served = await relay.send(request, gw, exchange, body_for, content_type)
    upstream = served.response
    try:
        exchange.status = upstream.status
        limits = with_dialect_limits(dialect, decision, gw.clock(), admitted_headers(decision))
        headers = relay.answer_headers(served, limits)
        framing = dialect.stream_framing(exchange.upstream_endpoint)
        metering = gw.settings.metering
        costed = metering.cost_in_answers
        streamed = relay.is_stream(served, framing.content_type)
        if not streamed and (binary := relay.binary_framing(served)) is not None:
            framing, streamed = binary, True  # audio: relayed as it arrives, never buffered
        if streamed:
            meter = dialect.stream_meter(
                endpoint,
                exchange.route,
                exchange.prompt_tokens,
                exchange.output_cap,
                bodies[served.candidate.model][1],
            )
            if costed:
                meter = costing(meter, dialect.name, exchange.route.price)
            return await relay.relay_stream(
                request, exchange, upstream, headers, meter, sent_at, framing
            )
        data = await relay.read_buffered(exchange, served, sent_at, dialect)
        if costed:  # what the settle will charge, from the same usage (no Redis round trip)
            add_cost_headers(headers, exchange.usage, exchange.route.price, metering.currency)
        return web.Response(status=upstream.status, body=data, headers=headers)
    finally:
        upstream.release()
