"""The MKA1 usage and cost reports (``/api/v1/llm/usage/...``), as its generated client reads
them (contract: ``shared/spec/usage-api.md``), from the ledger's usage counters.

- ``GET costs``: one aggregate over ``[start_time, end_time)``, grouped by any of ``model``,
  ``api_key_id``, ``team_id``, ``external_user_id``, ``org_id`` (default ``["model"]``).
- ``GET completions | embeddings | moderations | responses``: OpenAI's Usage API page of time
  buckets (``1m``, ``1h``, ``1d``), grouped, filtered and paged.

Who sees what: admins only (members get 403). An org admin sees their org; naming another org
(``org_id``, ``org_ids``) or ``all_orgs=true`` is a 403 whether or not that org exists, so
nothing is learnt about other orgs. A cluster admin sees every org unless ``org_id``/``org_ids``
names some (``all_orgs=false``: their own org). ``X-On-Behalf-Of`` on a read restricts it to
that end user's usage.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from proxy.admin.auth import caller_of
from proxy.admin.schemas import UsageCosts, UsagePage
from proxy.admin.usage_params import (
    DIGITS,
    MAX_SECONDS,
    Cursor,
    boolean,
    decode_cursor,
    encode_cursor,
    end_users,
    group_by,
    org_ids,
    seconds,
    values,
)
from proxy.catalog.pricing import NANO
from proxy.errors import bad_request, forbidden
from proxy.gateway.state import GATEWAY, Gateway
from proxy.ledger.api_keys import Identity
from proxy.ledger.usage import (
    FREE_ENDPOINTS,
    REPORT_ENDPOINTS,
    WIDTHS,
    Counts,
    Group,
    Selection,
    UsageCounters,
    Width,
    aggregate,
    buckets,
    cover,
)
from proxy.openapi import Reply, operation

BASE = "/api/v1/llm/usage"
COST_DIMENSIONS = ("model", "api_key_id", "team_id", "external_user_id", "org_id")
BUCKET_DIMENSIONS = ("user_id", "api_key_id", "org_id", "model")
LIMITS: dict[Width, tuple[int, int]] = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}
"""Buckets per page, default and maximum (OpenAI's Usage API figures)."""


@dataclass(frozen=True)
class Report:
    """A bucketed endpoint: which proxy endpoints it counts and how its items look."""

    name: str
    result_object: str
    dimensions: tuple[str, ...]
    tokens_out: bool = True
    background: bool = False


REPORTS = {
    "completions": Report(
        "completions", "organization.usage.completions.result", BUCKET_DIMENSIONS
    ),
    "embeddings": Report(
        "embeddings", "organization.usage.embeddings.result", BUCKET_DIMENSIONS, tokens_out=False
    ),
    "moderations": Report(
        "moderations", "organization.usage.moderations.result", BUCKET_DIMENSIONS, tokens_out=False
    ),
    "responses": Report(
        "responses",
        "organization.usage.completions.result",
        (*BUCKET_DIMENSIONS, "background"),
        background=True,
    ),
}


# --- permissions and output ------------------------------------------------------------------


async def report_orgs(
    gw: Gateway, caller: Identity, named: list[str], all_orgs: bool | None
) -> list[str]:
    """The orgs a report covers, after the permission rules (module docstring); the caller
    is an org or cluster admin (the routes are declared ``admin``)."""
    if caller.role != "cluster_admin":
        if any(org_id != caller.org_id for org_id in named) or all_orgs:
            raise forbidden("Only cluster admins can read other orgs' usage.")
        return [caller.org_id]
    if named:
        return sorted(set(named))
    if all_orgs is False:
        return [caller.org_id]
    return await gw.keys.orgs()


def nano_string(value: int) -> str:
    """Counters never hold a negative total; a non-negative string is the contract."""
    return str(max(value, 0))


# --- the document's view of the queries (parsing stays above: it names every fault) ---------

CostDimension = Literal["model", "api_key_id", "team_id", "external_user_id", "org_id"]
BucketDimension = Literal["user_id", "api_key_id", "org_id", "model"]
ResponsesDimension = Literal["user_id", "api_key_id", "org_id", "model", "background"]
_TAG = "usage"
_WHO = {403: "Members, or another org than the caller's (cluster admins may name any)."}


class CostsQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    start_time: int = Field(ge=0, lt=MAX_SECONDS, description="Unix seconds, inclusive.")
    end_time: int = Field(ge=0, lt=MAX_SECONDS, description="Unix seconds, exclusive.")
    org_id: list[str] | None = Field(None, description="Cluster admins: the orgs to count.")
    all_orgs: str | None = Field(None, description="true or false (cluster admins).")
    group_by: list[CostDimension] | None = Field(
        None, description='Default ["model"]; the answer\'s group_by says which.'
    )


class BucketQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    start_time: int = Field(ge=0, lt=MAX_SECONDS, description="Unix seconds, inclusive.")
    end_time: int | None = Field(
        None, ge=0, lt=MAX_SECONDS, description="Unix seconds, exclusive (default: now)."
    )
    bucket_width: Width = "1d"
    limit: int | None = Field(
        None,
        ge=1,
        le=1440,
        description="Buckets per page: 1d 7 (31 at most), 1h 24 (168), 1m 60 (1440).",
    )
    page: str | None = Field(None, description="A next_page cursor of the same query.")
    user_ids: list[str] | None = Field(None, description="Platform users: the proxy has none.")
    external_user_ids: list[str] | None = None
    all_orgs: str | None = Field(None, description="true or false (cluster admins).")
    org_ids: list[str] | None = Field(None, description="Cluster admins: the orgs to count.")
    group_by: list[BucketDimension] | None = None
    models: list[str] | None = None
    api_key_ids: list[str] | None = Field(None, description="An extension (OpenAI's filter).")


class ResponsesQuery(BucketQuery):
    group_by: list[ResponsesDimension] | None = None  # type: ignore[assignment]
    background: bool | None = Field(None, description="Nothing the proxy relays runs so.")


_QUERIES: dict[str, type[BucketQuery]] = {
    "completions": BucketQuery,
    "embeddings": BucketQuery,
    "moderations": BucketQuery,
    "responses": ResponsesQuery,
}


# --- costs -----------------------------------------------------------------------------------


@operation(
    "Get cost by model",
    tag=_TAG,
    auth="admin",
    query=CostsQuery,
    answers=Reply(200, "One aggregate over the range, grouped.", UsageCosts),
    errors=_WHO,
    operation_id="getCostsUsage",
)
async def costs(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    caller = caller_of(request)
    start = seconds(request, "start_time", required=True)
    end = seconds(request, "end_time", required=True)
    assert start is not None and end is not None
    if end <= start:
        raise bad_request("'end_time' must be after 'start_time'.", param="end_time")
    org_param = org_ids(request, "org_id")
    grouping = group_by(request, COST_DIMENSIONS, ["model"])
    selection = Selection(end_users=end_users(request, []))
    orgs = await report_orgs(gw, caller, org_param, boolean(request, "all_orgs"))
    spans = cover(start, end, gw.clock(), gw.settings.usage)
    found = await UsageCounters(gw.redis).read(orgs, spans)
    combos = (
        item
        for per_span in found.values()
        for item in per_span.items()
        if item[0].endpoint not in FREE_ENDPOINTS
    )
    groups = aggregate(combos, selection, grouping)
    total = sum(g.counts.cost_nano for g in groups)
    body = {
        "object": "usage.costs",
        "currency": gw.settings.metering.currency,
        "start_time": start,
        "end_time": end,
        "group_by": grouping,
        "data": [_cost_row(g, grouping) for g in groups],
        "total_cost": max(total, 0) / NANO,
        "total_cost_nano": nano_string(total),
    }
    return web.json_response(body)


def _cost_row(group: Group, grouping: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(COST_DIMENSIONS)
    row.update(zip(grouping, group.values, strict=True))
    counts = group.counts
    row.update(
        cost=max(counts.cost_nano, 0) / NANO,
        cost_nano=nano_string(counts.cost_nano),
        # Extensions (the client ignores unknown fields): the same usage in requests and tokens.
        num_model_requests=counts.requests,
        input_tokens=counts.input_tokens,
        input_cached_tokens=counts.cached_tokens,
        output_tokens=counts.output_tokens,
    )
    return row


# --- bucketed reports ------------------------------------------------------------------------


def _query_digest(request: web.Request, report: Report) -> str:
    """What a cursor belongs to: the same report, scope and filters."""
    items = sorted(
        (k, v) for k, v in request.query.items() if k not in ("page", "limit", "end_time")
    )
    canonical = json.dumps([report.name, items, request.headers.get("X-On-Behalf-Of")])
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _limit(request: web.Request, width: Width) -> int:
    default, most = LIMITS[width]
    raw = request.query.get("limit")
    if raw is None or raw == "":
        return default
    if not DIGITS.match(raw) or not 1 <= int(raw) <= most:
        raise bad_request(
            f"'limit' must be an integer from 1 to {most} for bucket_width {width}.",
            param="limit",
        )
    return int(raw)


def _width(request: web.Request) -> Width:
    raw = request.query.get("bucket_width", "1d")
    if raw not in WIDTHS:
        raise bad_request("'bucket_width' must be 1m, 1h or 1d.", param="bucket_width")
    return raw  # type: ignore[return-value]


def _selection(request: web.Request, report: Report) -> Selection:
    models = values(request, "models")
    background = boolean(request, "background") if report.background else None
    key_ids = values(request, "api_key_ids")  # OpenAI's filter; not in the MKA1 client
    return Selection(
        endpoints=REPORT_ENDPOINTS[report.name],
        models=frozenset(models) if models else None,
        end_users=end_users(request, values(request, "external_user_ids")),
        key_ids=frozenset(key_ids) if key_ids else None,
        # No platform users exist in the proxy, and nothing it relays runs in the background.
        nothing=bool(values(request, "user_ids")) or background is True,
    )


def bucketed(report: Report) -> Any:
    @operation(
        f"Get {report.name} usage",
        tag=_TAG,
        auth="admin",
        query=_QUERIES[report.name],
        answers=Reply(200, "A page of time buckets.", UsagePage),
        errors=_WHO,
        operation_id=f"get{report.name.capitalize()}Usage",
    )
    async def handler(request: web.Request) -> web.Response:
        gw = request.app[GATEWAY]
        caller = caller_of(request)
        start = seconds(request, "start_time", required=True)
        assert start is not None
        width = _width(request)
        limit = _limit(request, width)
        grouping = group_by(request, report.dimensions, [])
        selection = _selection(request, report)
        named = org_ids(request, "org_ids")
        orgs = await report_orgs(gw, caller, named, boolean(request, "all_orgs"))
        digest = _query_digest(request, report)
        end = seconds(request, "end_time", required=False)
        page = request.query.get("page")
        if page:
            cursor = decode_cursor(page, digest)
            if end is not None and end != cursor.end:
                raise bad_request("'end_time' differs from the first page's.", param="end_time")
            first, end = cursor.next_start, cursor.end
        else:
            end = int(gw.clock()) if end is None else end
            first = start
        if end <= start:
            raise bad_request("'end_time' must be after 'start_time'.", param="end_time")
        # One page of buckets (and whether one more follows), never the whole range: a range
        # from 1970 in minutes would be tens of millions of them.
        spans = list(itertools.islice(buckets(first, end, width), limit + 1))
        shown, rest = spans[:limit], spans[limit:]
        found = await UsageCounters(gw.redis).read(orgs, shown)
        data = [
            {
                "object": "bucket",
                "start_time": span.start,
                "end_time": span.end,
                "results": [
                    _result(report, g, grouping)
                    for g in aggregate(found[span].items(), selection, grouping)
                ],
            }
            for span in shown
        ]
        next_page = encode_cursor(Cursor(rest[0].start, end), digest) if rest else None
        return web.json_response(
            {"object": "page", "data": data, "has_more": bool(rest), "next_page": next_page}
        )

    handler.__name__ = f"usage_{report.name}"
    return handler


def _result(report: Report, group: Group, grouping: list[str]) -> dict[str, Any]:
    counts: Counts = group.counts
    item: dict[str, Any] = {"object": report.result_object, "input_tokens": counts.input_tokens}
    if report.tokens_out:
        item["output_tokens"] = counts.output_tokens
        item["input_cached_tokens"] = counts.cached_tokens
    item["num_model_requests"] = counts.requests
    item.update(dict.fromkeys(report.dimensions))
    item.update(zip(grouping, group.values, strict=True))
    return item


def add_routes(app: web.Application) -> None:
    app.router.add_get(f"{BASE}/costs", costs)
    for report in REPORTS.values():
        app.router.add_get(f"{BASE}/{report.name}", bucketed(report))
