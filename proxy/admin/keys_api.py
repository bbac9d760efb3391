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

from proxy.admin.access import find_key, require_admin, sees_org
from proxy.errors import bad_request, forbidden, not_found, parse_body
from proxy.gateway.body import read_json
from proxy.gateway.state import GATEWAY, Gateway
from proxy.store.end_users import EndUserPolicies, EndUserPolicy
from proxy.store.keys import Identity, KeyCreate, KeyRecord, KeyUpdate, Limits


def _org_admin_may_manage(caller: Identity, record: KeyRecord) -> None:
    """A cluster admin's key is beyond an org admin's reach even inside the org."""
    if caller.role == "org_admin" and record.role == "cluster_admin":
        raise forbidden("Org admins cannot change or revoke cluster_admin keys.")


async def create_key(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    caller = await gw.auth.identify(request)
    require_admin(caller)
    spec = parse_body(KeyCreate, await read_json(request))
    org_id = spec.org_id or caller.org_id
    if caller.role == "org_admin":
        if org_id != caller.org_id:
            raise forbidden("Org admins create keys in their own org only.")
        if spec.role == "cluster_admin":
            raise forbidden("Org admins cannot create cluster_admin keys.")
    elif spec.org_id is None:
        raise bad_request("'org_id' is required for keys created by a cluster admin.", "org_id")
    record, plaintext = await gw.keys.create(spec, org_id)
    return web.json_response({**record.public(), "key": plaintext}, status=201)


async def list_keys(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    caller = await gw.auth.identify(request)
    require_admin(caller)
    wanted = request.query.get("org_id")
    if caller.role == "cluster_admin":
        orgs = [wanted] if wanted else await gw.keys.orgs()
    else:
        if wanted and wanted != caller.org_id:
            raise not_found(f"No org '{wanted}'.")
        orgs = [caller.org_id]
    data: list[dict[str, Any]] = []
    for org_id in orgs:
        data.extend(record.public() for record in await gw.keys.list_org(org_id))
    return web.json_response({"object": "list", "data": data})


async def get_key(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    caller = await gw.auth.identify(request)
    record = await find_key(gw.keys, caller, request.match_info["keyId"])
    return web.json_response(record.public())


async def _managed_key(request: web.Request) -> tuple[Gateway, Identity, KeyRecord]:
    """The key named in the path, if the caller may change it."""
    gw = request.app[GATEWAY]
    caller = await gw.auth.identify(request)
    require_admin(caller)
    record = await find_key(gw.keys, caller, request.match_info["keyId"])
    _org_admin_may_manage(caller, record)
    return gw, caller, record


async def update_key(request: web.Request) -> web.Response:
    gw, caller, record = await _managed_key(request)
    change = parse_body(KeyUpdate, await read_json(request))
    if caller.role == "org_admin" and change.role == "cluster_admin":
        raise forbidden("Org admins cannot grant cluster_admin.")
    if record.status != "active":
        raise bad_request("A revoked key cannot be changed.", code="key_revoked")
    updated = await gw.keys.update(record, change)
    gw.auth.forget()
    return web.json_response(updated.public())


async def revoke_key(request: web.Request) -> web.Response:
    gw, _, record = await _managed_key(request)
    await gw.keys.revoke(record)
    gw.auth.forget()
    return web.json_response({"id": record.id, "object": "api_key", "revoked": True})


async def get_org_limits(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    caller = await gw.auth.identify(request)
    org_id = request.match_info["orgId"]
    require_admin(caller)
    if not sees_org(caller, org_id):
        raise not_found(f"No org '{org_id}'.")
    limits = await gw.keys.get_org_limits(org_id)
    return web.json_response({"org_id": org_id, "limits": Limits(**limits).model_dump()})


async def put_org_limits(request: web.Request) -> web.Response:
    """Cluster admins only: an org's limits protect the cluster from the org."""
    gw = request.app[GATEWAY]
    caller = await gw.auth.identify(request)
    org_id = request.match_info["orgId"]
    require_admin(caller)
    if not sees_org(caller, org_id):
        raise not_found(f"No org '{org_id}'.")
    if caller.role != "cluster_admin":
        raise forbidden("Only cluster admins set org limits.")
    limits = parse_body(Limits, await read_json(request))
    await gw.keys.set_org_limits(org_id, limits)
    return web.json_response({"org_id": org_id, "limits": limits.model_dump()})


def _policy_json(org_id: str, policy: EndUserPolicy) -> dict[str, Any]:
    return {"org_id": org_id, **policy.model_dump()}


async def _policy_org(request: web.Request) -> tuple[Gateway, str]:
    gw = request.app[GATEWAY]
    caller = await gw.auth.identify(request)
    org_id = request.match_info["orgId"]
    require_admin(caller)
    if not sees_org(caller, org_id):
        raise not_found(f"No org '{org_id}'.")
    return gw, org_id


async def get_end_user_policy(request: web.Request) -> web.Response:
    gw, org_id = await _policy_org(request)
    policy = await EndUserPolicies(gw.redis).get(org_id)
    return web.json_response(_policy_json(org_id, policy))


async def put_end_user_policy(request: web.Request) -> web.Response:
    """Replaces the whole policy; takes effect with the org's next request."""
    gw, org_id = await _policy_org(request)
    policy = parse_body(EndUserPolicy, await read_json(request))
    await EndUserPolicies(gw.redis).put(org_id, policy)
    return web.json_response(_policy_json(org_id, policy))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/keys", create_key)
    app.router.add_get("/api/v1/keys", list_keys)
    app.router.add_get("/api/v1/keys/{keyId}", get_key)
    app.router.add_patch("/api/v1/keys/{keyId}", update_key)
    app.router.add_delete("/api/v1/keys/{keyId}", revoke_key)
    app.router.add_get("/api/v1/orgs/{orgId}/limits", get_org_limits)
    app.router.add_put("/api/v1/orgs/{orgId}/limits", put_org_limits)
    app.router.add_get("/api/v1/orgs/{orgId}/end-user-policy", get_end_user_policy)
    app.router.add_put("/api/v1/orgs/{orgId}/end-user-policy", put_end_user_policy)
