"""End-user budgets (``X-On-Behalf-Of``): the API of ``external-user/{id}`` and
``external-user-default``, the org's end-user policy (require the header, limits for each end
user, tracking), enforcement in the admit script — a default for each end user from their first
request, an explicit budget replacing it for one end user only — and the exact-admission claim
under real concurrency: 50 end users x 20 requests in flight over two proxy processes.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis
from conftest import (
    FakeClock,
    Proxy,
    budget,
    eventually,
)
from helpers import admin_call, chat_json, create_key_on, mock_output, user_messages
from test_budget_enforcement import calibrate, mini_price, month_now, n_fit_limit

from proxy.catalog.pricing import cost_nano
from proxy.catalog.tokenizer import count_prompt
from proxy.gateway.state import GATEWAY
from proxy.ledger.keys import end_user_tag

BASE = "/api/v1/llm/budgets"
NOON = datetime(2026, 11, 24, 12, 0, tzinfo=UTC).timestamp()
DAY, WEEK = "2026-11-24", "2026-W48"
MESSAGES = user_messages("say something nice about budgets")
POLICY = "/api/v1/orgs/{org}/end-user-policy"


@pytest.fixture
async def noon(start_proxy: Callable[..., Any]) -> Proxy:
    proxy: Proxy = await start_proxy(clock=FakeClock(NOON))
    return proxy


async def prompt_tokens(p: Proxy) -> int:
    route = p.app[GATEWAY].routes["gpt-4o"]
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 1}
    return await count_prompt(route.encoding, "chat/completions", body)


async def put(p: Proxy, path: str, body: dict[str, Any], key: str | None = None) -> Any:
    status, answer = await p.admin("PUT", BASE + path, body, key)
    assert status == 200, answer
    return answer


async def send(
    p: Proxy, key: str, user: str | None, max_tokens: int = 20, **headers: str
) -> tuple[int, Any, Any]:
    """A chat request (as the official SDK sends it) on behalf of ``user``."""
    all_headers = {"x-mock-output-tokens": str(max_tokens), **headers}
    if user is not None:
        all_headers["X-On-Behalf-Of"] = user
    try:
        answer = await p.openai(key).chat.completions.with_raw_response.create(
            model="gpt-4o",
            messages=MESSAGES,
            max_tokens=max_tokens,
            extra_headers=all_headers,
        )
    except openai.APIStatusError as exc:
        return exc.status_code, exc.response.json(), exc.response.headers
    return 200, answer.parse(), answer.headers


async def used(p: Proxy, key: str, user: str | None, max_tokens: int = 20) -> int:
    status, answer, _ = await send(p, key, user, max_tokens)
    assert status == 200, answer
    assert answer.usage.completion_tokens == max_tokens
    tokens: int = answer.usage.total_tokens
    return tokens


async def refused(p: Proxy, key: str, user: str | None, max_tokens: int = 20) -> dict[str, Any]:
    status, body, headers = await send(p, key, user, max_tokens)
    assert status == 429, body
    assert body["error"]["code"] == "budget_exceeded"
    assert headers["x-should-retry"] == "false"
    error: dict[str, Any] = body["error"]
    return error


def prefix(org: str) -> str:
    return f"bp:{{o:{org}}}:"


# --- the API ----------------------------------------------------------------------------


async def test_explicit_and_default_budgets_round_trip_with_their_shapes(noon: Proxy) -> None:
    p = noon
    await p.create_key("acme")  # the org exists
    user = "alice@example.com"
    b = await put(p, f"/external-user/{quote(user)}?org_id=acme", budget(limit=500))
    assert b["scope"] == "external_user" and b["scope_id"] == user
    assert b["scope_org_id"] == "acme" and b["owner"] == "org" and b["clamp"] is False
    assert b["spend"]["window"] == DAY and b["spend"]["tokens_spent"] == "0"
    assert b["spend"]["reset_at"] == "2026-11-25T00:00:00Z"
    d = await put(p, "/external-user-default?org_id=acme", budget(period="weekly", limit=200))
    assert d["scope"] == "external_user_default" and d["scope_id"] == "acme"
    assert d["scope_org_id"] == "acme" and "spend" not in d  # no gauge of its own
    status, listing = await p.admin("GET", f"{BASE}/external-user/{quote(user)}?org_id=acme")
    assert status == 200 and [x["id"] for x in listing["data"]] == [b["id"]]
    status, listing = await p.admin("GET", f"{BASE}/external-user-default?org_id=acme")
    assert status == 200 and [x["id"] for x in listing["data"]] == [d["id"]]
    # The list of every budget includes both new scopes.
    status, listing = await p.admin("GET", BASE)
    scopes = {(x["scope"], x["scope_id"]) for x in listing["data"]}
    assert {("external_user", user), ("external_user_default", "acme")} <= scopes
    # An unknown end user simply has no budgets; deleting what is not there is 404.
    status, listing = await p.admin("GET", f"{BASE}/external-user/bob?org_id=acme")
    assert (status, listing["data"]) == (200, [])
    status, _ = await p.admin("DELETE", f"{BASE}/external-user/bob?org_id=acme")
    assert status == 404
    status, gone = await p.admin("DELETE", f"{BASE}/external-user/{quote(user)}?org_id=acme")
    assert (status, gone) == (
        200,
        {"scope": "external_user", "scope_id": user, "owner": "org", "deleted": True},
    )
    status, gone = await p.admin("DELETE", f"{BASE}/external-user-default?org_id=acme")
    assert status == 200 and gone["scope"] == "external_user_default"


async def test_end_user_budgets_belong_to_the_callers_org_and_follow_the_owner_rules(
    noon: Proxy,
) -> None:
    p = noon
    _, acme_admin = await p.create_key("acme", role="org_admin")
    _, member = await p.create_key("acme")
    _, globex_admin = await p.create_key("globex", role="org_admin")
    # An org admin's budgets land in its own org, no org_id needed.
    b = await put(p, "/external-user/u1", budget(), key=acme_admin)
    assert b["scope_org_id"] == "acme"
    status, listing = await p.admin("GET", f"{BASE}/external-user/u1", key=globex_admin)
    assert (status, listing["data"]) == (200, [])  # globex's u1 is another end user
    # Another org by org_id: 404 for org admins, as for unknown orgs; cluster admins may.
    status, _ = await p.admin("GET", f"{BASE}/external-user/u1?org_id=acme", key=globex_admin)
    assert status == 404
    status, _ = await p.admin("GET", f"{BASE}/external-user/u1?org_id=nowhere")
    assert status == 404
    status, listing = await p.admin("GET", f"{BASE}/external-user/u1?org_id=acme")
    assert status == 200 and len(listing["data"]) == 1
    # Owner cluster: read-only for org admins; members may not even read.
    status, _ = await p.admin(
        "PUT", f"{BASE}/external-user-default", budget(owner="cluster"), key=acme_admin
    )
    assert status == 403
    await put(p, "/external-user-default?org_id=acme", budget(owner="cluster"))
    status, listing = await p.admin("GET", f"{BASE}/external-user-default", key=acme_admin)
    assert status == 200 and listing["data"][0]["owner"] == "cluster"
    status, _ = await p.admin(
        "DELETE", f"{BASE}/external-user-default?owner=cluster", key=acme_admin
    )
    assert status == 403
    for method, path in (
        ("GET", "/external-user/u1"),
        ("PUT", "/external-user/u1"),
        ("GET", "/external-user-default/events"),
    ):
        status, _ = await p.admin(method, BASE + path, budget(), key=member)
        assert status == 403, (method, path)


async def test_bad_end_user_ids_and_unknown_fields_are_400(noon: Proxy) -> None:
    p = noon
    await p.create_key("acme")
    status, body = await p.admin("PUT", f"{BASE}/external-user/{'x' * 257}?org_id=acme", budget())
    assert status == 400 and body["error"]["param"] == "externalUserId"
    status, body = await p.admin("PUT", f"{BASE}/external-user/a%09b?org_id=acme", budget())
    assert status == 400 and body["error"]["param"] == "externalUserId"  # a tab is not printable
    status, body = await p.admin(
        "PUT", f"{BASE}/external-user-default?org_id=acme", budget(per_user=True)
    )
    assert status == 400 and body["error"]["param"] == "per_user"
    status, body = await p.admin(
        "PUT", f"{BASE}/external-user-default?org_id=acme", budget(clamp="yes")
    )
    assert status == 400 and body["error"]["param"] == "clamp"


# --- enforcement --------------------------------------------------------------------------


async def test_a_default_applies_to_each_end_user_separately_from_their_first_request(
    noon: Proxy, store: aioredis.Redis
) -> None:
    p = noon
    prompt = await prompt_tokens(p)
    _, key = await p.create_key("acme")
    per_request = prompt + 20
    await put(p, "/external-user-default?org_id=acme", budget(limit=2 * per_request))
    for user in ("alice", "bob"):
        assert await used(p, key, user) == per_request
        assert await used(p, key, user) == per_request
        error = await refused(p, key, user)
        assert error["budget"]["scope"] == "external_user_default"
        assert error["budget"]["target_id"] == user
        assert f"default budget for each end user, here '{user}'" in error["message"]
    # Requests naming nobody are not end-user requests: no end-user budget applies.
    for _ in range(3):
        await used(p, key, None)
    # The org's and the key's own spend still count everything.
    t = await store.hget(prefix("acme") + f"spend:o:{DAY}", "t")
    assert int(t) == 7 * per_request
    for user in ("alice", "bob"):
        t = await store.hget(prefix("acme") + f"spend:{end_user_tag(user)}:{DAY}", "t")
        assert int(t) == 2 * per_request


async def test_an_explicit_budget_replaces_the_default_for_one_end_user_only(
    noon: Proxy,
) -> None:
    p = noon
    per_request = await prompt_tokens(p) + 20
    _, key = await p.create_key("acme")
    await put(p, "/external-user-default?org_id=acme", budget(limit=per_request))
    await put(p, "/external-user/vip?org_id=acme", budget(limit=3 * per_request))
    for _ in range(3):
        await used(p, key, "vip")
    assert (await refused(p, key, "vip"))["budget"]["scope"] == "external_user"
    await used(p, key, "regular")
    assert (await refused(p, key, "regular"))["budget"]["scope"] == "external_user_default"
    # Deleting the explicit budget brings the default back for vip — judged on vip's real
    # spend, which is over it already.
    status, _ = await p.admin("DELETE", f"{BASE}/external-user/vip?org_id=acme")
    assert status == 200
    assert (await refused(p, key, "vip"))["budget"]["scope"] == "external_user_default"
    # An explicit budget of another period does not replace the daily default: both apply.
    await put(p, "/external-user/newcomer?org_id=acme", budget(period="weekly", limit=10**6))
    await used(p, key, "newcomer")
    assert (await refused(p, key, "newcomer"))["budget"]["period"] == "daily"
    # Nor does one of the other owner: a cluster ceiling and the org's default both apply.
    await put(p, "/external-user/other?org_id=acme", budget(owner="cluster", limit=10**6))
    await used(p, key, "other")
    assert (await refused(p, key, "other"))["budget"]["owner"] == "org"


async def test_org_and_key_budgets_still_apply_to_end_user_requests(noon: Proxy) -> None:
    p = noon
    per_request = await prompt_tokens(p) + 20
    kid, key = await p.create_key("acme")
    await put(p, "/external-user-default?org_id=acme", budget(limit=10**6))
    await put(p, f"/apikey/{kid}", budget(limit=2 * per_request))
    await used(p, key, "a")
    await used(p, key, "b")
    assert (await refused(p, key, "c"))["budget"]["scope"] == "apikey"


async def test_end_user_events_name_their_end_user(noon: Proxy) -> None:
    p = noon
    per_request = await prompt_tokens(p) + 20
    _, key = await p.create_key("acme")
    thresholds = [{"pct": 50, "action": "alert"}, {"pct": 100, "action": "block"}]
    default = await put(
        p,
        "/external-user-default?org_id=acme",
        budget(limit=2 * per_request, thresholds=thresholds),
    )
    odd = "odd code:{x}/y"
    explicit = await put(
        p, f"/external-user/{quote(odd, safe='')}?org_id=acme", budget(limit=per_request)
    )
    for user in ("alice", "bob"):
        await used(p, key, user)
        await used(p, key, user)
    await used(p, key, odd)
    status, events = await p.admin("GET", f"{BASE}/external-user-default/events?org_id=acme")
    assert status == 200
    fired = Counter((e["target_id"], e["type"]) for e in events["data"])
    assert fired == {
        ("alice", "threshold_alert"): 1,
        ("alice", "blocked"): 1,
        ("bob", "threshold_alert"): 1,
        ("bob", "blocked"): 1,
    }
    assert {e["budget_id"] for e in events["data"]} == {default["id"]}
    status, events = await p.admin(
        "GET", f"{BASE}/external-user/{quote(odd, safe='')}/events?org_id=acme"
    )
    assert status == 200
    [event] = events["data"]
    assert (event["target_id"], event["budget_id"], event["type"]) == (
        odd,
        explicit["id"],
        "blocked",
    )
    # Crossings fire once per end user and window, however often they are crossed again.
    await refused(p, key, "alice")
    status, events = await p.admin("GET", f"{BASE}/external-user-default/events?org_id=acme")
    assert len(events["data"]) == 4


async def test_any_printable_id_keeps_to_the_orgs_slot_and_key_layout(
    noon: Proxy, store: aioredis.Redis
) -> None:
    p = noon
    _, key = await p.create_key("acme")
    await put(p, "/external-user-default?org_id=acme", budget(limit=10**6))
    odd = ["}{o:globex}:spend", "a b", "x:y:org", "日本語 ünï", "'; DROP", "%2F/..", "u:00"]
    for user in odd:
        # Raw HTTP: the SDK sends ASCII header values only; a header's UTF-8 bytes are valid.
        headers = {"Authorization": f"Bearer {key}", "X-On-Behalf-Of": user}
        async with p.session.post(
            p.url + "/v1/chat/completions",
            json={"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 5},
            headers=headers,
        ) as response:
            assert response.status == 200, await response.text()
    own = ("bp:{o:acme}:", "bp:{o:cluster}:", "bp:kd:", "bp:ki:", "bp:orgs", "bp:sweeper")
    strays = [k async for k in store.scan_iter("*") if not k.startswith(own)]
    assert strays == []
    for user in odd:
        tag = end_user_tag(user)
        assert tag[2:].isalnum() and bytes.fromhex(tag[2:]).decode() == user
        assert await store.exists(prefix("acme") + f"spend:{tag}:{DAY}")
    # The API names the same end user by the same id, percent-encoded in the path.
    status, listing = await p.admin(
        "PUT", f"{BASE}/external-user/{quote(odd[3], safe='')}?org_id=acme", budget(limit=10**6)
    )
    assert status == 200 and listing["spend"]["tokens_spent"] != "0"


async def test_an_end_user_who_stops_calling_leaves_only_expiring_keys(
    noon: Proxy, store: aioredis.Redis
) -> None:
    p = noon
    _, key = await p.create_key("acme")
    await put(p, "/external-user-default?org_id=acme", budget(limit=10**6))
    status, _ = await p.admin(
        "PUT", POLICY.format(org="acme"), {"limits": {"rpm": 100, "tpm": 10**6}}
    )
    assert status == 200
    await used(p, key, "carol")
    tag = end_user_tag("carol")
    names = [k async for k in store.scan_iter(prefix("acme") + f"*{tag}*")]
    assert names, "carol is tracked"
    assert not await store.exists(prefix("acme") + f"infl:{tag}"), "nothing in flight"
    for name in names:
        assert await store.ttl(name) > 0, f"{name} never expires"


async def test_orgs_without_end_user_rules_keep_nothing_per_end_user(
    noon: Proxy, store: aioredis.Redis
) -> None:
    p = noon
    _, key = await p.create_key("acme")
    await put(p, "/org/acme", budget(limit=10**6))
    await used(p, key, "dave")
    assert [k async for k in store.scan_iter(prefix("acme") + "*u:*")] == []
    # ... unless the org asks to track its end users ahead of any budget: then a default
    # created later judges the spend already made in the window.
    status, _ = await p.admin("PUT", POLICY.format(org="acme"), {"track_spend": True})
    assert status == 200
    spent = await used(p, key, "dave")
    await put(p, "/external-user-default?org_id=acme", budget(limit=spent + 1))
    assert (await refused(p, key, "dave"))["budget"]["reason"] == "exceeds"
    # Rules gone, nothing is kept for end users again.
    status, _ = await p.admin("DELETE", f"{BASE}/external-user-default?org_id=acme")
    assert status == 200
    status, _ = await p.admin("PUT", POLICY.format(org="acme"), {})
    assert status == 200
    await used(p, key, "eve")
    assert [k async for k in store.scan_iter(prefix("acme") + f"*{end_user_tag('eve')}*")] == []


async def test_an_unreadable_lease_of_an_end_user_does_not_hold_their_slot(
    noon: Proxy, store: aioredis.Redis
) -> None:
    p = noon
    kid, key = await p.create_key("acme")
    status, _ = await p.admin("PUT", POLICY.format(org="acme"), {"limits": {"concurrency": 1}})
    assert status == 200
    # Another end user's live request keeps the org's lease count above zero, so a leftover
    # counter is not healed merely for exceeding the live leases.
    slow = asyncio.create_task(send(p, key, "walt", 20, **{"x-mock-latency-ms": "1500"}))

    async def leased() -> bool:
        return int(await store.zcard(prefix("acme") + "leases")) == 1

    await eventually(leased, what="walt's lease")
    victim = end_user_tag("victor")
    await store.hset(
        prefix("acme") + "lease:req_bad", mapping={"k": kid, "c": "abc", "t": "5", "x": victim}
    )
    await store.zadd(prefix("acme") + "leases", {"req_bad": 0})
    await store.hset(prefix("acme") + f"infl:{victim}", mapping={"n": 1, "c": 5, "t": 5})
    # Set aside, its end user's counters are rebuilt with the org's and the key's.
    await used(p, key, "victor")
    assert await store.zrange(prefix("acme") + "leases:stuck", 0, -1) == ["req_bad"]
    assert (await slow)[0] == 200


# --- the org's end-user policy ------------------------------------------------------------


async def test_an_org_may_require_x_on_behalf_of(noon: Proxy) -> None:
    p = noon
    _, key = await p.create_key("acme")
    _, org_admin = await p.create_key("acme", role="org_admin")
    _, outsider = await p.create_key("globex")
    status, policy = await p.admin(
        "PUT", POLICY.format(org="acme"), {"require_on_behalf_of": True}, org_admin
    )
    assert (status, policy) == (
        200,
        {
            "org_id": "acme",
            "require_on_behalf_of": True,
            "track_spend": False,
            "limits": {
                "rps": None,
                "rpm": None,
                "rph": None,
                "rpd": None,
                "tpm": None,
                "concurrency": None,
            },
        },
    )
    calls = len(p.received())
    status, body, _ = await send(p, key, None)
    assert status == 400
    assert (body["error"]["param"], body["error"]["code"]) == (
        "X-On-Behalf-Of",
        "on_behalf_of_required",
    )
    assert len(p.received()) == calls  # refused before the upstream, charged nothing
    await used(p, key, "erin")
    await used(p, outsider, None)  # another org's rule


async def test_end_user_policy_validation_and_permissions(noon: Proxy) -> None:
    p = noon
    _, member = await p.create_key("acme")
    _, globex_admin = await p.create_key("globex", role="org_admin")
    status, _ = await p.admin("GET", POLICY.format(org="acme"), key=member)
    assert status == 403
    status, _ = await p.admin("GET", POLICY.format(org="acme"), key=globex_admin)
    assert status == 404
    for bad, param in (
        ({"require_on_behalf_of": "yes"}, "require_on_behalf_of"),
        ({"limits": {"rpm": 0}}, "limits.rpm"),
        ({"limits": {"rpx": 1}}, "limits.rpx"),
        ({"per_user": 1}, "per_user"),
    ):
        status, body = await p.admin("PUT", POLICY.format(org="acme"), bad)
        assert status == 400 and body["error"]["param"] == param, body
    # The org's own limits and its end-user policy share a hash: setting one keeps the other.
    await p.admin("PUT", POLICY.format(org="acme"), {"limits": {"rpm": 7}, "track_spend": True})
    status, _ = await p.admin("PUT", "/api/v1/orgs/acme/limits", {"rpm": 1000})
    assert status == 200
    status, policy = await p.admin("GET", POLICY.format(org="acme"))
    assert policy["limits"]["rpm"] == 7 and policy["track_spend"] is True
    status, limits = await p.admin("GET", "/api/v1/orgs/acme/limits")
    assert limits["limits"]["rpm"] == 1000


async def test_end_user_rate_limits_apply_to_each_end_user(noon: Proxy) -> None:
    p = noon
    _, key = await p.create_key("acme")
    status, _ = await p.admin("PUT", POLICY.format(org="acme"), {"limits": {"rpm": 2}})
    assert status == 200
    for user in ("frank", "grace"):
        await used(p, key, user)
        await used(p, key, user)
        status, body, headers = await send(p, key, user)
        assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
        assert "end user's limit of 2 requests per minute" in body["error"]["message"]
        assert headers["x-ratelimit-limit-requests"] == "2"
    await used(p, key, None)  # no end user, no end-user limit


async def test_end_user_concurrency_and_tokens_per_minute(
    noon: Proxy, store: aioredis.Redis
) -> None:
    p = noon
    prompt = await prompt_tokens(p)
    _, key = await p.create_key("acme")
    status, _ = await p.admin(
        "PUT",
        POLICY.format(org="acme"),
        {"limits": {"concurrency": 1, "tpm": 3 * (prompt + 100)}},
    )
    assert status == 200
    slow = asyncio.create_task(send(p, key, "heidi", 20, **{"x-mock-latency-ms": "1000"}))
    tag = end_user_tag("heidi")

    async def in_flight() -> bool:
        held: str | None = await store.hget(prefix("acme") + f"infl:{tag}", "n")
        return held == "1"

    await eventually(in_flight, what="heidi's first request in flight")
    status, body, _ = await send(p, key, "heidi")
    assert status == 429 and "concurrent requests" in body["error"]["message"]
    await used(p, key, "ivan")  # another end user is not held up
    assert (await slow)[0] == 200
    # Tokens per minute reserve the worst case and settle refunds the unused part.
    await used(p, key, "heidi", 100)
    await used(p, key, "heidi", 100)
    status, body, _ = await send(p, key, "heidi", 100)
    assert status == 429 and "tokens per minute" in body["error"]["message"]


# --- concurrency across processes -------------------------------------------------------


USERS = 50
IN_FLIGHT = 20
N = 3
VIP_N = 5


@pytest.mark.slow
async def test_exactly_n_per_end_user_with_1000_in_flight_on_two_processes(
    two_processes: list[str], store: aioredis.Redis
) -> None:
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 40}
    org = "resale"
    users = [f"user-{i:02d}" for i in range(USERS)]
    vip = users[0]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        url_a, url_b = two_processes
        cal = await calibrate(session, url_a, store, body)
        _, key = await create_key_on(session, url_a, org)
        line = n_fit_limit(N, cal.reserve_tokens, cal.used_tokens)
        vip_line = n_fit_limit(VIP_N, cal.reserve_tokens, cal.used_tokens)
        thresholds = [{"pct": 50, "action": "alert"}, {"pct": 100, "action": "block"}]
        spec = budget(period="monthly", limit=line, thresholds=thresholds)
        status, default = await admin_call(
            session, url_a, "PUT", f"{BASE}/external-user-default?org_id={org}", spec
        )
        assert status == 200, default
        spec = budget(period="monthly", limit=vip_line, thresholds=thresholds)
        status, explicit = await admin_call(
            session, url_b, "PUT", f"{BASE}/external-user/{vip}?org_id={org}", spec
        )
        assert status == 200, explicit

        async def one(i: int) -> tuple[str, int, Any]:
            user = users[i % USERS]
            headers = {"X-On-Behalf-Of": user, "x-mock-latency-ms": "300"}
            status, answer = await chat_json(
                session, two_processes[i % 2], key, body, mock_output(body["max_tokens"], headers)
            )
            return user, status, answer

        results = await asyncio.gather(*(one(i) for i in range(USERS * IN_FLIGHT)))

        admitted = Counter(user for user, status, _ in results if status == 200)
        codes = Counter(a["error"]["code"] for _, status, a in results if status != 200)
        assert codes == {"budget_exceeded": USERS * IN_FLIGHT - sum(admitted.values())}
        assert admitted == {vip: VIP_N, **{u: N for u in users[1:]}}, admitted

        # The books: every end user's spend, and the org's, equal the mock's usage exactly.
        month = month_now()
        p = prefix(org)
        usage_by_user: Counter[str] = Counter()
        for user, status, answer in results:
            if status == 200:
                usage_by_user[user] += answer["usage"]["total_tokens"]
        overshoot = 0
        for user in users:
            t = int(await store.hget(f"{p}spend:{end_user_tag(user)}:{month}", "t") or 0)
            assert t == usage_by_user[user], user
            overshoot += max(0, t - (vip_line if user == vip else line))
        org_cost, org_tokens = await store.hmget(f"{p}spend:o:{month}", "c", "t")
        assert int(org_tokens) == sum(usage_by_user.values())
        price = mini_price()
        assert int(org_cost) == sum(
            cost_nano(price, a["usage"]["prompt_tokens"], a["usage"]["completion_tokens"])
            for _, status, a in results
            if status == 200
        )
        print(
            f"\n{USERS} end users x {IN_FLIGHT} in flight on two processes: admitted "
            f"{sum(admitted.values())} ({N} each, vip {VIP_N}), overshoot {overshoot}, "
            f"org spend {org_tokens} tokens, {org_cost} nano == mock usage "
            f"{sum(usage_by_user.values())} tokens priced"
        )
        assert overshoot == 0
        assert await store.zcard(p + "leases") == 0
        assert [k async for k in store.scan_iter(p + "infl:*")] == []

        # Events: the default's crossings, one per end user, each naming its end user.
        status, events = await admin_call(
            session, url_a, "GET", f"{BASE}/external-user-default/events?org_id={org}"
        )
        assert status == 200
        fired = Counter((e["target_id"], e["type"]) for e in events["data"])
        assert max(fired.values()) == 1  # once per end user and window
        alerted = {target for target, kind in fired if kind == "threshold_alert"}
        assert alerted == set(users[1:])  # vip's default is replaced by vip's own budget
        assert {e["budget_id"] for e in events["data"]} == {default["id"]}
        status, events = await admin_call(
            session, url_a, "GET", f"{BASE}/external-user/{vip}/events?org_id={org}"
        )
        assert {e["target_id"] for e in events["data"]} == {vip}

        # Deleting vip's explicit org budget restores the default for vip alone: over it.
        status, _ = await admin_call(
            session, url_a, "DELETE", f"{BASE}/external-user/{vip}?org_id={org}&owner=org"
        )
        assert status == 200
        headers = mock_output(body["max_tokens"], {"X-On-Behalf-Of": vip})
        status, answer = await chat_json(session, url_b, key, body, headers)
        assert status == 429 and answer["error"]["budget"]["scope"] == "external_user_default"
