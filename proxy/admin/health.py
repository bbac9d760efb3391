"""Liveness and readiness: ``/healthz`` says the process runs; ``/readyz`` that it can admit
and settle — Redis answers, takes writes (not at ``maxmemory``) and has the admission scripts,
with ``durability = "replicated"`` enough replicas have finished their first sync, and the settle
spool can hold a settle — so load balancers route around a process that would answer 503 to
every call or lose the usage of the next outage."""

from __future__ import annotations

from aiohttp import web
from redis.exceptions import RedisError

from proxy.admin import readiness_checks
from proxy.admin.schemas import Health, Readiness, Unready
from proxy.gateway.state import GATEWAY
from proxy.ledger.scripts import ADMIT, PUT_BUDGET, RECLAIM, SETTLE, SETTLE_BATCH
from proxy.openapi import Reply, operation
from proxy.store.server_info import replication_shortfall

SCRIPTS = (ADMIT, SETTLE, SETTLE_BATCH, RECLAIM, PUT_BUDGET)


@operation(
    "Liveness", tag="operations", auth="none", answers=Reply(200, "The process runs.", Health)
)
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@operation(
    "Readiness",
    tag="operations",
    auth="none",
    answers=(
        Reply(200, "Redis answers and the admission scripts are loaded.", Readiness),
        Reply(
            503,
            "Redis cannot be reached or refuses writes, (durability = replicated) no replica "
            "has finished its first sync, or the settle spool cannot hold a settle: route "
            "around this process.",
            Unready,
        ),
    ),
)
async def readyz(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    try:
        loaded = await gw.redis.script_exists(*(s.sha for s in SCRIPTS))
        if not all(loaded):
            for script in SCRIPTS:
                await script.load(gw.redis)
        shortfall = None
        if gw.settings.redis.durability == "replicated":
            shortfall = await replication_shortfall(gw.redis, gw.settings.redis.replicas)
    except (RedisError, OSError) as exc:
        spool = await readiness_checks.spool_fault(gw.admission.deferred.spool)
        return web.json_response(
            {
                "status": "unavailable",
                "redis": f"unreachable: {type(exc).__name__}",
                "spool": spool or "ok",
            },
            status=503,
        )
    refused = await readiness_checks.refuses_writes(gw.redis)
    spool = await readiness_checks.spool_fault(gw.admission.deferred.spool)
    if refused or spool:
        body = {"status": "unavailable", "redis": refused or "ok", "spool": spool or "ok"}
        return web.json_response(body, status=503)
    if shortfall is not None and shortfall.everywhere:
        return web.json_response({"status": "unavailable", "redis": shortfall.detail}, status=503)
    if shortfall is not None:  # a cluster: orgs on the other shards are served
        return web.json_response({"status": "ready", "redis": f"ok except {shortfall.detail}"})
    return web.json_response({"status": "ready", "redis": "ok"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
