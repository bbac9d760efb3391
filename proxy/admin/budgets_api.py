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
from pydantic import BaseModel, ConfigDict, Field

from proxy.admin.access import find_key, org_id_param, sees_org
from proxy.admin.auth import caller_of
from proxy.admin.budget_shapes import BudgetInput, shown
from proxy.admin.schemas import Budget, BudgetDeleted, BudgetEventList, BudgetList
from proxy.errors import bad_request, forbidden, not_found, parse_body
from proxy.gateway.body import read_json
from proxy.gateway.state import GATEWAY, Gateway
from proxy.ledger.api_keys import Identity
from proxy.ledger.budgets import END_USER_SCOPES, BudgetRecord, Owner
from proxy.ledger.end_users import MAX_END_USER_ID, valid_end_user
from proxy.ledger.keys import Scope
from proxy.openapi import Reply, operation, parse_query

_EVENTS_DEFAULT, _EVENTS_MAX = 100, 1000


class OrgQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    org_id: str | None = Field(
        None, description="Another org than the caller's (cluster admins only)."
    )


class OwnerQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    owner: Owner = Field("org", description="Which of the scope's two budgets.")


class EventsQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    limit: int = Field(_EVENTS_DEFAULT, ge=1, le=_EVENTS_MAX, description="Newest first.")


class EndUserOwnerQuery(OwnerQuery, OrgQuery):
    pass


class EndUserEventsQuery(EventsQuery, OrgQuery):
    pass


_TAG = "budgets"
_NOT_FOUND = {404: "No such org or key, or one of another org than the caller's."}
_WRITE_FORBIDDEN = {
    403: "Members cannot change budgets; org admins cannot change owner `cluster` budgets."
}
# What the scopes' handlers are called in the document: (what, operation id part).
_NAMES: dict[Scope, tuple[str, str]] = {
    "org": ("an org", "Org"),
    "apikey": ("an API key", "Apikey"),
    "external_user": ("an end user", "ExternalUser"),
    "external_user_default": ("the org's default for each end user", "ExternalUserDefault"),
}


async def _end_user_org(gw: Gateway, caller: Identity, request: web.Request) -> str:
    """The caller's own org, or the one ``?org_id=`` names (cluster admins only; any other org
    is 404 like an unknown one). Members see no end-user budgets."""
    org_id = parse_query(OrgQuery, request.query).org_id or caller.org_id
    if org_id != caller.org_id:
        org_id_param(org_id, "org_id")
        if not sees_org(caller, org_id) or org_id not in await gw.keys.orgs():
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
    what, ids = _NAMES[scope]
    end_user = scope in END_USER_SCOPES
    org_query = OrgQuery if end_user else None
    owner_query = EndUserOwnerQuery if end_user else OwnerQuery
    events_query = EndUserEventsQuery if end_user else EventsQuery

    async def target(request: web.Request, write: bool) -> tuple[Gateway, Identity, str, str]:
        gw = request.app[GATEWAY]
        caller = caller_of(request)
        scope_id = _scope_id(request, scope, id_name)
        org_id = await _target(gw, caller, scope, scope_id, write, request)
        return gw, caller, org_id, scope_id or org_id

    @operation(
        f"List the budgets of {what}",
        tag=_TAG,
        auth="key",
        query=org_query,
        answers=Reply(200, "Its budgets (both owners), each with live spend.", BudgetList),
        errors={**_NOT_FOUND, 403: "Members read their own key's budgets only."},
        operation_id=f"get{ids}Budgets",
    )
    async def get(request: web.Request) -> web.Response:
        gw, _, org_id, scope_id = await target(request, write=False)
        windows = gw.admission.windows(gw.clock())
        records = await gw.budgets.list_budgets(org_id, windows, scope, scope_id)
        return web.json_response({"object": "list", "data": _shown(records, org_id)})

    @operation(
        f"Create or replace a budget of {what}",
        tag=_TAG,
        auth="key",
        query=org_query,
        body=BudgetInput,
        answers=Reply(200, "The budget, judged against live spend.", Budget),
        errors={**_NOT_FOUND, **_WRITE_FORBIDDEN},
        operation_id=f"put{ids}Budget",
        description="One budget per (scope, scope_id, owner): a PUT replaces it and keeps its "
        "id. Editing re-evaluates against the window's live spend at once.",
    )
    async def put(request: web.Request) -> web.Response:
        gw, caller, org_id, scope_id = await target(request, write=True)
        spec = parse_body(BudgetInput, await read_json(request))
        _may_write_owner(caller, spec.owner)
        now = gw.clock()
        record = await gw.budgets.put(org_id, scope, scope_id, spec, gw.admission.windows(now), now)
        return web.json_response(shown(record, org_id))

    @operation(
        f"Delete a budget of {what}",
        tag=_TAG,
        auth="key",
        query=owner_query,
        answers=Reply(200, "Deleted: enforcement and alerts stop.", BudgetDeleted),
        errors={404: "No such budget, org or key (or one of another org).", **_WRITE_FORBIDDEN},
        operation_id=f"delete{ids}Budget",
    )
    async def delete(request: web.Request) -> web.Response:
        gw, caller, org_id, scope_id = await target(request, write=True)
        owner = parse_query(owner_query, request.query).owner
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
        query=events_query,
        answers=Reply(200, "Alert and block events, newest first.", BudgetEventList),
        errors={**_NOT_FOUND, 403: "Members read their own key's events only."},
        operation_id=f"get{ids}BudgetEvents",
    )
    async def events(request: web.Request) -> web.Response:
        gw, _, org_id, scope_id = await target(request, write=False)
        limit = parse_query(events_query, request.query).limit
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
    "its keys and end users; other keys their own key's budgets.",
)
async def list_all(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    caller = caller_of(request)
    windows = gw.admission.windows(gw.clock())
    store = gw.budgets
    if caller.role == "member":
        records = await store.list_budgets(caller.org_id, windows, "apikey", caller.key_id)
        data = _shown(records, caller.org_id)
    elif caller.role == "org_admin":
        data = _shown(await store.list_budgets(caller.org_id, windows), caller.org_id)
    else:
        data = []
        for org_id in await gw.keys.orgs():
            data.extend(_shown(await store.list_budgets(org_id, windows), org_id))
    return web.json_response({"object": "list", "data": data})


def _shown(records: list[BudgetRecord], org_id: str) -> list[dict[str, Any]]:
    return [shown(record, org_id) for record in records]


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
