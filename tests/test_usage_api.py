"""Usage and cost reports (issue 14): the counters the ledger writes with every charge, read
by ``/api/v1/llm/usage/{costs,completions,embeddings,responses}``, against the mock's usage
priced independently and against the budget gauge — in every grouping and bucket width, and
through every way spend enters the books (settle, reclaim, late correction, malformed lease).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis
from conftest import FakeClock, Proxy
from helpers import user_messages

from proxy.catalog.pricing import cost_nano
from proxy.gateway.lease_sweeper import sweep_once
from proxy.gateway.settle_spool import SettleRequest
from proxy.gateway.state import GATEWAY
from proxy.ledger.admission import Admitted
from proxy.ledger.api_keys import Identity
from proxy.ledger.windows import windows_at

MESSAGES = user_messages("tell me about rate limits")
WIDTHS = {"1m": 60, "1h": 3600, "1d": 86400}
REPORT_OF = {
    "chat/completions": "completions",
    "embeddings": "embeddings",
    "responses": "responses",
}


@dataclass(frozen=True)
class Charge:
    """One request as the client saw it, priced by the test from the mock's usage."""

    org: str
    key_id: str
    model: str
    endpoint: str
    user: str | None
    input_tokens: int
    cached: int
    output: int
    cost: int


def month_start(now: float) -> int:
    moment = datetime.fromtimestamp(now, UTC)
    return int(datetime(moment.year, moment.month, 1, tzinfo=UTC).timestamp())


def day_range(now: float) -> tuple[int, int]:
    start = int(now) - int(now) % 86400
    return start, start + 86400


def price_of(proxy: Proxy, model: str, inp: int, out: int, cached: int = 0) -> int:
    route = proxy.app[GATEWAY].routes.get(model)
    assert route is not None
    return cost_nano(route.price, inp, out, cached)


