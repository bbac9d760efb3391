"""Key management and org limits over HTTP (``/api/v1/keys``, ``/api/v1/orgs/{id}/limits``,
``/api/v1/orgs/{id}/end-user-policy``).

Cluster admins manage every org; org admins only their own (and never mint cluster admins);
members may read their own key. The plaintext of a key appears once, in the create answer.
An org's limits protect the cluster from the org, so only cluster admins set them; its
end-user policy is the org's own rules for its end users, so its admins set it too.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from proxy.admin.access import OrgId, find_key, sees_org
from proxy.admin.auth import caller_of, org_in_path, path_org
from proxy.admin.key_lifecycle import key_json
from proxy.admin.schemas import (
    ApiKey,
    ApiKeyCreated,
    ApiKeyList,
    ApiKeyRevoked,
    Caller,
    OrgEndUserPolicy,
    OrgLimits,
)
from proxy.errors import bad_request, forbidden, not_found, parse_body
from proxy.gateway.body import read_json
from proxy.gateway.state import GATEWAY, Gateway
from proxy.ledger.api_keys import Identity, KeyCreate, KeyRecord, KeyUpdate, Limits
from proxy.ledger.end_users import EndUserPolicies, EndUserPolicy
from proxy.openapi import Reply, operation, parse_query

_NOT_FOUND = {404: "No such key, or it belongs to another org."}
_ORG_NOT_FOUND = {404: "No such org, or another org than the caller's."}


class KeyListQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    org_id: OrgId | None = Field(None, description="Only this org's keys (cluster admins).")


def _org_admin_may_manage(caller: Identity, record: KeyRecord) -> None:
    """A cluster admin's key is beyond an org admin's reach even inside the org."""
    if caller.role == "org_admin" and record.role == "cluster_admin":
        raise forbidden("Org admins cannot change or revoke cluster_admin keys.")


def _known_models(gw: Gateway, models: list[str]) -> list[str]:
    """A key's allow-list names configured models, aliases or patterns only (each once): a
    name no route knows would allow nothing, or something else once such a model is configured."""
    for index, name in enumerate(models):
        if not gw.routes.names(name):
            shown = name[:100]
            raise bad_request(
                f"Unknown model '{shown}' in 'models': not a configured model or alias.",
                param=f"models.{index}",
                code="model_not_found",
            )
    return list(dict.fromkeys(models))


@operation(
    "Create a key",
    tag="keys",
    auth="admin",
    body=KeyCreate,
    answers=Reply(201, "The key, with its plaintext (shown this once).", ApiKeyCreated),
    errors={403: "Org admins create keys in their own org only, and never cluster_admin keys."},
)
async def create_key(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    caller = caller_of(request)
    spec = parse_body(KeyCreate, await read_json(request))
    if spec.models is not None:
        spec.models = _known_models(gw, spec.models)
    org_id = spec.org_id or caller.org_id
    if caller.role == "org_admin":
        if org_id != caller.org_id:
            raise forbidden("Org admins create keys in their own org only.")
        if spec.role == "cluster_admin":
            raise forbidden("Org admins cannot create cluster_admin keys.")
    elif spec.org_id is None:
        raise bad_request("'org_id' is required for keys created by a cluster admin.", "org_id")
    if spec.expires_at is not None and spec.expires_at <= gw.clock():
        raise bad_request("'expires_at' must be in the future.", "expires_at")
    record, plaintext = await gw.keys.create(spec, org_id)
    return web.json_response({**key_json(record, gw.clock()), "key": plaintext}, status=201)


@operation(
    "List keys",
    tag="keys",
    auth="admin",
    query=KeyListQuery,
    answers=Reply(200, "The keys of every org the caller sees.", ApiKeyList),
    errors=_ORG_NOT_FOUND,
)
async def list_keys(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    caller = caller_of(request)
    wanted = parse_query(KeyListQuery, request.query).org_id
    if caller.role == "cluster_admin":
        orgs = [wanted] if wanted else await gw.keys.orgs()
    else:
        if wanted and wanted != caller.org_id:
            raise not_found(f"No org '{wanted}'.")
        orgs = [caller.org_id]
    data: list[dict[str, Any]] = []
    for org_id in orgs:
        now = gw.clock()
        data.extend(key_json(record, now) for record in await gw.keys.list_org(org_id))
    return web.json_response({"object": "list", "data": data})


@operation(
    "Get a key",
    tag="keys",
    auth="key",
    answers=Reply(200, "The key.", ApiKey),
    errors=_NOT_FOUND,
    description="Admins read the keys of the orgs they manage; any key reads itself.",
)
async def get_key(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    record = await find_key(gw.keys, caller_of(request), request.match_info["keyId"])
    return web.json_response(key_json(record, gw.clock()))


async def _managed_key(request: web.Request) -> tuple[Gateway, Identity, KeyRecord]:
    """The key named in the path, if the caller may change it."""
    gw = request.app[GATEWAY]
    caller = caller_of(request)
    record = await find_key(gw.keys, caller, request.match_info["keyId"])
    _org_admin_may_manage(caller, record)
    return gw, caller, record


@operation(
    "Change a key's name, role, models or limits",
    tag="keys",
    auth="admin",
    body=KeyUpdate,
    answers=Reply(200, "The key as changed.", ApiKey),
    errors={
        **_NOT_FOUND,
        400: "Invalid input, or the key is revoked (`code: key_revoked`).",
        403: "Org admins cannot grant cluster_admin or change cluster_admin keys.",
    },
    description="Fields left out stay as they are; `models: null` allows every model, and a "
    "limit set to null is removed.",
)
async def update_key(request: web.Request) -> web.Response:
    gw, caller, record = await _managed_key(request)
    change = parse_body(KeyUpdate, await read_json(request))
    if change.models is not None:
        change.models = _known_models(gw, change.models)
    if caller.role == "org_admin" and change.role == "cluster_admin":
        raise forbidden("Org admins cannot grant cluster_admin.")
    if record.status != "active":
        raise bad_request("A revoked key cannot be changed.", code="key_revoked")
    updated = await gw.keys.update(record, change)
    gw.auth.forget()
    if updated is None:
        raise bad_request("A revoked key cannot be changed.", code="key_revoked")
    return web.json_response(key_json(updated, gw.clock()))


@operation(
    "Revoke a key",
    tag="keys",
    auth="admin",
    answers=Reply(200, "The key is revoked: refused from the next request on.", ApiKeyRevoked),
    errors={**_NOT_FOUND, 403: "Org admins cannot revoke cluster_admin keys."},
)
async def revoke_key(request: web.Request) -> web.Response:
    gw, _, record = await _managed_key(request)
    await gw.keys.revoke(record)
    gw.auth.forget()
    return web.json_response({"id": record.id, "object": "api_key", "revoked": True})


@operation(
    "Get an org's limits",
    tag="keys",
    auth="admin",
    answers=Reply(200, "Every limit, null where none is set.", OrgLimits),
    errors=_ORG_NOT_FOUND,
)
@org_in_path("orgId")
async def get_org_limits(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    org_id = path_org(request)
    if not sees_org(caller_of(request), org_id):
        raise not_found(f"No org '{org_id}'.")
    limits = await gw.keys.get_org_limits(org_id)
    return web.json_response({"org_id": org_id, "limits": Limits(**limits).model_dump()})


@operation(
    "Replace an org's limits",
    tag="keys",
    auth="admin",
    body=Limits,
    answers=Reply(200, "The limits as stored; fields left out are removed.", OrgLimits),
    errors={**_ORG_NOT_FOUND, 403: "Only cluster admins set org limits."},
)
@org_in_path("orgId")
async def put_org_limits(request: web.Request) -> web.Response:
    """Cluster admins only: an org's limits protect the cluster from the org."""
    gw = request.app[GATEWAY]
    caller, org_id = caller_of(request), path_org(request)
    if not sees_org(caller, org_id):
        raise not_found(f"No org '{org_id}'.")
    if caller.role != "cluster_admin":
        raise forbidden("Only cluster admins set org limits.")
    limits = parse_body(Limits, await read_json(request))
    await gw.keys.set_org_limits(org_id, limits)
    return web.json_response({"org_id": org_id, "limits": limits.model_dump()})


