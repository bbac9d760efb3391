"""One structured JSON line and one set of metrics per request, from what the handler noted.

Never logged: keys, prompts, answers, upstream credentials. The end-user id from
``X-On-Behalf-Of`` is logged (operators asked for it) but kept out of metric labels.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.gateway import metrics
from proxy.gateway.exchange import Exchange
from proxy.gateway.request_context import OUTCOME, REQUEST_ID, Outcome, new_request_id

ACCESS_LOGGER = "llm_proxy.access"
log = logging.getLogger(ACCESS_LOGGER)


def configure_logging(level: int | str) -> None:
    """For a process of the proxy: diagnostics go to stderr, the access log (one JSON line per
    request, data for log shippers) to stdout, each line once."""
    logging.basicConfig(level=level, format="%(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_not_access)
    if not any(getattr(h, "llm_proxy_access", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.llm_proxy_access = True  # type: ignore[attr-defined]
        log.addHandler(handler)


def _not_access(record: logging.LogRecord) -> bool:
    return record.name != ACCESS_LOGGER


CLIENT_CLOSED = 499
"""Logged (as nginx does) for a request whose client left before its answer was complete."""


def _request_id(request: web.Request) -> str:
    """A caller's ``x-request-id`` is echoed for correlation, never used for accounting."""
    given = request.headers.get("x-request-id", "")
    if 0 < len(given) <= 128 and given.isprintable():
        return given
    return new_request_id()


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    request_id = request.get(REQUEST_ID)
    if request_id:
        response.headers["x-request-id"] = request_id
    response.headers["Server"] = "llm-proxy"


@web.middleware
async def request_log_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request[REQUEST_ID] = _request_id(request)
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:
        # The client went away, or was cut off at the exchange's deadline
        # (timeouts.total_seconds). One that left after taking the whole answer got a 200.
        exchange = _exchange(request.get(OUTCOME))
        if exchange is not None and exchange.upstream_error == "timeout":
            status = 504
        elif exchange is not None and exchange.answered:
            status = 200
        else:
            status = CLIENT_CLOSED
        raise
    finally:
        elapsed_ms = (time.perf_counter() - started) * 1000
        outcome = request.get(OUTCOME)
        if outcome is not None:
            _record_metrics(outcome, status, elapsed_ms)
        if log.isEnabledFor(logging.INFO):
            _log_line(request, outcome, status, elapsed_ms)


def _exchange(outcome: Outcome | None) -> Exchange | None:
    return None if outcome is None else outcome.exchange


def _record_metrics(outcome: Outcome, status: int, elapsed_ms: float) -> None:
    endpoint = outcome.endpoint
    model = outcome.model_label or outcome.model or ""
    exchange = outcome.exchange
    upstream_ms = exchange.upstream_ms if exchange is not None else 0.0
    metrics.child(metrics.REQUESTS, endpoint, model, str(status)).inc()
    metrics.child(metrics.DECISIONS, outcome.decision).inc()
    metrics.child(metrics.OVERHEAD, endpoint).observe(max(elapsed_ms - upstream_ms, 0.0) / 1000)
    if exchange is None:
        return
    org = outcome.org_id or ""
    usage = exchange.usage
    metrics.child(metrics.UPSTREAM_TIME, model).observe(upstream_ms / 1000)
    metrics.child(metrics.TOKENS, model, org, "input").inc(usage.input_tokens if usage else 0)
    metrics.child(metrics.TOKENS, model, org, "output").inc(usage.output_tokens if usage else 0)
    metrics.child(metrics.COST, model, org).inc(exchange.cost_nano)
    error = exchange.upstream_error
    if error or exchange.status >= 500:
        metrics.UPSTREAM_ERRORS.labels(exchange.upstream, error or f"http_{exchange.status}").inc()


def _log_line(
    request: web.Request, outcome: Outcome | None, status: int, elapsed_ms: float
) -> None:
    exchange = _exchange(outcome)
    usage = exchange.usage if exchange is not None else None
    upstream_ms = exchange.upstream_ms if exchange is not None else 0.0
    line = {
        "ts": round(time.time(), 3),
        "request_id": request[REQUEST_ID],
        "accounting_id": outcome.request_id if outcome else None,
        "method": request.method,
        "path": request.path,
        "key_id": outcome.key_id if outcome else None,
        "org_id": outcome.org_id if outcome else None,
        "on_behalf_of": outcome.on_behalf_of if outcome else None,
        "model": outcome.model if outcome else None,
        "upstream": exchange.upstream if exchange else None,
        "fallback_from": exchange.fallback_from if exchange else None,
        "status": status,
        "decision": outcome.decision if outcome else None,
        "input_tokens": (usage.input_tokens if usage else 0) if exchange else None,
        "output_tokens": (usage.output_tokens if usage else 0) if exchange else None,
        "cost_nano": exchange.cost_nano if exchange else None,
        "clamped_max_tokens": outcome.clamped_max_tokens if outcome else None,
        "overhead_ms": round(max(elapsed_ms - upstream_ms, 0.0), 3),
        "upstream_ms": round(upstream_ms, 3) if outcome else None,
        "client_gone": (exchange.client_gone or None) if exchange else None,
    }
    log.info(json.dumps({k: v for k, v in line.items() if v is not None}))