async def get(proxy: Proxy, path: str, key: str | None = None, **params: Any) -> tuple[int, Any]:
    """A GET with repeated params for lists (``group_by=a&group_by=b``), as the client sends."""
    query: list[tuple[str, str]] = []
    headers = {"Authorization": f"Bearer {key or proxy.admin_key}"}
    for name, value in params.items():
        if name == "on_behalf_of":
            headers["X-On-Behalf-Of"] = value
        elif isinstance(value, list):
            query.extend((name, str(v)) for v in value)
        elif value is not None:
            query.append((name, str(value)))
    async with proxy.session.get(proxy.url + path, params=query, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def costs(proxy: Proxy, start: int, end: int, **params: Any) -> Any:
    status, body = await get(
        proxy, "/api/v1/llm/usage/costs", start_time=start, end_time=end, **params
    )
    assert status == 200, body
    return body


async def all_buckets(proxy: Proxy, report: str, **params: Any) -> list[dict[str, Any]]:
    """Every bucket of a bucketed report, following ``next_page``."""
    found: list[dict[str, Any]] = []
    page = None
    while True:
        status, body = await get(proxy, f"/api/v1/llm/usage/{report}", page=page, **params)
        assert status == 200, body
        assert body["object"] == "page" and body["has_more"] == (body["next_page"] is not None)
        found.extend(body["data"])
        if not body["has_more"]:
            return found
        page = body["next_page"]


async def mixed_load(proxy: Proxy) -> tuple[list[Charge], dict[str, str], int]:
    """Several keys, orgs, models, end users, buffered and streamed, and refused requests.
    Returns the charges, the key plaintexts by id and how many requests were refused."""
    keys: dict[str, str] = {}
    for org, spec in (
        ("acme", {}),
        ("acme", {"limits": {"rpm": 3}}),
        ("acme", {"role": "org_admin"}),
        ("globex", {}),
    ):
        kid, key = await proxy.create_key(org, **spec)
        keys[kid] = key
    kids = list(keys)
    orgs = {kids[0]: "acme", kids[1]: "acme", kids[2]: "acme", kids[3]: "globex"}
    charges: list[Charge] = []
    refused = 0
    users = [None, "alice", "bob@example.com"]
    plan = list(itertools.product(kids, ["gpt-4o-mini", "gpt-4o"], users, [False, True]))

    async def chat(kid: str, model: str, user: str | None, stream: bool, cached: int) -> None:
        nonlocal refused
        client = proxy.openai(keys[kid])
        headers = {"x-mock-output-tokens": str(3 + len(charges) % 5)}
        if cached:
            headers["x-mock-cached-tokens"] = str(cached)
        if user:
            headers["X-On-Behalf-Of"] = user
        try:
            if stream:
                usage = None
                answer = await client.chat.completions.create(
                    model=model,
                    messages=MESSAGES,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_headers=headers,
                )
                async for chunk in answer:
                    usage = chunk.usage or usage
            else:
                done = await client.chat.completions.create(
                    model=model,
                    messages=MESSAGES,
                    extra_headers=headers,
                )
                usage = done.usage
        except Exception as exc:  # a refusal: counted, charged nothing
            assert getattr(exc, "status_code", None) == 429, exc
            refused += 1
            return
        assert usage is not None
        got_cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        charges.append(
            Charge(
                orgs[kid],
                kid,
                model,
                "chat/completions",
                user,
                usage.prompt_tokens,
                got_cached or 0,
                usage.completion_tokens,
                price_of(
                    proxy, model, usage.prompt_tokens, usage.completion_tokens, got_cached or 0
                ),
            )
        )

    for n, (kid, model, user, stream) in enumerate(plan):
        await chat(kid, model, user, stream, cached=4 if n % 4 == 0 else 0)
    # Embeddings and the Responses API, buffered and streamed.
    for kid, user in ((kids[0], "alice"), (kids[3], None), (kids[2], "carol")):
        client = proxy.openai(keys[kid])
        headers = {"X-On-Behalf-Of": user} if user else {}
        emb = await client.embeddings.create(
            model="text-embedding-3-small", input="count me", extra_headers=headers
        )
        charges.append(
            Charge(
                orgs[kid],
                kid,
                "text-embedding-3-small",
                "embeddings",
                user,
                emb.usage.prompt_tokens,
                0,
                0,
                price_of(proxy, "text-embedding-3-small", emb.usage.prompt_tokens, 0),
            )
        )
        for stream in (False, True):
            out_headers = {**headers, "x-mock-output-tokens": "6", "x-mock-cached-tokens": "2"}
            if stream:
                events = await client.responses.create(
                    model="gpt-4o", input="a story", stream=True, extra_headers=out_headers
                )
                resp_usage = None
                async for event in events:
                    if event.type == "response.completed":
                        resp_usage = event.response.usage
            else:
                resp = await client.responses.create(
                    model="gpt-4o", input="a story", extra_headers=out_headers
                )
                resp_usage = resp.usage
            assert resp_usage is not None
            cached = resp_usage.input_tokens_details.cached_tokens
            charges.append(
                Charge(
                    orgs[kid],
                    kid,
                    "gpt-4o",
                    "responses",
                    user,
                    resp_usage.input_tokens,
                    cached,
                    resp_usage.output_tokens,
                    price_of(
                        proxy, "gpt-4o", resp_usage.input_tokens, resp_usage.output_tokens, cached
                    ),
                )
            )
    return charges, keys, refused


def expected_groups(charges: list[Charge], dims: list[str]) -> dict[tuple[Any, ...], int]:
    names = {
        "model": "model",
        "api_key_id": "key_id",
        "external_user_id": "user",
        "org_id": "org",
    }
    sums: dict[tuple[Any, ...], int] = defaultdict(int)
    for c in charges:
        sums[tuple(None if d == "team_id" else getattr(c, names[d]) for d in dims)] += c.cost
    return dict(sums)


async def test_reports_equal_the_priced_usage_and_the_budget_gauge_in_every_grouping(
    proxy: Proxy,
) -> None:
    charges, _, refused = await mixed_load(proxy)
    assert refused > 0 and len({c.user for c in charges}) == 4
    start, end = day_range(proxy.clock())
    total = sum(c.cost for c in charges)

    # Costs: every grouping, one and several dimensions at once.
    dims_all = ["model", "api_key_id", "team_id", "external_user_id", "org_id"]
    for size in (1, 2, 5):
        for combo in itertools.combinations(dims_all, size):
            body = await costs(proxy, start, end, group_by=list(combo))
            assert body["object"] == "usage.costs" and body["group_by"] == list(combo)
            assert body["total_cost_nano"] == str(total)
            assert sum(int(r["cost_nano"]) for r in body["data"]) == total
            got = {tuple(r[d] for d in combo): int(r["cost_nano"]) for r in body["data"]}
            assert got == expected_groups(charges, list(combo)), combo
            for row in body["data"]:
                assert set(dims_all) <= set(row)
                assert all(row[d] is None for d in dims_all if d not in combo)
                assert row["cost"] == int(row["cost_nano"]) / 1e9
    # No group_by: by model; one org; an end user through X-On-Behalf-Of.
    body = await costs(proxy, start, end)
    assert body["group_by"] == ["model"]
    acme = await costs(proxy, start, end, org_id="acme")
    acme_total = sum(c.cost for c in charges if c.org == "acme")
    assert acme["total_cost_nano"] == str(acme_total)
    alice = await costs(proxy, start, end, on_behalf_of="alice", group_by=["external_user_id"])
    assert [r["external_user_id"] for r in alice["data"]] == ["alice"]
    assert alice["total_cost_nano"] == str(sum(c.cost for c in charges if c.user == "alice"))

    # The budget gauge over the same window: the org's daily spend, to the nano.
    status, budget = await proxy.admin(
        "PUT",
        "/api/v1/llm/budgets/org/acme",
        {
            "period": "daily",
            "limit_kind": "cost",
            "limit": 1000,
            "thresholds": [{"pct": 100, "action": "block"}],
        },
    )
    assert status == 200, budget
    gauge = budget["spend"]
    assert gauge["window"] == time.strftime("%Y-%m-%d", time.gmtime(start))
    assert gauge["cost_spent_nano"] == str(acme_total)
    # ...and over the ISO week and the month, for the key with the most spend.
    kid = max(
        {c.key_id for c in charges}, key=lambda k: sum(c.cost for c in charges if c.key_id == k)
    )
    windows = windows_at(proxy.clock())
    for period, first, stop in (
        ("weekly", windows.weekly_end - 7 * 86400, windows.weekly_end),
        ("monthly", month_start(proxy.clock()), windows.monthly_end),
    ):
        status, budget = await proxy.admin(
            "PUT",
            f"/api/v1/llm/budgets/apikey/{kid}",
            {
                "period": period,
                "limit_kind": "cost",
                "limit": 5,
                "thresholds": [{"pct": 90, "action": "alert"}],
            },
        )
        assert status == 200, budget
        body = await costs(proxy, int(first), int(stop), group_by="api_key_id")
        mine = {r["api_key_id"]: r["cost_nano"] for r in body["data"]}[kid]
        assert budget["spend"]["cost_spent_nano"] == mine, period

    # Bucketed reports: every width, the sums of each report's endpoints, tokens included.
    for width, seconds in WIDTHS.items():
        for report in ("completions", "embeddings", "responses"):
            mine = [c for c in charges if REPORT_OF[c.endpoint] == report]
            for dims in ([], ["model"], ["api_key_id", "org_id"], ["user_id", "model"]):
                found = await all_buckets(
                    proxy,
                    report,
                    start_time=start,
                    end_time=end,
                    bucket_width=width,
                    limit=(17 if not dims else 1440) if width == "1m" else None,
                    group_by=dims,
                )
                assert len(found) == 86400 // seconds
                starts = [b["start_time"] for b in found]
                assert starts == sorted(set(starts)) and starts[0] == start
                assert all(b["end_time"] - b["start_time"] == seconds for b in found)
                results = [r for b in found for r in b["results"]]
                assert sum(r["num_model_requests"] for r in results) == len(mine)
                assert sum(r["input_tokens"] for r in results) == sum(c.input_tokens for c in mine)
                if report != "embeddings":
                    assert sum(r["output_tokens"] for r in results) == sum(c.output for c in mine)
                    assert sum(r["input_cached_tokens"] for r in results) == sum(
                        c.cached for c in mine
                    )
                for r in results:
                    for d in ("user_id", "api_key_id", "org_id", "model"):
                        assert d in r and (d in dims or r[d] is None)
                    assert r["user_id"] is None
                if dims == ["model"] and width == "1d":
                    by_model: Counter[str] = Counter()
                    for r in results:
                        by_model[r["model"]] += r["num_model_requests"]
                    assert by_model == Counter(c.model for c in mine)


async def test_filters_restrict_what_is_counted(proxy: Proxy) -> None:
    charges, _, _ = await mixed_load(proxy)
    start, end = day_range(proxy.clock())
    chat = [c for c in charges if c.endpoint == "chat/completions"]

    async def requests(**params: Any) -> int:
        found = await all_buckets(proxy, "completions", start_time=start, end_time=end, **params)
        return sum(r["num_model_requests"] for b in found for r in b["results"])

    assert await requests(models="gpt-4o") == sum(c.model == "gpt-4o" for c in chat)
    assert await requests(models=["gpt-4o", "gpt-4o-mini"]) == len(chat)
    assert await requests(external_user_ids=["alice", "bob@example.com"]) == sum(
        c.user in ("alice", "bob@example.com") for c in chat
    )
    assert await requests(org_ids="globex") == sum(c.org == "globex" for c in chat)
    assert await requests(org_ids=["acme", "globex"], all_orgs="true") == len(chat)
    assert await requests(user_ids="someone") == 0
    some_key = chat[0].key_id
    assert await requests(api_key_ids=some_key) == sum(c.key_id == some_key for c in chat)
    assert await requests(on_behalf_of="alice") == sum(c.user == "alice" for c in chat)
    responses = await all_buckets(
        proxy, "responses", start_time=start, end_time=end, background="true"
    )
    assert all(b["results"] == [] for b in responses)
    grouped = await all_buckets(
        proxy, "responses", start_time=start, end_time=end, group_by="background"
    )
    assert {r["background"] for b in grouped for r in b["results"]} == {False}


async def test_paging_is_ascending_disjoint_and_bound_to_its_query(proxy: Proxy) -> None:
    await mixed_load(proxy)
    start, _ = day_range(proxy.clock())
    end = start + 10 * 86400
    status, first = await get(
        proxy, "/api/v1/llm/usage/completions", start_time=start, end_time=end, limit=3
    )
    assert status == 200 and len(first["data"]) == 3 and first["has_more"] is True
    pages = [first]
    while pages[-1]["has_more"]:
        status, body = await get(
            proxy,
            "/api/v1/llm/usage/completions",
            start_time=start,
            end_time=end,
            limit=3,
            page=pages[-1]["next_page"],
        )
        assert status == 200, body
        pages.append(body)
    starts = [b["start_time"] for p in pages for b in p["data"]]
    assert starts == [start + d * 86400 for d in range(10)]
    assert [len(p["data"]) for p in pages] == [3, 3, 3, 1]
    # Defaults: bucket_width 1d, 7 buckets a page, end_time now.
    status, body = await get(proxy, "/api/v1/llm/usage/completions", start_time=start - 86400 * 9)
    assert status == 200 and len(body["data"]) == 7 and body["has_more"] is True
    # A cursor is validated: from another query, or made up, it is a 400 naming 'page'.
    for bad in (first["next_page"] + "x", "bm90IGEgY3Vyc29y", "v1.1.2.abc"):
        status, body = await get(
            proxy, "/api/v1/llm/usage/completions", start_time=start, end_time=end, page=bad
        )
        assert status == 400 and body["error"]["param"] == "page", bad
    status, body = await get(
        proxy,
        "/api/v1/llm/usage/completions",
        start_time=start,
        end_time=end,
        models="gpt-4o",
        page=first["next_page"],
    )
    assert status == 400 and body["error"]["param"] == "page"


@pytest.mark.parametrize(
    ("path", "params", "param"),
    [
        ("costs", {"end_time": 2}, "start_time"),
        ("costs", {"start_time": 1}, "end_time"),
        ("costs", {"start_time": "1.5", "end_time": 9}, "start_time"),
        ("costs", {"start_time": 5, "end_time": 5}, "end_time"),
        ("costs", {"start_time": 1, "end_time": 1764547200000}, "end_time"),
        ("costs", {"start_time": 1, "end_time": 9, "group_by": "user_id"}, "group_by"),
        ("completions", {}, "start_time"),
        ("completions", {"start_time": 1, "bucket_width": "5m"}, "bucket_width"),
        ("completions", {"start_time": 1, "group_by": "external_user_id"}, "group_by"),
        ("completions", {"start_time": 1, "limit": 32}, "limit"),
        ("completions", {"start_time": 1, "bucket_width": "1h", "limit": 0}, "limit"),
        ("completions", {"start_time": 1, "all_orgs": "maybe"}, "all_orgs"),
        ("completions", {"start_time": 1, "org_ids": "a}b"}, "org_ids"),
        ("embeddings", {"start_time": 1, "group_by": "background"}, "group_by"),
        ("responses", {"start_time": 1, "background": "perhaps"}, "background"),
    ],
)
async def test_a_bad_query_is_a_400_naming_the_param(
    proxy: Proxy, path: str, params: dict[str, Any], param: str
) -> None:
    status, body = await get(proxy, f"/api/v1/llm/usage/{path}", **params)
    assert status == 400, body
    assert body["error"]["param"] == param and body["error"]["type"] == "invalid_request_error"


async def test_who_may_read_what(proxy: Proxy) -> None:
    charges, keys, _ = await mixed_load(proxy)
    member, _, org_admin, _ = keys.values()
    start, end = day_range(proxy.clock())
    window = {"start_time": start, "end_time": end}
    _, other_admin = await proxy.create_key("globex", role="org_admin")
    acme_total = str(sum(c.cost for c in charges if c.org == "acme"))
    globex_total = str(sum(c.cost for c in charges if c.org == "globex"))
    # Members: 403 on every report.
    for path in ("costs", "completions", "embeddings", "responses", "requests"):
        status, body = await get(proxy, f"/api/v1/llm/usage/{path}", member, **window)
        assert status == 403 and body["error"]["type"] == "permission_error", path
    # An org admin sees their org only; naming another org, existing or not, is a 403.
    status, body = await get(proxy, "/api/v1/llm/usage/costs", org_admin, **window)
    assert status == 200 and body["total_cost_nano"] == acme_total
    status, body = await get(
        proxy, "/api/v1/llm/usage/costs", org_admin, org_id="acme", group_by="org_id", **window
    )
    assert status == 200 and {r["org_id"] for r in body["data"]} == {"acme"}
    for other in ("globex", "no-such-org"):
        status, _ = await get(proxy, "/api/v1/llm/usage/costs", org_admin, org_id=other, **window)
        assert status == 403
        status, _ = await get(
            proxy, "/api/v1/llm/usage/completions", org_admin, org_ids=other, **window
        )
        assert status == 403
        status, _ = await get(
            proxy, "/api/v1/llm/usage/requests", org_admin, org_id=other, **window
        )
        assert status == 403
    status, _ = await get(
        proxy, "/api/v1/llm/usage/completions", org_admin, all_orgs="true", **window
    )
    assert status == 403
    status, body = await get(proxy, "/api/v1/llm/usage/costs", other_admin, **window)
    assert status == 200 and body["total_cost_nano"] == globex_total
    # Cluster admins: every org by default, any org by id, their own with all_orgs=false.
    body = await costs(proxy, start, end, group_by="org_id")
    assert {r["org_id"]: r["cost_nano"] for r in body["data"]} == {
        "acme": acme_total,
        "globex": globex_total,
    }
    body = await costs(proxy, start, end, org_id="globex")
    assert body["total_cost_nano"] == globex_total
    status, body = await get(
        proxy, "/api/v1/llm/usage/completions", all_orgs="false", start_time=start
    )
    assert status == 200 and all(b["results"] == [] for b in body["data"])
    # No key, or an unknown one: 401.
    status, _ = await get(proxy, "/api/v1/llm/usage/costs", "sk-bp-unknown", **window)
    assert status == 401


# --- every charge path ---------------------------------------------------------------------


async def report_totals(proxy: Proxy, org: str) -> dict[str, tuple[int, int, int, int, int]]:
    """Per width: (requests, input, cached, output, cost) of the org over the whole day."""
    start, end = day_range(proxy.clock())
    totals = {}
    for width in WIDTHS:
        sums = [0, 0, 0, 0, 0]
        for report in ("completions", "embeddings", "responses"):
            for b in await all_buckets(
                proxy,
                report,
                start_time=start,
                end_time=end,
                bucket_width=width,
                org_ids=org,
                limit=1440 if width == "1m" else None,
            ):
                for r in b["results"]:
                    sums[0] += r["num_model_requests"]
                    sums[1] += r["input_tokens"]
                    sums[2] += r.get("input_cached_tokens", 0)
                    sums[3] += r.get("output_tokens", 0)
        body = await costs(proxy, start, end, org_id=org)
        sums[4] = int(body["total_cost_nano"])
        totals[width] = tuple(sums)
    return totals  # type: ignore[return-value]


def settle(
    proxy: Proxy,
    who: Identity,
    rid: str,
    inp: int,
    out: int,
    cost: int,
    cached: int = 0,
    user: str = "",
    at: float | None = None,
) -> SettleRequest:
    record: dict[str, str | int | None] = {
        "rid": rid,
        "kid": who.key_id,
        "user": user,
        "model": "gpt-4o",
        "endpoint": "chat/completions",
        "in": inp,
        "out": out,
        "cached": cached,
        "cost_nano": cost,
    }
    req = proxy.app[GATEWAY].admission.settle_request(who, rid, inp + out, cost, record)
    if at is not None:
        req.at = at
    return req


async def test_a_reclaimed_lease_and_its_late_settle_are_reported_exactly(
    start_proxy: Any,
) -> None:
    clock = FakeClock()
    proxy: Proxy = await start_proxy(clock=clock, limits={"sweep_seconds": 3600})
    kid, _ = await proxy.create_key()
    gw = proxy.app[GATEWAY]
    who = Identity(kid, "acme", "member")
    for rid, user in (("req_swept", "dana"), ("req_admitted", "")):
        decision = await gw.admission.admit(
            who,
            rid,
            1000,
            50_000,
            prompt_tokens=400,
            model="gpt-4o",
            endpoint="chat/completions",
            end_user=user or None,
        )
        assert isinstance(decision, Admitted)
    clock.advance(gw.settings.limits.lease_seconds + 1)
    # Their proxy looks dead: the sweeper charges each its reservation (this pass, or the
    # app's own sweeper if its first tick came after the clock moved).
    await sweep_once(gw)
    assert await gw.redis.zcard("bp:{o:acme}:leases") == 0
    reclaimed = (2, 800, 0, 1200, 100_000)
    assert set((await report_totals(proxy, "acme")).values()) == {reclaimed}
    body = await costs(proxy, *day_range(clock()), group_by="external_user_id")
    assert {r["external_user_id"]: r["cost_nano"] for r in body["data"]} == {
        "dana": "50000",
        None: "50000",
    }
    # Their proxy settles after all: the charge becomes the actual usage, in every width.
    await gw.admission.settle(settle(proxy, who, "req_swept", 420, 30, 7_000, cached=100))
    await gw.admission.settle(settle(proxy, who, "req_admitted", 10, 0, 0))
    expected = (2, 430, 100, 30, 7_000)
    assert set((await report_totals(proxy, "acme")).values()) == {expected}
    # ...and only once.
    await gw.admission.settle(settle(proxy, who, "req_swept", 420, 30, 7_000, cached=100))
    assert set((await report_totals(proxy, "acme")).values()) == {expected}
    status, budgets = await proxy.admin(
        "PUT",
        "/api/v1/llm/budgets/org/acme",
        {
            "period": "daily",
            "limit_kind": "cost",
            "limit": 1,
            "thresholds": [{"pct": 100, "action": "alert"}],
        },
    )
    assert status == 200 and budgets["spend"]["cost_spent_nano"] == "7000"


async def test_a_lease_reclaimed_by_an_admission_is_reported(start_proxy: Any) -> None:
    clock = FakeClock()
    proxy: Proxy = await start_proxy(clock=clock, limits={"sweep_seconds": 3600})
    kid, key = await proxy.create_key()
    gw = proxy.app[GATEWAY]
    who = Identity(kid, "acme", "member")
    decision = await gw.admission.admit(
        who, "req_dead", 100, 9_000, prompt_tokens=60, model="gpt-4o", endpoint="responses"
    )
    assert isinstance(decision, Admitted)
    clock.advance(gw.settings.limits.lease_seconds + 1)
    done = await proxy.openai(key).embeddings.create(model="text-embedding-3-small", input="x")
    emb_cost = price_of(proxy, "text-embedding-3-small", done.usage.prompt_tokens, 0)
    start, end = day_range(clock())
    body = await costs(proxy, start, end, group_by=["model", "api_key_id"])
    assert {r["model"]: r["cost_nano"] for r in body["data"]} == {
        "gpt-4o": "9000",
        "text-embedding-3-small": str(emb_cost),
    }
    responses = await all_buckets(proxy, "responses", start_time=start, end_time=end)
    assert [(r["input_tokens"], r["output_tokens"]) for b in responses for r in b["results"]] == [
        (60, 40)
    ]


async def test_a_malformed_lease_is_charged_and_reported(
    proxy: Proxy, store: aioredis.Redis
) -> None:
    kid, _ = await proxy.create_key()
    gw = proxy.app[GATEWAY]
    who = Identity(kid, "acme", "member")
    decision = await gw.admission.admit(
        who, "req_torn", 500, 20_000, prompt_tokens=100, model="gpt-4o", endpoint="chat/completions"
    )
    assert isinstance(decision, Admitted)
    await store.hset("bp:{o:acme}:lease:req_torn", "c", "not a number")
    await gw.admission.settle(settle(proxy, who, "req_torn", 120, 8, 3_300, user="erin"))
    assert set((await report_totals(proxy, "acme")).values()) == {(1, 120, 0, 8, 3_300)}


async def test_end_users_past_the_cap_are_counted_as_other(start_proxy: Any) -> None:
    proxy: Proxy = await start_proxy(usage={"end_user_cap": 2})
    _, key = await proxy.create_key()
    client = proxy.openai(key)
    costs_by_user: Counter[str | None] = Counter()
    for user in ("u1", "u2", "u3", "u1", "u4", None, "u3"):
        headers = {"X-On-Behalf-Of": user} if user else {}
        done = await client.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            extra_headers=headers,  # type: ignore[arg-type]
        )
        assert done.usage is not None
        cost = price_of(proxy, "gpt-4o", done.usage.prompt_tokens, done.usage.completion_tokens)
        costs_by_user[user if user in ("u1", "u2", None) else "(other)"] += cost
    body = await costs(proxy, *day_range(proxy.clock()), group_by="external_user_id")
    assert {r["external_user_id"]: int(r["cost_nano"]) for r in body["data"]} == dict(costs_by_user)
    assert int(body["total_cost_nano"]) == sum(costs_by_user.values())


