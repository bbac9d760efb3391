"""The MKA1 budget API (``/api/v1/llm/budgets``), field for field as the contract writes it.

Permissions: cluster admins everything; org admins their org and its keys, owner ``org``
only (``cluster`` budgets are read-only ceilings for them); other keys read their own key's
budgets. Ids of other orgs, like unknown ids, are 404.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from proxy.admin.access import find_key, org_id_param, sees_org
from proxy.admin.schemas import Budget, BudgetDeleted, BudgetEventList, BudgetList
from proxy.errors import forbidden, not_found, parse_body
from proxy.gateway.body import read_json
from proxy.gateway.state import GATEWAY, Gateway
from proxy.openapi import Reply, operation, parse_query
from proxy.store.budgets import BudgetInput, Owner, Scope
from proxy.store.keys import Identity

_EVENTS_DEFAULT, _EVENTS_MAX = 100, 1000


class OwnerQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    owner: Owner = Field("org", description="Which of the scope's two budgets.")


class EventsQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    limit: int = Field(_EVENTS_DEFAULT, ge=1, le=_EVENTS_MAX, description="Newest first.")


_TAG = "budgets"
_NOT_FOUND = {404: "No such org or key, or one of another org than the caller's."}
_WRITE_FORBIDDEN = {
    403: "Members cannot change budgets; org admins cannot change owner `cluster` budgets."
}


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


def _may_write_owner(caller: Identity, owner: str) -> None:
    if caller.role == "member":
        raise forbidden("Only org or cluster admins can change budgets.")
    if owner == "cluster" and caller.role != "cluster_admin":
        raise forbidden("Budgets with owner 'cluster' are set by cluster admins only.")


def _scope_handlers(scope: Scope, id_name: str) -> dict[str, Any]:
    what = "an org" if scope == "org" else "an API key"
    ids = "Org" if scope == "org" else "Apikey"

    @operation(
        f"List the budgets of {what}",
        tag=_TAG,
        auth="key",
        answers=Reply(200, "Its budgets (both owners), each with live spend.", BudgetList),
        errors={**_NOT_FOUND, 403: "Members read their own key's budgets only."},
        operation_id=f"get{ids}Budgets",
    )
    async def get(request: web.Request) -> web.Response:
        gw = request.app[GATEWAY]
        caller = await gw.auth.identify(request)
        scope_id = request.match_info[id_name]
        org_id = await _target(gw, caller, scope, scope_id, write=False)
        windows = gw.admission.windows(gw.clock())
        data = await gw.budgets.list_budgets(org_id, windows, scope, scope_id)
        return web.json_response({"object": "list", "data": data})

    @operation(
        f"Create or replace a budget of {what}",
        tag=_TAG,
        auth="key",
        body=BudgetInput,
        answers=Reply(200, "The budget, judged against live spend.", Budget),
        errors={**_NOT_FOUND, **_WRITE_FORBIDDEN},
        operation_id=f"put{ids}Budget",
        description="One budget per (scope, scope_id, owner): a PUT replaces it and keeps its "
        "id. Editing re-evaluates against the window's live spend at once.",
    )
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

    @operation(
        f"Delete a budget of {what}",
        tag=_TAG,
        auth="key",
        query=OwnerQuery,
        answers=Reply(200, "Deleted: enforcement and alerts stop.", BudgetDeleted),
        errors={404: "No such budget, org or key (or one of another org).", **_WRITE_FORBIDDEN},
        operation_id=f"delete{ids}Budget",
    )
    async def delete(request: web.Request) -> web.Response:
        gw = request.app[GATEWAY]
        caller = await gw.auth.identify(request)
        scope_id = request.match_info[id_name]
        org_id = await _target(gw, caller, scope, scope_id, write=True)
        owner = parse_query(OwnerQuery, request.query).owner
        _may_write_owner(caller, owner)
        if not await gw.budgets.delete(org_id, scope, scope_id, owner):
            raise not_found(f"No {owner} budget for {scope} '{scope_id}'.")
        return web.json_response(
            {"scope": scope, "scope_id": scope_id, "owner": owner, "deleted": True}
        )

    @operation(
        f"Threshold events of {what}'s budgets",
        tag=_TAG,
        auth="key",
        query=EventsQuery,
        answers=Reply(200, "Alert and block events, newest first.", BudgetEventList),
        errors={**_NOT_FOUND, 403: "Members read their own key's events only."},
        operation_id=f"get{ids}BudgetEvents",
    )
    async def events(request: web.Request) -> web.Response:
        gw = request.app[GATEWAY]
        caller = await gw.auth.identify(request)
        scope_id = request.match_info[id_name]
        org_id = await _target(gw, caller, scope, scope_id, write=False)
        limit = parse_query(EventsQuery, request.query).limit
        data = await gw.budgets.events(org_id, scope, scope_id, limit)
        return web.json_response({"object": "list", "data": data})

    return {"get": get, "put": put, "delete": delete, "events": events}


@operation(
    "List budgets",
    tag=_TAG,
    auth="key",
    answers=Reply(200, "Every budget the caller may read, each with live spend.", BudgetList),
    operation_id="listBudgets",
    description="Cluster admins see every budget; org admins their org's budgets and those of "
    "its keys; other keys their own key's budgets.",
)
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