@operation(
    "Who the key is",
    tag="keys",
    auth="key",
    answers=Reply(200, "The caller's key id, org and role.", Caller),
)
async def whoami(request: web.Request) -> web.Response:
    """The console scopes itself by it (an org admin's console shows that org only)."""
    caller = caller_of(request)
    identity = {"key_id": caller.key_id, "org_id": caller.org_id, "role": caller.role}
    return web.json_response({"object": "identity", **identity})


def _policy_json(org_id: str, policy: EndUserPolicy) -> dict[str, Any]:
    return {"org_id": org_id, **policy.model_dump()}


async def _policy_org(request: web.Request) -> tuple[Gateway, str]:
    gw = request.app[GATEWAY]
    org_id = path_org(request)
    if not sees_org(caller_of(request), org_id):
        raise not_found(f"No org '{org_id}'.")
    return gw, org_id


@operation(
    "Get an org's end-user policy",
    tag="keys",
    auth="admin",
    answers=Reply(200, "What the org asks of its end users' requests.", OrgEndUserPolicy),
    errors=_ORG_NOT_FOUND,
)
@org_in_path("orgId")
async def get_end_user_policy(request: web.Request) -> web.Response:
    gw, org_id = await _policy_org(request)
    policy = await EndUserPolicies(gw.redis).get(org_id)
    return web.json_response(_policy_json(org_id, policy))


@operation(
    "Replace an org's end-user policy",
    tag="keys",
    auth="admin",
    body=EndUserPolicy,
    answers=Reply(200, "The policy as stored.", OrgEndUserPolicy),
    errors=_ORG_NOT_FOUND,
    description="Whether every LLM request must name its end user (X-On-Behalf-Of), whether "
    "every end user's spend is kept, and the rate limits of each end user. Org admins set "
    "their own org's; it takes effect with the org's next request.",
)
@org_in_path("orgId")
async def put_end_user_policy(request: web.Request) -> web.Response:
    """Replaces the whole policy; takes effect with the org's next request."""
    gw, org_id = await _policy_org(request)
    policy = parse_body(EndUserPolicy, await read_json(request))
    await EndUserPolicies(gw.redis).put(org_id, policy)
    return web.json_response(_policy_json(org_id, policy))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/me", whoami)
    app.router.add_post("/api/v1/keys", create_key)
    app.router.add_get("/api/v1/keys", list_keys)
    app.router.add_get("/api/v1/keys/{keyId}", get_key)
    app.router.add_patch("/api/v1/keys/{keyId}", update_key)
    app.router.add_delete("/api/v1/keys/{keyId}", revoke_key)
    app.router.add_get("/api/v1/orgs/{orgId}/limits", get_org_limits)
    app.router.add_put("/api/v1/orgs/{orgId}/limits", put_org_limits)
    app.router.add_get("/api/v1/orgs/{orgId}/end-user-policy", get_end_user_policy)
    app.router.add_put("/api/v1/orgs/{orgId}/end-user-policy", put_end_user_policy)