async def test_buckets_expire_after_their_retention_and_late_settles_respect_it(
    start_proxy: Any, store: aioredis.Redis
) -> None:
    clock = FakeClock()
    proxy: Proxy = await start_proxy(
        clock=clock, usage={"retention_1m_hours": 2, "retention_1h_days": 3}
    )
    kid, key = await proxy.create_key()
    await proxy.openai(key).embeddings.create(model="text-embedding-3-small", input="x")
    now = int(clock())
    ttls = {
        width: await store.ttl(f"bp:{{o:acme}}:usage:{width[1]}:{now - now % seconds}")
        for width, seconds in WIDTHS.items()
    }
    minute_end = now - now % 60 + 60
    hour_end = now - now % 3600 + 3600
    day_end = now - now % 86400 + 86400
    assert abs(ttls["1m"] - (minute_end + 2 * 3600 - now)) <= 2
    assert abs(ttls["1h"] - (hour_end + 3 * 86400 - now)) <= 2
    assert abs(ttls["1d"] - (day_end + 400 * 86400 - now)) <= 2
    # A settle replayed long after its request: minutes past their retention are not written
    # again, the day still counts it (as do the spend windows).
    gw = proxy.app[GATEWAY]
    who = Identity(kid, "acme", "member")
    old = clock() - 5 * 3600
    decision = await gw.admission.admit(who, "req_replayed", 20, 1000, model="gpt-4o")
    assert isinstance(decision, Admitted)
    await gw.admission.settle(settle(proxy, who, "req_replayed", 10, 5, 777, at=old))
    old_minute = int(old) - int(old) % 60
    assert await store.exists(f"bp:{{o:acme}}:usage:m:{old_minute}") == 0
    assert await store.exists(f"bp:{{o:acme}}:usage:h:{int(old) - int(old) % 3600}") == 1


