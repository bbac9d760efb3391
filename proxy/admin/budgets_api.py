"""The MKA1 budget API (``/api/v1/llm/budgets``), field for field as the contract writes it.

Permissions: cluster admins everything; org admins their org and its keys, owner ``org``
only (``cluster`` budgets are read-only ceilings for them); other keys read their own key's
budgets. Ids of other orgs, like unknown ids, are 404.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.admin.access import find_key, org_id_param, sees_org
from proxy.errors import bad_request, forbidden, not_found, parse_body
from proxy.gateway.body import read_json
from proxy.gateway.state import GATEWAY, Gateway
from proxy.store.budgets import OWNERS, BudgetInput, Scope
from proxy.store.keys import Identity

_EVENTS_DEFAULT, _EVENTS_MAX = 100, 1000


async def _target(gw: Gateway, caller: Identity, scope: Scope, scope_id: str, write: bool) -> str:
    """The org holding the scope, after the permission rules; 404 when out of reach."""
    if scope == "apikey":
        if caller.role == "member" and scope_id == caller.key_id and write:
            raise forbidden("Only org or cluster admins can change budgets.")
        record = await find_key(gw.keys, caller, scope_id)
        return record.org_id
    org_id_param(scope_id, "orgId")
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


def _scope_handlers(scope: Scope, id_name: str) -> dict[str, Any]:
    async def get(request: web.Request) -> web.Response:
        gw = request.app[GATEWAY]
        caller = await gw.auth.identify(request)
        scope_id = request.match_info[id_name]
        org_id = await _target(gw, caller, scope, scope_id, write=False)
        windows = gw.admission.windows(gw.clock())
        data = await gw.budgets.list_budgets(org_id, windows, scope, scope_id)
        return web.json_response({"object": "list", "data": data})

    async def put(request: web.Request) -> web.Response:
        gw = request.app[GATEWAY]
        caller = await gw.auth.identify(request)
        scope_id = request.match_info[id_name]
        org_id = await _target(gw, caller, scope, scope_id, write=True)
        spec = parse_body(BudgetInput, await read_json(request))
        _may_write_owner(caller, spec.owner)
        now = gw.clock()
        budget = await gw.budgets.put(org_id, scope, scope_id, spec, gw.admission.windows(now), now)
        return web.json_response(budget)

    async def delete(request: web.Request) -> web.Response:
        gw = request.app[GATEWAY]
        caller = await gw.auth.identify(request)
        scope_id = request.match_info[id_name]
        org_id = await _target(gw, caller, scope, scope_id, write=True)
        owner = _owner_param(request)
        _may_write_owner(caller, owner)
        if not await gw.budgets.delete(org_id, scope, scope_id, owner):
            raise not_found(f"No {owner} budget for {scope} '{scope_id}'.")
        return web.json_response(
            {"scope": scope, "scope_id": scope_id, "owner": owner, "deleted": True}
        )

    async def events(request: web.Request) -> web.Response:
        gw = request.app[GATEWAY]
        caller = await gw.auth.identify(request)
        scope_id = request.match_info[id_name]
        org_id = await _target(gw, caller, scope, scope_id, write=False)
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
    for scope, segment, id_name in (("org", "org", "orgId"), ("apikey", "apikey", "apiKeyId")):
        handlers = _scope_handlers(scope, id_name)  # type: ignore[arg-type]
        path = f"{base}/{segment}/{{{id_name}}}"
        app.router.add_get(path, handlers["get"])
        app.router.add_put(path, handlers["put"])
        app.router.add_delete(path, handlers["delete"])
        app.router.add_get(path + "/events", handlers["events"])
