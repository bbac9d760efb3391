"""Prometheus metrics. Labels never carry keys, prompts or end-user ids: only endpoint,
model, status, decision, org and upstream, whose sets are bounded by configuration. The model
label is never the name a client chose (``ModelRoute.counted_as``): the configured name, or for
a name a pattern matched the price database's id of that model (a bounded set), or the pattern
itself — so clients cannot grow ``/metrics`` by inventing names.

With several workers (``serve --workers N``) the processes share a
``PROMETHEUS_MULTIPROC_DIR`` so any one of them answers for all.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import os
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from proxy.config import MetricsConfig
from proxy.errors import ApiError
from proxy.openapi import Reply, operation

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter(
    "llm_proxy_requests_total", "HTTP requests answered", ["endpoint", "model", "status"]
)
DECISIONS = Counter(
    "llm_proxy_admission_decisions_total",
    "Admission outcomes: admitted, budget, rate_limit_<limit>, auth, invalid, store_unavailable",
    ["decision"],
)
TOKENS = Counter("llm_proxy_tokens_total", "Tokens settled", ["model", "org", "direction"])
COST = Counter("llm_proxy_cost_nano_total", "Cost settled, nano-units", ["model", "org"])
OVERHEAD = Histogram(
    "llm_proxy_overhead_seconds",
    "Time a request spent in the proxy outside the upstream",
    ["endpoint"],
    buckets=_LATENCY_BUCKETS,
)
UPSTREAM_TIME = Histogram(
    "llm_proxy_upstream_seconds",
    "Time from sending to the upstream until its answer ended",
    ["model"],
    buckets=_UPSTREAM_BUCKETS,
)
UPSTREAM_ERRORS = Counter(
    "llm_proxy_upstream_errors_total", "Upstream failures", ["upstream", "kind"]
)
REDIS_TIME = Histogram(
    "llm_proxy_redis_seconds", "Redis script call latency", ["script"], buckets=_LATENCY_BUCKETS
)
WEBHOOKS = Counter("llm_proxy_webhook_deliveries_total", "Webhook delivery attempts", ["result"])
SETTLES_PENDING = Gauge(
    "llm_proxy_settles_pending",
    "Settles Redis has not taken yet, kept in the spool and retried",
    multiprocess_mode="livesum",
)
SETTLES_QUARANTINED = Counter(
    "llm_proxy_settles_quarantined_total",
    "Settles Redis kept refusing, set aside in the spool's quarantine file",
)
SETTLES_UNSPOOLED = Counter(
    "llm_proxy_settles_unspooled_total",
    "Settles Redis did not take that the spool could not write either (disk full, read-only):"
    " held in memory only",
)
LEASES_RECLAIMED = Counter(
    "llm_proxy_leases_reclaimed_total",
    "Leases of proxies that stopped renewing them, released and charged their reservation",
)
LEASES_SET_ASIDE = Gauge(
    "llm_proxy_leases_set_aside",
    "Lease records that could not be processed, kept out of admission's way (all orgs)",
    multiprocess_mode="max",
)


@functools.lru_cache(maxsize=8192)
def child(metric: Any, *labels: str) -> Any:
    """``metric.labels(...)`` takes a lock and builds a key per call; the hot path reuses it.
    Label sets are bounded by configuration (endpoints, models, orgs), hence the cache bound."""
    return metric.labels(*labels)


def _registry() -> CollectorRegistry | None:
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def _from_loopback(request: web.Request) -> bool:
    """The TCP peer itself (never X-Forwarded-For, which any client can write)."""
    try:
        address = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def add_routes(app: web.Application, config: MetricsConfig) -> None:
    """``/metrics`` labels spend by org, so it is never anonymous on a network: with a token
    configured it needs the token; without one it answers loopback callers only (a scraper on
    the same host, or behind a sidecar) and 403 to everyone else."""
    token = os.environ.get(config.token_env) if config.token_env else None

    @operation(
        "Prometheus metrics",
        tag="operations",
        auth="metrics",
        answers=Reply(
            200,
            "The metrics, in Prometheus' text format.",
            media="text/plain",
            schema={"type": "string"},
        ),
        errors={
            401: "A metrics token is configured and this is not it.",
            403: "No metrics token is configured and the caller is not on loopback.",
        },
    )
    async def metrics_handler(request: web.Request) -> web.Response:
        if token:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode("utf-8", "surrogateescape"), token.encode()
            ):
                raise ApiError(401, "Metrics need the metrics token.", type="authentication_error")
        elif not _from_loopback(request):
            raise ApiError(
                403,
                "Metrics are served to loopback callers only; set "
                f"{config.token_env or '[metrics] token_env'} to scrape them over the network "
                "with that token.",
                type="permission_error",
                code="metrics_token_required",
            )
        registry = _registry()
        body = generate_latest(registry) if registry is not None else generate_latest()
        response = web.Response(body=body)
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app.router.add_get("/metrics", metrics_handler)
