"""Recent requests: ``GET /api/v1/llm/usage/requests``, the per-request usage records the
ledger keeps per org (the last ~10,000), newest first.

Admins only, with the org rules of ``/usage/costs``: an org admin reads its own org (another
org's id, or ``all_orgs``, is a 403); a cluster admin names orgs with ``org_id`` (repeatable),
reads its own with ``all_orgs=false``, and every org otherwise. Several orgs' records are
merged newest first, each with its ``org_id``. Filters: ``api_key_id``, ``external_user_id``
(``X-On-Behalf-Of`` restricts the read to that end user), ``model``, and the time range
``start_time``/``end_time`` (Unix seconds, ``[start, end)``). Paging: ``limit`` (default 100,
at most 1000) and ``page``, the ``next_page`` of the previous answer (a stream id: records
strictly older than it). A call looks at no more than ten times ``limit`` records, so a selective
filter may return a short page with ``has_more``.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from proxy.admin.auth import caller_of
from proxy.admin.schemas import RecentRequests
from proxy.admin.usage_api import BASE, report_orgs
from proxy.admin.usage_params import boolean, end_users, org_ids, seconds
from proxy.errors import bad_request
from proxy.gateway.state import GATEWAY
from proxy.ledger.usage_records import RecordFilter, recent, valid_stream_id
from proxy.openapi import Reply, operation

DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
_SCAN_FACTOR = 10
_DIGITS = re.compile(r"^[0-9]{1,6}$")


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

    org_id: str | None = Field(
        None, description="Repeatable; cluster admins only for other orgs (default: all orgs)."
    )
    all_orgs: bool | None = Field(None, description="Cluster admins: false for their own org.")
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
    caller = caller_of(request)
    orgs = await report_orgs(gw, caller, org_ids(request, "org_id"), boolean(request, "all_orgs"))
    limit = _limit(request)
    page = request.query.get("page")
    if page is not None and not valid_stream_id(page):
        raise bad_request("'page' is not a cursor this endpoint returned.", param="page")
    start = seconds(request, "start_time", required=False)
    end = seconds(request, "end_time", required=False)
    if start is not None and end is not None and end <= start:
        raise bad_request("'end_time' must be after 'start_time'.", param="end_time")
    users = end_users(request, [u] if (u := _one(request, "external_user_id")) else [])
    if (users is not None and not users) or not orgs:
        return web.json_response(
            {"object": "list", "data": [], "has_more": False, "next_page": None}
        )
    selection = RecordFilter(
        key_id=_one(request, "api_key_id"),
        end_user=next(iter(users)) if users else None,
        model=_one(request, "model"),
    )
    pages = [
        await recent(
            gw.redis,
            org_id,
            limit=limit,
            before=page,
            since_ms=None if start is None else start * 1000,
            until_ms=None if end is None else end * 1000,
            selection=selection,
            scan_most=limit * _SCAN_FACTOR,
        )
        for org_id in orgs
    ]
    records, cursor = merge_newest(
        [[{**r, "org_id": org} for r in p.records] for org, p in zip(orgs, pages, strict=True)],
        [p.next_id for p in pages],
        limit,
    )
    return web.json_response(
        {"object": "list", "data": records, "has_more": cursor is not None, "next_page": cursor}
    )


def _order(stream_id: str) -> tuple[int, int]:
    millis, _, seq = stream_id.partition("-")
    return int(millis), int(seq or 0)


def merge_newest(
    per_org: list[list[dict[str, Any]]], cursors: list[str | None], limit: int
) -> tuple[list[dict[str, Any]], str | None]:
    """One page across orgs, newest first. An org whose scan stopped at its cursor may hold
    older matches not looked at yet: records older than the newest such cursor wait for the
    next page (which starts strictly older than it), so none is skipped or repeated."""
    merged = sorted(
        (r for records in per_org for r in records), key=lambda r: _order(r["id"]), reverse=True
    )
    stops = [_order(c) for c in cursors if c is not None]
    cursor = max(stops) if stops else None
    if cursor is not None:
        merged = [r for r in merged if _order(r["id"]) >= cursor]
    next_page = "{}-{}".format(*cursor) if cursor is not None else None
    if len(merged) > limit:
        merged = merged[:limit]
        next_page = merged[-1]["id"]
    return merged, next_page


def add_routes(app: web.Application) -> None:
    app.router.add_get(f"{BASE}/requests", list_requests)
