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
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.gateway import metrics
from proxy.gateway.request_context import OUTCOME, REQUEST_ID, new_request_id

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
        # The client went away before its answer was complete, or was cut off at the
        # exchange's deadline (timeouts.total_seconds).
        timed_out = (request.get(OUTCOME) or {}).get("upstream_error") == "timeout"
        status = 504 if timed_out else CLIENT_CLOSED
        raise
    finally:
        elapsed_ms = (time.perf_counter() - started) * 1000
        outcome: dict[str, Any] = request.get(OUTCOME) or {}
        if outcome:
            _record_metrics(outcome, status, elapsed_ms)
        if log.isEnabledFor(logging.INFO):
            _log_line(request, outcome, status, elapsed_ms)


def _record_metrics(outcome: dict[str, Any], status: int, elapsed_ms: float) -> None:
    endpoint = outcome["endpoint"]
    model = outcome.get("model_label") or outcome.get("model", "")
    decision = outcome.get("decision", "")
    upstream_ms = outcome.get("upstream_ms", 0.0)
    overhead_ms = max(elapsed_ms - upstream_ms, 0.0)
    metrics.child(metrics.REQUESTS, endpoint, model, str(status)).inc()
    metrics.child(metrics.DECISIONS, decision).inc()
    metrics.child(metrics.OVERHEAD, endpoint).observe(overhead_ms / 1000)
    if decision == "admitted":
        org = outcome.get("org_id", "")
        metrics.child(metrics.UPSTREAM_TIME, model).observe(upstream_ms / 1000)
        metrics.child(metrics.TOKENS, model, org, "input").inc(outcome.get("input_tokens", 0))
        metrics.child(metrics.TOKENS, model, org, "output").inc(outcome.get("output_tokens", 0))
        metrics.child(metrics.COST, model, org).inc(outcome.get("cost_nano", 0))
        upstream_status = outcome.get("status_upstream", 0)
        error = outcome.get("upstream_error")
        if error or upstream_status >= 500:
            metrics.UPSTREAM_ERRORS.labels(
                outcome.get("upstream", ""), error or f"http_{upstream_status}"
            ).inc()


def _log_line(
    request: web.Request, outcome: dict[str, Any], status: int, elapsed_ms: float
) -> None:
    upstream_ms = outcome.get("upstream_ms", 0.0)
    line = {
        "ts": round(time.time(), 3),
        "request_id": request[REQUEST_ID],
        "accounting_id": outcome.get("request_id"),
        "method": request.method,
        "path": request.path,
        "key_id": outcome.get("key_id"),
        "org_id": outcome.get("org_id"),
        "on_behalf_of": outcome.get("on_behalf_of"),
        "model": outcome.get("model"),
        "upstream": outcome.get("upstream"),
        "fallback_from": outcome.get("fallback_from"),
        "status": status,
        "decision": outcome.get("decision"),
        "input_tokens": outcome.get("input_tokens"),
        "output_tokens": outcome.get("output_tokens"),
        "cost_nano": outcome.get("cost_nano"),
        "clamped_max_tokens": outcome.get("clamped_max_tokens"),
        "overhead_ms": round(max(elapsed_ms - upstream_ms, 0.0), 3),
        "upstream_ms": round(upstream_ms, 3) if outcome else None,
        "client_gone": outcome.get("client_gone") or None,
    }
    log.info(json.dumps({k: v for k, v in line.items() if v is not None}))