async def test_counters_stay_exact_past_two_to_the_53(proxy: Proxy, store: aioredis.Redis) -> None:
    """A Lua number is exact up to 2^53 - 1: a sum past it continues in a spill field."""
    kid, _ = await proxy.create_key()
    gw = proxy.app[GATEWAY]
    who = Identity(kid, "acme", "member")
    charged = [2**53 - 10, 2**40 + 1, 2**52 + 3]  # the sum of the first two is odd: no double
    for n, cost in enumerate(charged):
        decision = await gw.admission.admit(
            who, f"req_big{n}", 10, 0, model="gpt-4o", endpoint="chat/completions"
        )
        assert isinstance(decision, Admitted)
        await gw.admission.settle(settle(proxy, who, f"req_big{n}", 5, 5, cost))
    start, end = day_range(proxy.clock())
    body = await costs(proxy, start, end)
    assert body["total_cost_nano"] == str(sum(charged))
    assert body["data"][0]["num_model_requests"] == 3


async def test_concurrent_settles_from_many_requests_add_up(start_proxy: Any) -> None:
    """Hundreds of requests in flight at once: the counters equal the sum of their usage.
    Client, proxy and mock share this test's one event loop, which 300 requests keep busy for
    a while: Redis's timeouts are widened so a slow machine cannot turn that into 503s."""
    proxy: Proxy = await start_proxy(redis={"socket_timeout": 10, "hot_path_timeout": 20})
    _, key = await proxy.create_key()
    client = proxy.openai(key)

    async def one(n: int) -> int:
        done = await client.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            extra_headers={"x-mock-output-tokens": str(1 + n % 9), "X-On-Behalf-Of": f"u{n % 7}"},
        )
        assert done.usage is not None
        return price_of(proxy, "gpt-4o", done.usage.prompt_tokens, done.usage.completion_tokens)

    spent = await asyncio.gather(*(one(n) for n in range(300)))
    body = await costs(proxy, *day_range(proxy.clock()), group_by="external_user_id")
    assert body["total_cost_nano"] == str(sum(spent))
    assert len(body["data"]) == 7


