"""A key's life after creation: its answer shape (expiry, metadata, last use) and rotation
(``POST /api/v1/keys/{keyId}/rotate``).

Rotation issues a new secret for the same key id. Everything the ledger keeps about a key —
limits, budgets, spend, usage — is keyed by the id, never by the secret, so all of it carries
over; only the digest index changes. With ``grace_seconds`` the old secret keeps working that
long (a deployment can roll the new one out), then Redis deletes its index entry.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from proxy.admin.access import find_key
from proxy.admin.auth import caller_of
from proxy.admin.schemas import ApiKeyRotated
from proxy.errors import bad_request, forbidden, parse_body
from proxy.gateway.body import read_json
from proxy.gateway.state import GATEWAY
from proxy.ledger.api_keys import LIMIT_FIELDS, KeyRecord
from proxy.openapi import Reply, operation

MAX_GRACE_SECONDS = 30 * 86_400


def key_json(record: KeyRecord, now: float) -> dict[str, Any]:
    """The API's ``ApiKey``: every limit named, null where unset; never the digest."""
    status = "expired" if record.status == "active" and record.expired(now) else record.status
    return {
        "object": "api_key",
        "id": record.id,
        "org_id": record.org_id,
        "name": record.name,
        "role": record.role,
        "status": status,
        "models": record.models,
        "limits": {name: record.limits.get(name) for name in LIMIT_FIELDS},
        "created_at": record.created_at,
        "key_prefix": record.prefix,
        "expires_at": record.expires_at,
        "metadata": record.metadata,
        "last_used_at": record.last_used_at,
        "rotated_at": record.rotated_at,
    }


class KeyRotate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_seconds: int = Field(
        0,
        ge=0,
        le=MAX_GRACE_SECONDS,
        strict=True,
        description="How long the previous secret keeps working (0: it stops at once).",
    )


@operation(
    "Rotate a key's secret",
    tag="keys",
    auth="admin",
    body=KeyRotate,
    answers=Reply(200, "The key with its new plaintext (shown this once).", ApiKeyRotated),
    errors={
        404: "No such key, or it belongs to another org.",
        400: "Invalid input, or the key is revoked (`code: key_revoked`).",
        403: "Org admins cannot rotate cluster_admin keys.",
    },
    description="The same key id, limits, budgets and spend; a new secret. Other processes "
    "may accept the previous secret for up to `[auth] cache_ttl_seconds` more.",
)
async def rotate_key(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    caller = caller_of(request)
    record = await find_key(gw.keys, caller, request.match_info["keyId"])
    if caller.role == "org_admin" and record.role == "cluster_admin":
        raise forbidden("Org admins cannot change or revoke cluster_admin keys.")
    spec = parse_body(KeyRotate, await read_json(request)) if request.can_read_body else KeyRotate()
    now = int(gw.clock())
    plaintext = (
        None if record.status != "active" else await gw.keys.rotate(record, spec.grace_seconds, now)
    )
    gw.auth.forget()
    if plaintext is None:
        raise bad_request("A revoked key cannot be rotated.", code="key_revoked")
    rotated = await gw.keys.get(record.org_id, record.id)
    assert rotated is not None
    until = now + spec.grace_seconds if spec.grace_seconds else None
    return web.json_response(
        {**key_json(rotated, now), "key": plaintext, "previous_valid_until": until}
    )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/keys/{keyId}/rotate", rotate_key)
