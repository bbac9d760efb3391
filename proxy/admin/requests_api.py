"""Recent requests: ``GET /api/v1/llm/usage/requests``, the per-request usage records the
ledger keeps per org (the last ~10,000), newest first.

Admins only; one org per call (an org admin's own; a cluster admin names it with ``org_id``,
another org's id is a 403 for an org admin). Filters: ``api_key_id``, ``external_user_id``
(``X-On-Behalf-Of`` restricts the read to that end user), ``model``, and the time range
``start_time``/``end_time`` (Unix seconds, ``[start, end)``). Paging: ``limit`` (default 100,
at most 1000) and ``page``, the ``next_page`` of the previous answer (a stream id: records
strictly older than it). A call looks at no more than ten times ``limit`` records, so a selective
filter may return a short page with ``has_more``.
"""

from __future__ import annotations

import re

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from proxy.admin.auth import caller_of
from proxy.admin.schemas import RecentRequests
from proxy.admin.usage_api import BASE
from proxy.admin.usage_params import end_users, seconds
from proxy.errors import bad_request, forbidden
from proxy.gateway.state import GATEWAY
from proxy.ledger.api_keys import Identity
from proxy.ledger.keys import valid_id
from proxy.ledger.usage_records import RecordFilter, recent, valid_stream_id
from proxy.openapi import Reply, operation

DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
_SCAN_FACTOR = 10
_DIGITS = re.compile(r"^[0-9]{1,6}$")


def _org(request: web.Request, caller: Identity) -> str:
    wanted = request.query.get("org_id")
    if wanted is not None and not valid_id(wanted):
        raise bad_request(f"'org_id': '{wanted[:64]}' is not an org id.", param="org_id")
    if caller.role == "cluster_admin":
        if wanted is None:
            raise bad_request("'org_id' is required for cluster admins.", param="org_id")
        return wanted
    if wanted is not None and wanted != caller.org_id:
        raise forbidden("Only cluster admins can read other orgs' requests.")
    return caller.org_id


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    if not _DIGITS.match(raw) or not 1 <= int(raw) <= MAX_LIMIT:
        raise bad_request(f"'limit' must be an integer from 1 to {MAX_LIMIT}.", param="limit")
    return int(raw)


def _one(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    return value if value else None


class RequestsQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    org_id: str | None = Field(None, description="Required for cluster admins.")
    limit: int = Field(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT)
    page: str | None = Field(None, description="The next_page of the previous page.")
    start_time: int | None = Field(None, ge=0, description="Unix seconds, inclusive.")
    end_time: int | None = Field(None, ge=0, description="Unix seconds, exclusive.")
    api_key_id: str | None = None
    external_user_id: str | None = None
    model: str | None = None


@operation(
    "Recent requests",
    tag="usage",
    auth="admin",
    query=RequestsQuery,
    answers=Reply(200, "The org's most recent requests, newest first.", RecentRequests),
    errors={403: "Members, or another org than the caller's."},
)
async def list_requests(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    org_id = _org(request, caller_of(request))
    limit = _limit(request)
    page = request.query.get("page")
    if page is not None and not valid_stream_id(page):
        raise bad_request("'page' is not a cursor this endpoint returned.", param="page")
    start = seconds(request, "start_time", required=False)
    end = seconds(request, "end_time", required=False)
    if start is not None and end is not None and end <= start:
        raise bad_request("'end_time' must be after 'start_time'.", param="end_time")
    users = end_users(request, [u] if (u := _one(request, "external_user_id")) else [])
    if users is not None and not users:
        return web.json_response(
            {"object": "list", "data": [], "has_more": False, "next_page": None}
        )
    selection = RecordFilter(
        key_id=_one(request, "api_key_id"),
        end_user=next(iter(users)) if users else None,
        model=_one(request, "model"),
    )
    found = await recent(
        gw.redis,
        org_id,
        limit=limit,
        before=page,
        since_ms=None if start is None else start * 1000,
        until_ms=None if end is None else end * 1000,
        selection=selection,
        scan_most=limit * _SCAN_FACTOR,
    )
    return web.json_response(
        {
            "object": "list",
            "data": found.records,
            "has_more": found.next_id is not None,
            "next_page": found.next_id,
        }
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get(f"{BASE}/requests", list_requests)