# --- recent requests -------------------------------------------------------------------------


async def test_recent_requests_take_the_org_rules_of_costs(proxy: Proxy) -> None:
    """Issue 23 item 5: without ``org_id`` a cluster admin reads every org (as /usage/costs
    does), merged newest first and paged across orgs without a record lost or repeated;
    ``all_orgs=false`` is its own org; ``org_id`` repeats."""
    charges, _, _ = await mixed_load(proxy)
    assert len({c.org for c in charges}) > 1
    seen: list[dict[str, Any]] = []
    page = None
    while True:
        status, body = await get(proxy, "/api/v1/llm/usage/requests", limit=3, page=page)
        assert status == 200, body
        seen.extend(body["data"])
        if not body["has_more"]:
            break
        page = body["next_page"]
    ids = [tuple(int(n) for n in r["id"].split("-")) for r in seen]
    assert ids == sorted(ids, reverse=True)
    assert Counter((r["org_id"], r["api_key_id"], int(r["cost_nano"])) for r in seen) == Counter(
        (c.org, c.key_id, c.cost) for c in charges
    )
    orgs = sorted({c.org for c in charges})
    status, body = await get(proxy, "/api/v1/llm/usage/requests", limit=1000, org_id=orgs)
    assert status == 200 and len(body["data"]) == len(charges)
    status, body = await get(proxy, "/api/v1/llm/usage/requests", all_orgs="false")
    assert status == 200 and {r["org_id"] for r in body["data"]} <= {"cluster"}


