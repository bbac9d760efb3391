"""``GET /api/v1/webhooks/deliveries``: what was delivered, what failed and why, what is
queued, from the delivery records and the outbox."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from proxy.admin.access import OrgId
from proxy.admin.auth import caller_of
from proxy.admin.schemas import DeliveryStatus, WebhookDeliveryList
from proxy.errors import not_found
from proxy.gateway.state import GATEWAY
from proxy.ledger.keys import org_key
from proxy.ledger.windows import iso_millis
from proxy.openapi import Reply, operation, parse_query
from proxy.store.client import Redis

_LIST_DEFAULT, _LIST_MAX = 100, 1000
_RECORD_FIELDS = (
    "event",
    "budget",
    "status",
    "attempts",
    "last_error",
    "created_ms",
    "last_attempt_ms",
    "delivered_ms",
)


def _ms_iso(value: str | None) -> str | None:
    return iso_millis(int(value) / 1000) if value else None


def _delivery_view(
    org_id: str, event_id: str, fields: list[str | None], due_ms: float | None
) -> dict[str, Any] | None:
    record = dict(zip(_RECORD_FIELDS, fields, strict=True))
    if record["event"] is None or record["budget"] is None:
        return None
    event = json.loads(record["event"])
    budget = json.loads(record["budget"])
    status = record["status"] or "pending"
    return {
        "object": "webhook_delivery",
        "event_id": event_id,
        "org_id": org_id,
        "budget_id": event.get("budget_id"),
        "type": f"budget.{event.get('type')}",
        "url": budget.get("alert_webhook_url"),
        "status": status,
        "attempts": int(record["attempts"] or 0),
        "last_error": record["last_error"],
        "created_at": _ms_iso(record["created_ms"]),
        "last_attempt_at": _ms_iso(record["last_attempt_ms"]),
        "next_attempt_at": _ms_iso(str(int(due_ms))) if status == "pending" and due_ms else None,
        "delivered_at": _ms_iso(record["delivered_ms"]),
        "_created_ms": int(record["created_ms"] or 0),
    }


async def org_deliveries(redis: Redis, org_id: str, limit: int) -> list[dict[str, Any]]:
    """The org's newest delivery records: finished or attempted ones, and queued ones."""
    pipe = redis.pipeline(transaction=False)
    pipe.zrevrange(org_key(org_id, "whlog"), 0, limit - 1)
    pipe.zrange(org_key(org_id, "outbox"), 0, limit - 1)
    logged, queued = await pipe.execute()
    ids = list(dict.fromkeys([*logged, *queued]))
    pipe = redis.pipeline(transaction=False)
    for event_id in ids:
        pipe.hmget(org_key(org_id, "delivery", event_id), *_RECORD_FIELDS)
        pipe.zscore(org_key(org_id, "outbox"), event_id)
    replies = await pipe.execute()
    views = [
        _delivery_view(org_id, event_id, replies[2 * i], replies[2 * i + 1])
        for i, event_id in enumerate(ids)
    ]
    return [v for v in views if v is not None]


class DeliveriesQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    status: DeliveryStatus | None = None
    limit: int = Field(_LIST_DEFAULT, ge=1, le=_LIST_MAX, description="Newest first.")
    org_id: OrgId | None = Field(None, description="Only this org's (cluster admins).")


@operation(
    "List webhook deliveries",
    tag="webhooks",
    auth="admin",
    query=DeliveriesQuery,
    answers=Reply(200, "Deliveries with status, attempts and last error.", WebhookDeliveryList),
    errors={404: "No such org, or another org than the caller's."},
)
async def list_deliveries(request: web.Request) -> web.Response:
    """Cluster admins: every org, or ``?org_id=``; org admins: their org; others: 403."""
    gw = request.app[GATEWAY]
    caller = caller_of(request)
    query = parse_query(DeliveriesQuery, request.query)
    status, limit, wanted = query.status, query.limit, query.org_id
    if wanted is not None:
        if caller.role != "cluster_admin" and wanted != caller.org_id:
            raise not_found(f"No org '{wanted}'.")
    if caller.role == "cluster_admin":
        orgs = [wanted] if wanted is not None else await gw.keys.orgs()
    else:
        orgs = [caller.org_id]
    data: list[dict[str, Any]] = []
    for org_id in orgs:
        data.extend(await org_deliveries(gw.redis, org_id, limit))
    if status is not None:
        data = [d for d in data if d["status"] == status]
    data.sort(key=lambda d: (d["_created_ms"], d["event_id"]), reverse=True)
    for d in data:
        del d["_created_ms"]
    return web.json_response({"object": "list", "data": data[:limit]})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/webhooks/deliveries", list_deliveries)
