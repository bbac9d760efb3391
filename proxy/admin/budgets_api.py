"""The MKA1 budget API (``/api/v1/llm/budgets``), field for field as the contract writes it,
with the end-user scopes of the gateway's later versions (``external-user/{id}`` and
``external-user-default``).

Permissions: cluster admins everything; org admins their org, its keys and its end users,
owner ``org`` only (``cluster`` budgets are read-only ceilings for them); other keys read their
own key's budgets. Ids of other orgs, like unknown ids, are 404. End-user budgets belong to the
caller's own org; ``?org_id=`` names another (cluster admins only).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.admin.access import find_key, sees_org
from proxy.errors import bad_request, forbidden, not_found, parse_body
from proxy.gateway.body import read_json
from proxy.gateway.state import GATEWAY, Gateway
from proxy.store.budgets import END_USER_SCOPES, OWNERS, BudgetInput, Scope
from proxy.store.end_users import MAX_END_USER_ID, valid_end_user
from proxy.store.keys import Identity

_EVENTS_DEFAULT, _EVENTS_MAX = 100, 1000


async def _end_user_org(gw: Gateway, caller: Identity, request: web.Request) -> str:
    """The caller's own org, or the one ``?org_id=`` names (cluster admins only; any other org
    is 404 like an unknown one). Members see no end-user budgets."""
    org_id = request.query.get("org_id", caller.org_id)
    if org_id != caller.org_id and (
        not sees_org(caller, org_id) or org_id not in await gw.keys.orgs()
    ):
        raise not_found(f"No org '{org_id}'.")
    if caller.role == "member":
        raise forbidden("Only org or cluster admins can read or change end-user budgets.")
    return org_id


async def _target(
    gw: Gateway, caller: Identity, scope: Scope, scope_id: str, write: bool, request: web.Request
) -> str:
    """The org holding the scope, after the permission rules; 404 when out of reach."""
    if scope in END_USER_SCOPES:
        return await _end_user_org(gw, caller, request)
    if scope == "apikey":
        if caller.role == "member" and scope_id == caller.key_id and write:
            raise forbidden("Only org or cluster admins can change budgets.")
        record = await find_key(gw.keys, caller, scope_id)
        return record.org_id
    if not sees_org(caller, scope_id) or scope_id not in await gw.keys.orgs():
        raise not_found(f"No org '{scope_id}'.")
    if caller.role == "member":
        raise forbidden("Only org or cluster admins can read or change org budgets.")
    return scope_id


def _owner_param(request: web.Request) -> str:
    owner = request.query.get("owner", "org")
    if owner not in OWNERS:
        raise bad_request("'owner' must be 'cluster' or 'org'.", param="owner")
    return owner


def _may_write_owner(caller: Identity, owner: str) -> None:
    if caller.role == "member":
        raise forbidden("Only org or cluster admins can change budgets.")
    if owner == "cluster" and caller.role != "cluster_admin":
        raise forbidden("Budgets with owner 'cluster' are set by cluster admins only.")


def _scope_id(request: web.Request, scope: Scope, id_name: str | None) -> str:
    """The path's id; an end-user id as ``X-On-Behalf-Of`` allows it. The default for each end
    user is named by its org."""
    if id_name is None:
        return ""
    scope_id = request.match_info[id_name]
    if scope == "external_user" and not valid_end_user(scope_id):
        raise bad_request(
            f"An end-user id is 1-{MAX_END_USER_ID} printable characters.", param=id_name
        )
    return scope_id


def _scope_handlers(scope: Scope, id_name: str | None) -> dict[str, Any]:
    async def target(request: web.Request, write: bool) -> tuple[Gateway, Identity, str, str]:
        gw = request.app[GATEWAY]
        caller = await gw.auth.identify(request)
        scope_id = _scope_id(request, scope, id_name)
        org_id = await _target(gw, caller, scope, scope_id, write, request)
        return gw, caller, org_id, scope_id or org_id

    async def get(request: web.Request) -> web.Response:
        gw, _, org_id, scope_id = await target(request, write=False)
        windows = gw.admission.windows(gw.clock())
        data = await gw.budgets.list_budgets(org_id, windows, scope, scope_id)
        return web.json_response({"object": "list", "data": data})

    async def put(request: web.Request) -> web.Response:
        gw, caller, org_id, scope_id = await target(request, write=True)
        spec = parse_body(BudgetInput, await read_json(request))
        _may_write_owner(caller, spec.owner)
        now = gw.clock()
        budget = await gw.budgets.put(org_id, scope, scope_id, spec, gw.admission.windows(now), now)
        return web.json_response(budget)

    async def delete(request: web.Request) -> web.Response:
        gw, caller, org_id, scope_id = await target(request, write=True)
        owner = _owner_param(request)
        _may_write_owner(caller, owner)
        if not await gw.budgets.delete(org_id, scope, scope_id, owner):
            raise not_found(f"No {owner} budget for {scope} '{scope_id}'.")
        return web.json_response(
            {"scope": scope, "scope_id": scope_id, "owner": owner, "deleted": True}
        )

    async def events(request: web.Request) -> web.Response:
        gw, _, org_id, scope_id = await target(request, write=False)
        limit = _events_limit(request)
        data = await gw.budgets.events(org_id, scope, scope_id, limit)
        return web.json_response({"object": "list", "data": data})

    return {"get": get, "put": put, "delete": delete, "events": events}


def _events_limit(request: web.Request) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return _EVENTS_DEFAULT
    if not raw.isdigit() or not 1 <= int(raw) <= _EVENTS_MAX:
        raise bad_request(f"'limit' must be an integer from 1 to {_EVENTS_MAX}.", param="limit")
    return int(raw)


async def list_all(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    caller = await gw.auth.identify(request)
    windows = gw.admission.windows(gw.clock())
    store = gw.budgets
    if caller.role == "member":
        data = await store.list_budgets(caller.org_id, windows, "apikey", caller.key_id)
    elif caller.role == "org_admin":
        data = await store.list_budgets(caller.org_id, windows)
    else:
        data = []
        for org_id in await gw.keys.orgs():
            data.extend(await store.list_budgets(org_id, windows))
    return web.json_response({"object": "list", "data": data})


def add_routes(app: web.Application) -> None:
    base = "/api/v1/llm/budgets"
    app.router.add_get(base, list_all)
    scopes: tuple[tuple[Scope, str], ...] = (
        ("org", "org/{orgId}"),
        ("apikey", "apikey/{apiKeyId}"),
        # Any printable id, braces included; a "/" in it travels as %2F.
        ("external_user", "external-user/{externalUserId:[^/]+}"),
        ("external_user_default", "external-user-default"),
    )
    for scope, segment in scopes:
        id_name = segment.partition("{")[2].partition(":")[0].rstrip("}") or None
        handlers = _scope_handlers(scope, id_name)
        path = f"{base}/{segment}"
        app.router.add_get(path, handlers["get"])
        app.router.add_put(path, handlers["put"])
        app.router.add_delete(path, handlers["delete"])
        app.router.add_get(path + "/events", handlers["events"])