async def test_recent_requests_are_paged_newest_first_and_filtered(proxy: Proxy) -> None:
    charges, keys, _ = await mixed_load(proxy)
    acme = [c for c in charges if c.org == "acme"]
    member = next(iter(keys))
    seen: list[dict[str, Any]] = []
    page = None
    while True:
        status, body = await get(
            proxy, "/api/v1/llm/usage/requests", org_id="acme", limit=7, page=page
        )
        assert status == 200, body
        assert len(body["data"]) <= 7 and body["has_more"] == (body["next_page"] is not None)
        seen.extend(body["data"])
        if not body["has_more"]:
            break
        page = body["next_page"]
    ids = [tuple(int(n) for n in r["id"].split("-")) for r in seen]
    assert ids == sorted(set(ids), reverse=True)
    assert Counter(
        (
            r["api_key_id"],
            r["model"],
            r["endpoint"],
            r["external_user_id"],
            r["input_tokens"],
            r["input_cached_tokens"],
            r["output_tokens"],
            int(r["cost_nano"]),
        )
        for r in seen
    ) == Counter(
        (c.key_id, c.model, c.endpoint, c.user, c.input_tokens, c.cached, c.output, c.cost)
        for c in acme
    )
    first = seen[0]
    assert first["object"] == "usage.request" and first["request_id"].startswith("req_")
    assert first["status"] == 200 and first["reclaimed"] is False
    assert abs(first["created_at"] - time.time()) < 60

    async def listed(**params: Any) -> list[dict[str, Any]]:
        status, body = await get(
            proxy, "/api/v1/llm/usage/requests", org_id="acme", limit=1000, **params
        )
        assert status == 200, body
        data: list[dict[str, Any]] = body["data"]
        return data

    assert len(await listed(api_key_id=member)) == sum(c.key_id == member for c in acme)
    assert len(await listed(external_user_id="alice")) == sum(c.user == "alice" for c in acme)
    assert len(await listed(on_behalf_of="alice")) == sum(c.user == "alice" for c in acme)
    assert await listed(on_behalf_of="alice", external_user_id="bob@example.com") == []
    assert len(await listed(model="gpt-4o")) == sum(c.model == "gpt-4o" for c in acme)
    now = int(time.time())
    assert len(await listed(start_time=now - 600, end_time=now + 600)) == len(acme)
    assert await listed(start_time=now + 600) == []
    # A selective filter looks at no more than ten times the limit, and says there is more.
    status, body = await get(
        proxy, "/api/v1/llm/usage/requests", org_id="acme", limit=1, model="no-such-model"
    )
    assert status == 200 and body["data"] == [] and body["has_more"] is True
    # Bad input: 400 naming the param.
    for params, param in (
        ({"org_id": "acme", "page": "not-an-id"}, "page"),
        ({"org_id": "acme", "limit": 0}, "limit"),
        ({"org_id": "acme", "limit": 1001}, "limit"),
        ({"org_id": "no/such"}, "org_id"),
    ):
        status, body = await get(proxy, "/api/v1/llm/usage/requests", **params)
        assert status == 400 and body["error"]["param"] == param, params


