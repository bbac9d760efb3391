"""Liveness and readiness: ``/healthz`` says the process runs; ``/readyz`` that it can admit
(Redis answers, the admission scripts are loaded and, with ``durability = "replicated"``, enough
replicas have finished their first sync), so load balancers route around it while Redis is away
or a replica is still syncing."""

from __future__ import annotations

from aiohttp import web
from redis.exceptions import RedisError

from proxy.admin.schemas import Health, Readiness
from proxy.gateway.admission import ADMIT, RECLAIM, SETTLE
from proxy.gateway.state import GATEWAY
from proxy.openapi import Reply, operation
from proxy.store.budgets import PUT_BUDGET
from proxy.store.server_info import replication_shortfall

SCRIPTS = (ADMIT, SETTLE, RECLAIM, PUT_BUDGET)


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
            "Redis cannot be reached, or (durability = replicated) no replica has finished "
            "its first sync: route around this process.",
            Readiness,
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
        return web.json_response(
            {"status": "unavailable", "redis": f"unreachable: {type(exc).__name__}"}, status=503
        )
    if shortfall is not None and shortfall.everywhere:
        return web.json_response({"status": "unavailable", "redis": shortfall.detail}, status=503)
    if shortfall is not None:  # a cluster: orgs on the other shards are served
        return web.json_response({"status": "ready", "redis": f"ok except {shortfall.detail}"})
    return web.json_response({"status": "ready", "redis": "ok"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