async def test_anthropic_messages_count_as_completions_and_their_prices_are_listed(
    start_proxy: Any, mock_upstream: Any
) -> None:
    from test_anthropic_api import CACHE_HEADERS, MODEL, async_client, claude_sections, root
    from test_anthropic_api import MESSAGES as CLAUDE_MESSAGES
    from test_anthropic_api import expected_cost as claude_cost

    proxy: Proxy = await start_proxy(**claude_sections(root(mock_upstream)))
    _, key = await proxy.create_key("acme")
    client = async_client(proxy, key)
    buffered = await client.messages.create(
        model=MODEL, max_tokens=20, messages=CLAUDE_MESSAGES, extra_headers=CACHE_HEADERS
    )
    async with client.messages.stream(
        model="claude-haiku-4-5", max_tokens=20, messages=CLAUDE_MESSAGES
    ) as stream:
        streamed = await stream.get_final_message()
    counted = await client.messages.count_tokens(model=MODEL, messages=CLAUDE_MESSAGES)
    assert counted.input_tokens > 0
    haiku = proxy.app[GATEWAY].routes.get("claude-haiku-4-5")
    assert haiku is not None
    u = streamed.usage
    haiku_cost = cost_nano(haiku.price, u.input_tokens, u.output_tokens)
    start, end = day_range(proxy.clock())
    body = await costs(proxy, start, end)
    assert {r["model"]: int(r["cost_nano"]) for r in body["data"]} == {
        MODEL: claude_cost(buffered.usage),
        "claude-haiku-4-5": haiku_cost,
    }
    assert {r["model"]: r["num_model_requests"] for r in body["data"]} == {
        MODEL: 1,  # the message; the free token count is no model request (issue 23 item 5)
        "claude-haiku-4-5": 1,
    }
    found = await all_buckets(proxy, "completions", start_time=start, group_by="model")
    rows = {r["model"]: r for b in found for r in b["results"]}
    assert rows[MODEL]["num_model_requests"] == 1  # count_tokens is no completion
    requests_in = {r["model"]: r["num_model_requests"] for r in body["data"]}
    assert requests_in == {m: r["num_model_requests"] for m, r in rows.items()}  # they agree
    assert rows[MODEL]["input_cached_tokens"] == 4
    assert rows["claude-haiku-4-5"]["output_tokens"] == u.output_tokens
    # The pattern's name is priced (and listed) from its first use.
    status, prices = await get(proxy, "/api/v1/llm/models/pricing")
    assert status == 200
    listed = {row["model"]: row for row in prices["data"]}
    assert listed["claude-haiku-4-5"]["set_by"] == "genai-prices"
    assert listed[MODEL]["rates"]["cache_write_tokens"] == 3.75e-06


async def test_ranges_as_wide_as_the_clock_allows_cost_what_is_kept(proxy: Proxy) -> None:
    """Found by the contract run: a bucketed report from 1970 in minutes listed every minute
    since (tens of millions of buckets) before answering its first page, and a cost report to
    the year 5000 walked every day in between; both timed out, holding a core. Nothing outside
    what the counters keep can hold usage: the reports cost what a page (or the kept days)
    costs, and their figures are the same."""
    await mixed_load(proxy)
    start, end = day_range(proxy.clock())
    ever = await costs(proxy, 0, 10**11 - 1)
    today = await costs(proxy, start, end)
    assert ever["total_cost_nano"] == today["total_cost_nano"] != "0"
    status, page = await get(
        proxy, "/api/v1/llm/usage/completions", start_time=0, bucket_width="1m"
    )
    assert status == 200, page
    assert len(page["data"]) == 60 and page["has_more"] and page["data"][0]["start_time"] == 0


async def test_recent_requests_before_1970_are_none_not_a_503(proxy: Proxy) -> None:
    """Found by the contract run: ``end_time=0`` became the stream id ``-1`` (a Redis error,
    answered as 503 store_unavailable)."""
    await mixed_load(proxy)
    status, body = await get(proxy, "/api/v1/llm/usage/requests", org_id="acme", end_time=0)
    assert (status, body["data"], body["has_more"]) == (200, [], False)
