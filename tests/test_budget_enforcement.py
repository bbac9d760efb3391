"""Budgets enforced on the LLM path: what the client sees when a budget blocks, exactly where
the block line sits, which budgets apply to which requests, calendar windows rolling over, and
the atomicity claims — exact admission under real concurrency across two proxy processes (a
proxy killed mid-request: ``test_faults_ledger.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis
from conftest import (
    TEST_BATCH_SETTLES,
    FakeClock,
    Proxy,
    budget,
    eventually,
)
from helpers import admin_call, chat_json, create_key_on, metered_chat, mock_output, user_messages

from proxy.catalog.pricing import cost_nano, resolve_price
from proxy.catalog.tokenizer import count_prompt, get_encoding
from proxy.config import MeteringConfig, ModelConfig
from proxy.gateway.state import GATEWAY

BASE = "/api/v1/llm/budgets"
NANO = 1_000_000_000
MESSAGES = user_messages("say something nice about budgets")
ERROR_FIELDS = {"message", "type", "code", "param"}
BUDGET_DETAIL_FIELDS = {
    "scope",
    "scope_id",
    "owner",
    "period",
    "window",
    "limit_kind",
    "reason",
    "line",
    "used",
    "reserved",
    "remaining",
    "reset_at",
}


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


NOON = at("2026-11-24T12:00:00")  # a Tuesday


def chat_body(max_tokens: int, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
    return body


@dataclass
class Sizes:
    """What one chat request of this test's shape reserves and uses, from the proxy's own
    counting (reservation) and the mock's (usage); the test asserts they agree."""

    prompt: int

    def reserve(self, max_tokens: int) -> int:
        return self.prompt + max_tokens


async def sizes(proxy: Proxy) -> Sizes:
    route = proxy.app[GATEWAY].routes["gpt-4o"]
    prompt = await count_prompt(route.encoding, "chat/completions", chat_body(1))
    return Sizes(prompt)


async def put(proxy: Proxy, path: str, body: dict[str, Any], key: str | None = None) -> Any:
    status, answer = await proxy.admin("PUT", BASE + path, body, key)
    assert status == 200, answer
    return answer


async def ask(proxy: Proxy, key: str, max_tokens: int) -> int:
    """An admitted request; returns the tokens it used (prompt + max_tokens, exactly)."""
    return await metered_chat(proxy.openai(key), "gpt-4o", MESSAGES, max_tokens)


async def refused(proxy: Proxy, key: str, max_tokens: int = 1) -> openai.RateLimitError:
    """A request the budget refuses, as the openai SDK reports it."""
    with pytest.raises(openai.RateLimitError) as caught:
        await proxy.openai(key).chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            max_tokens=max_tokens,
            extra_headers={"x-mock-output-tokens": str(max_tokens)},
        )
    error = caught.value
    assert error.status_code == 429
    assert error.code == "budget_exceeded"
    assert error.type == "insufficient_quota"
    body = error.response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS | {"budget"}
    assert body["error"]["param"] is None
    assert set(body["error"]["budget"]) >= BUDGET_DETAIL_FIELDS
    assert error.response.headers["x-should-retry"] == "false"
    return error


def message(error: openai.RateLimitError) -> str:
    text: str = error.response.json()["error"]["message"]
    return text


async def books(store: aioredis.Redis, org: str) -> dict[str, Any]:
    """Everything a request could have left behind in the org: spend, leases, in-flight."""
    p = f"bp:{{o:{org}}}:"
    spend = {k: await store.hgetall(k) async for k in store.scan_iter(p + "spend:*")}
    inflight = {k: await store.hgetall(k) async for k in store.scan_iter(p + "infl:*")}
    return {
        "spend": spend,
        "leases": await store.zcard(p + "leases"),
        "inflight": {k: {f: int(v) for f, v in h.items() if int(v)} for k, h in inflight.items()},
        "usage": await store.xlen(p + "usage"),
    }


async def spend_of(store: aioredis.Redis, org: str, tag: str, window: str) -> tuple[int, int]:
    c, t = await store.hmget(f"bp:{{o:{org}}}:spend:{tag}:{window}", "c", "t")
    return int(c or 0), int(t or 0)


async def decisions(proxy: Proxy, decision: str) -> float:
    """The proxy's own count of admission outcomes, from /metrics."""
    async with proxy.session.get(proxy.url + "/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(f'llm_proxy_admission_decisions_total{{decision="{decision}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
async def noon(start_proxy: Callable[..., Any]) -> Proxy:
    proxy: Proxy = await start_proxy(clock=FakeClock(NOON))
    return proxy


# --- blocking, as a client sees it ------------------------------------------------------


async def test_lowering_the_limit_blocks_at_once_and_raising_it_unblocks(
    noon: Proxy, store: aioredis.Redis
) -> None:
    p = noon
    kid, key = await p.create_key("acme")
    used = await ask(p, key, 100)
    await put(p, f"/apikey/{kid}", budget(limit=used + 1000))
    await ask(p, key, 100)
    used *= 2
    # Lower the limit below what was spent: the very next request is refused.
    b = await put(p, f"/apikey/{kid}", budget(limit=used - 1))
    assert b["spend"]["status"] == "blocked"
    before, upstream_calls = await books(store, "acme"), len(p.received())
    error = await refused(p, key)
    text = message(error)
    assert "daily" in text and "API key" in text and "self-budget" in text
    assert "2026-11-24" in text and "block line" in text
    # Noon: the window is hours from resetting, so no Retry-After.
    assert "retry-after" not in error.response.headers
    assert "retry-after-ms" not in error.response.headers
    # A refused request reached no upstream, reserved nothing and was charged nothing.
    assert len(p.received()) == upstream_calls
    assert await books(store, "acme") == before
    # Nothing in flight: an idle scope keeps no in-flight hash at all.
    assert before["leases"] == 0 and before["inflight"] == {}
    # Raise it again: admitted at once.
    b = await put(p, f"/apikey/{kid}", budget(limit=used + 200))
    assert b["spend"]["status"] == "ok"
    await ask(p, key, 100)


async def test_the_sdk_does_not_retry_a_budget_refusal(noon: Proxy) -> None:
    p = noon
    kid, key = await p.create_key("acme")
    await put(p, f"/apikey/{kid}", budget(limit=1))
    await put(p, "/org/acme", budget(limit=10**6))
    before = await decisions(p, "budget")
    client = openai.AsyncOpenAI(base_url=f"{p.url}/v1", api_key=key, max_retries=3)
    p.clients.append(client)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            max_tokens=5,
        )
    assert caught.value.code == "budget_exceeded"
    # One attempt only: x-should-retry: false stops the SDK's automatic retries.
    assert await decisions(p, "budget") == before + 1


async def test_a_request_whose_worst_case_crosses_the_line_is_refused_a_smaller_one_passes(
    noon: Proxy, store: aioredis.Redis
) -> None:
    p = noon
    size = await sizes(p)
    kid, key = await p.create_key("acme")
    await put(p, f"/apikey/{kid}", budget(limit=1000))
    spent = await ask(p, key, 100)
    assert spent == size.reserve(100)  # the proxy's estimate equals the upstream's count here
    room = 1000 - spent
    # Reserving one token more than the room left: refused, naming the worst case.
    error = await refused(p, key, max_tokens=room - size.prompt + 1)
    assert "worst case" in message(error)
    assert (await spend_of(store, "acme", f"k:{kid}", "2026-11-24"))[1] == spent
    # Exactly the room left: admitted, and spend lands on the line, not past it.
    spent += await ask(p, key, room - size.prompt)
    assert spent == 1000
    _, listing = await p.admin("GET", f"{BASE}/apikey/{kid}")
    [b] = listing["data"]
    assert (b["spend"]["tokens_spent"], b["spend"]["pct"], b["spend"]["status"]) == (
        "1000",
        100.0,
        "blocked",
    )
    # Now even the smallest request is refused because the budget is blocked.
    assert "block line" in message(await refused(p, key, max_tokens=1))


async def test_the_block_line_is_the_smallest_block_threshold(
    noon: Proxy, store: aioredis.Redis
) -> None:
    p = noon
    size = await sizes(p)
    kid, key = await p.create_key("acme")
    thresholds = [
        {"pct": 80, "action": "alert"},
        {"pct": 150, "action": "block"},
        {"pct": 120, "action": "block"},
    ]
    await put(p, f"/apikey/{kid}", budget(limit=500, thresholds=thresholds))
    # The line is 120 % of 500 = 600 tokens: a request may carry spend past the limit itself.
    spent = await ask(p, key, 400 - size.prompt)
    spent += await ask(p, key, 200 - size.prompt - 1)
    assert spent == 599
    await refused(p, key, max_tokens=1)
    assert (await spend_of(store, "acme", f"k:{kid}", "2026-11-24"))[1] == 599


async def test_fractional_limits_block_at_the_exact_line(noon: Proxy) -> None:
    p = noon
    size = await sizes(p)
    kid, key = await p.create_key("acme")
    # 3281.35 tokens: 3281 fit under the line, 3282 would pass it.
    await put(p, f"/apikey/{kid}", budget(period="weekly", limit=3281.35))
    spent = await ask(p, key, 1000 - size.prompt)
    spent += await ask(p, key, 1000 - size.prompt)
    spent += await ask(p, key, 1000 - size.prompt)
    await refused(p, key, max_tokens=282 - size.prompt)  # 3282 > 3281.35
    spent += await ask(p, key, 281 - size.prompt)
    assert spent == 3281
    _, listing = await p.admin("GET", f"{BASE}/apikey/{kid}")
    assert listing["data"][0]["spend"]["status"] == "ok"  # 3281 < 3281.35
    assert "worst case" in message(await refused(p, key, max_tokens=1))


async def test_a_budget_without_a_block_threshold_never_blocks(noon: Proxy) -> None:
    p = noon
    kid, key = await p.create_key("acme")
    alerts = [{"pct": p_, "action": "alert"} for p_ in (50, 100, 200)]
    await put(p, f"/apikey/{kid}", budget(limit=100, thresholds=alerts))
    await put(p, "/org/acme", budget(limit=1, thresholds=[{"pct": 1, "action": "alert"}]))
    spent = 0
    for _ in range(3):
        spent += await ask(p, key, 200)
    _, listing = await p.admin("GET", f"{BASE}/apikey/{kid}")
    [b] = listing["data"]
    assert b["spend"]["status"] == "ok" and b["spend"]["pct"] == spent
    status, ev = await p.admin("GET", f"{BASE}/apikey/{kid}/events")
    assert status == 200
    assert sorted(e["pct"] for e in ev["data"]) == [50, 100, 200]
    assert {e["type"] for e in ev["data"]} == {"threshold_alert"}


async def test_org_budgets_apply_to_every_key_of_the_org(
    noon: Proxy, store: aioredis.Redis
) -> None:
    p = noon
    _, a = await p.create_key("acme")
    _, b = await p.create_key("acme", role="org_admin")
    _, outsider = await p.create_key("globex")
    size = await sizes(p)
    await put(p, "/org/acme", budget(period="monthly", limit=2 * size.reserve(50)))
    await ask(p, a, 50)
    await ask(p, b, 50)  # the org's spend is both keys' spend: now at the line
    for key in (a, b):
        error = await refused(p, key)
        assert "organization" in message(error) and "monthly" in message(error)
        assert "2026-11" in message(error)
    # Another org is not affected.
    await ask(p, outsider, 50)
    _, listing = await p.admin("GET", f"{BASE}/org/acme")
    assert listing["data"][0]["spend"]["status"] == "blocked"
    # A new key of the org is blocked from its first request.
    _, newcomer = await p.create_key("acme")
    await refused(p, newcomer)


async def test_cluster_ceilings_apply_and_org_admins_cannot_lift_them(noon: Proxy) -> None:
    p = noon
    kid, key = await p.create_key("acme")
    _, org_admin = await p.create_key("acme", role="org_admin")
    size = await sizes(p)
    await put(p, f"/apikey/{kid}", budget(owner="cluster", period="weekly", limit=size.reserve(20)))
    await put(p, f"/apikey/{kid}", budget(limit=10**6), key=org_admin)  # a generous self-budget
    await ask(p, key, 20)
    error = await refused(p, key)
    assert "operator ceiling (owner cluster)" in message(error)
    assert "weekly" in message(error) and "2026-W48" in message(error)
    # The org admin can neither raise nor delete the ceiling; the key stays blocked.
    status, _ = await p.admin(
        "PUT", f"{BASE}/apikey/{kid}", budget(owner="cluster", limit=10**6), org_admin
    )
    assert status == 403
    status, _ = await p.admin("DELETE", f"{BASE}/apikey/{kid}?owner=cluster", None, org_admin)
    assert status == 403
    await refused(p, key)
    # An org-owned cluster ceiling on the org applies to the key too.
    status, _ = await p.admin("DELETE", f"{BASE}/apikey/{kid}?owner=cluster")
    assert status == 200
    await ask(p, key, 20)
    await put(p, "/org/acme", budget(owner="cluster", period="monthly", limit=1))
    error = await refused(p, key)
    assert "organization" in message(error) and "operator ceiling" in message(error)


async def test_deleting_a_blocking_budget_stops_enforcement(noon: Proxy) -> None:
    p = noon
    _, key = await p.create_key("acme")
    await put(p, "/org/acme", budget(limit=1))
    await refused(p, key)
    status, _ = await p.admin("DELETE", f"{BASE}/org/acme")
    assert status == 200
    await ask(p, key, 10)


async def test_cost_budgets_block_in_currency(noon: Proxy, store: aioredis.Redis) -> None:
    p = noon
    size = await sizes(p)
    route = p.app[GATEWAY].routes["gpt-4o"]
    kid, key = await p.create_key("acme")
    per_request = cost_nano(route.price, size.prompt, 100)
    limit = Decimal(3 * per_request) / NANO
    b = await put(p, f"/apikey/{kid}", budget(limit_kind="cost", limit=float(limit)))
    assert Decimal(str(b["limit"])) == limit
    for _ in range(3):
        await ask(p, key, 100)
    cost, _ = await spend_of(store, "acme", f"k:{kid}", "2026-11-24")
    assert cost == 3 * per_request
    await refused(p, key)
    _, listing = await p.admin("GET", f"{BASE}/apikey/{kid}")
    spend = listing["data"][0]["spend"]
    assert (spend["cost_spent_nano"], spend["pct"], spend["status"]) == (
        str(cost),
        100.0,
        "blocked",
    )


@pytest.mark.parametrize(
    ("kind", "limit"),
    [
        # The largest limits a Lua number holds exactly as a line (larger ones are a 400).
        pytest.param("tokens", 2**53 - 1, id="tokens-2**53-1"),
        pytest.param("cost", 9_007_199.254740991, id="cost-9007199.25"),
    ],
)
async def test_the_largest_limits_never_block(noon: Proxy, kind: str, limit: float) -> None:
    p = noon
    kid, key = await p.create_key("acme")
    await put(p, f"/apikey/{kid}", budget(limit_kind=kind, limit=limit))
    await ask(p, key, 10)
    _, listing = await p.admin("GET", f"{BASE}/apikey/{kid}")
    assert listing["data"][0]["spend"]["status"] == "ok"


# --- calendar windows -------------------------------------------------------------------


async def windows_of(p: Proxy, path: str) -> dict[str, tuple[str, int]]:
    """period -> (window, tokens spent) of the budgets at ``path``."""
    status, listing = await p.admin("GET", BASE + path)
    assert status == 200
    return {
        b["period"]: (b["spend"]["window"], int(b["spend"]["tokens_spent"]))
        for b in listing["data"]
    }


async def three_windows(p: Proxy) -> tuple[str, str]:
    """A key with a daily and a weekly budget, and a monthly budget on its org."""
    kid, key = await p.create_key("acme")
    big = 10**6
    await put(p, f"/apikey/{kid}", budget(period="daily", limit=big))
    await put(p, f"/apikey/{kid}", budget(owner="cluster", period="weekly", limit=big))
    await put(p, "/org/acme", budget(period="monthly", limit=big))
    return kid, key


async def all_windows(p: Proxy, kid: str) -> dict[str, tuple[str, int]]:
    return {**await windows_of(p, f"/apikey/{kid}"), **await windows_of(p, "/org/acme")}


async def test_midnight_resets_daily_spend_and_keeps_weekly_and_monthly(
    start_proxy: Callable[..., Any],
) -> None:
    clock = FakeClock(at("2026-11-24T23:59:50"))
    p: Proxy = await start_proxy(clock=clock)
    kid, key = await three_windows(p)
    u = await ask(p, key, 40)
    assert await all_windows(p, kid) == {
        "daily": ("2026-11-24", u),
        "weekly": ("2026-W48", u),
        "monthly": ("2026-11", u),
    }
    clock.advance(20)  # Wednesday 00:00:10
    assert await all_windows(p, kid) == {
        "daily": ("2026-11-25", 0),
        "weekly": ("2026-W48", u),
        "monthly": ("2026-11", u),
    }
    v = await ask(p, key, 60)
    assert await all_windows(p, kid) == {
        "daily": ("2026-11-25", v),
        "weekly": ("2026-W48", u + v),
        "monthly": ("2026-11", u + v),
    }


async def test_week_and_month_roll_over(start_proxy: Callable[..., Any]) -> None:
    clock = FakeClock(at("2026-11-29T23:59:50"))  # Sunday, last day of ISO week 48
    p: Proxy = await start_proxy(clock=clock)
    kid, key = await three_windows(p)
    u = await ask(p, key, 10)
    clock.advance(20)  # Monday 2026-11-30: a new week, the same month
    assert await all_windows(p, kid) == {
        "daily": ("2026-11-30", 0),
        "weekly": ("2026-W49", 0),
        "monthly": ("2026-11", u),
    }
    v = await ask(p, key, 20)
    clock.now = at("2026-11-30T23:59:59")
    w = await ask(p, key, 30)
    assert await all_windows(p, kid) == {
        "daily": ("2026-11-30", v + w),
        "weekly": ("2026-W49", v + w),
        "monthly": ("2026-11", u + v + w),
    }
    clock.advance(2)  # Tuesday 2026-12-01: a new month, the same week
    assert await all_windows(p, kid) == {
        "daily": ("2026-12-01", 0),
        "weekly": ("2026-W49", v + w),
        "monthly": ("2026-12", 0),
    }
    x = await ask(p, key, 40)
    assert await all_windows(p, kid) == {
        "daily": ("2026-12-01", x),
        "weekly": ("2026-W49", v + w + x),
        "monthly": ("2026-12", x),
    }


async def test_a_blocked_daily_budget_unblocks_the_next_day(
    start_proxy: Callable[..., Any],
) -> None:
    clock = FakeClock(NOON)
    p: Proxy = await start_proxy(clock=clock)
    size = await sizes(p)
    kid, key = await p.create_key("acme")
    weekly_id, weekly_key = await p.create_key("acme")
    await put(p, f"/apikey/{kid}", budget(limit=size.reserve(30)))
    await put(p, f"/apikey/{weekly_id}", budget(period="weekly", limit=size.reserve(30)))
    await ask(p, key, 30)
    await ask(p, weekly_key, 30)
    assert "retry-after" not in (await refused(p, key)).response.headers
    # 45 s before midnight the daily window's end is worth waiting for; the week's is not.
    clock.now = at("2026-11-24T23:59:15")
    error = await refused(p, key)
    assert error.response.headers["retry-after"] == "45"
    assert error.response.headers["x-should-retry"] == "false"
    assert "retry-after" not in (await refused(p, weekly_key)).response.headers
    clock.now = at("2026-11-24T23:59:59.5")
    assert (await refused(p, key)).response.headers["retry-after"] == "1"
    # Midnight: a new day, the daily budget admits again; the weekly one stays blocked.
    clock.now = at("2026-11-25T00:00:00")
    await ask(p, key, 30)
    await refused(p, weekly_key)
    # It blocks again in the new day, and says so once more in its events.
    await refused(p, key)
    status, ev = await p.admin("GET", f"{BASE}/apikey/{kid}/events")
    assert status == 200
    assert [(e["type"], e["period_key"]) for e in ev["data"]] == [
        ("blocked", "2026-11-25"),
        ("blocked", "2026-11-24"),
    ]
    # Sunday 23:59:30: the weekly window ends in 30 s.
    clock.now = at("2026-11-29T23:59:30")
    assert (await refused(p, weekly_key)).response.headers["retry-after"] == "30"
    clock.now = at("2026-11-30T00:00:00")
    await ask(p, weekly_key, 30)


# --- concurrency across processes -------------------------------------------------------


@dataclass
class Calibration:
    reserve_tokens: int
    used_tokens: int
    reserve_cost: int
    used_cost: int


def mini_price() -> Any:
    price = resolve_price(ModelConfig(name="gpt-4o-mini", upstream="mock"), MeteringConfig())
    assert price is not None
    return price


async def calibrate(
    session: aiohttp.ClientSession, url: str, store: aioredis.Redis, body: dict[str, Any]
) -> Calibration:
    """Reservation from the proxy's own counting; usage from one real request in a scratch
    org, read back from the spend the proxy wrote."""
    prompt = await count_prompt(get_encoding("o200k_base"), "chat/completions", body)
    cap = body["max_tokens"]
    _, key = await create_key_on(session, url, "calibration")
    status, answer = await chat_json(session, url, key, body, mock_output(body["max_tokens"]))
    assert status == 200, answer
    cost, tokens = await spend_of(store, "calibration", "o", month_now())
    usage = answer["usage"]
    assert tokens == usage["total_tokens"] and usage["completion_tokens"] == cap
    price = mini_price()
    assert cost == cost_nano(price, usage["prompt_tokens"], usage["completion_tokens"])
    return Calibration(prompt + cap, tokens, cost_nano(price, prompt, cap), cost)


def month_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m")


def n_fit_limit(n: int, reserve: int, used: int) -> int:
    """The largest-safe line that admits exactly ``n`` requests whatever the interleaving:
    the n-th fits even after n-1 settled, the (n+1)-th never fits, and n settled requests
    stay on or under the line."""
    line = max(n * used, (n - 1) * used + reserve)
    assert line < (n + 1) * reserve, "reservation and usage differ too much for an exact test"
    return line


N = 10
CONCURRENT = 200


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tokens", "cost"])
async def test_exactly_n_admitted_under_200_concurrent_requests_on_two_processes(
    two_processes: list[str], store: aioredis.Redis, kind: str
) -> None:
    body: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": MESSAGES,
        "max_tokens": 40,
    }
    org = f"burst-{kind}"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        url_a, url_b = two_processes
        cal = await calibrate(session, url_a, store, body)
        keys = [await create_key_on(session, url_a, org), await create_key_on(session, url_b, org)]
        if kind == "tokens":
            line = n_fit_limit(N, cal.reserve_tokens, cal.used_tokens)
            spec = budget(period="monthly", limit=line)
            status, b = await admin_call(session, url_a, "PUT", f"{BASE}/org/{org}", spec)
        else:
            line = n_fit_limit(N, cal.reserve_cost, cal.used_cost)
            limit = Decimal(line) / NANO
            assert Decimal(str(float(limit))) == limit
            spec = budget(period="monthly", limit_kind="cost", limit=float(limit), owner="cluster")
            status, b = await admin_call(session, url_b, "PUT", f"{BASE}/apikey/{keys[0][0]}", spec)
            keys = [keys[0]]  # the budget is the key's own: send everything with that key
        assert status == 200, b
        await store.config_resetstat()

        async def one(i: int) -> tuple[int, Any, str]:
            url = two_processes[i % 2]
            _, key = keys[i % len(keys)]
            latency = mock_output(body["max_tokens"], {"x-mock-latency-ms": "300"})
            status, answer = await chat_json(session, url, key, body, latency)
            return status, answer, url

        results = await asyncio.gather(*(one(i) for i in range(CONCURRENT)))
        stats = await store.info("commandstats")

    by_status = Counter(status for status, _, _ in results)
    admitted_per_process = Counter(url for status, _, url in results if status == 200)
    codes = Counter(a["error"]["code"] for status, a, _ in results if status != 200)
    assert by_status == {200: N, 429: CONCURRENT - N}, (by_status, codes)
    assert codes == {"budget_exceeded": CONCURRENT - N}

    unit = "t" if kind == "tokens" else "c"
    per_request = cal.used_tokens if kind == "tokens" else cal.used_cost
    tag = "o" if kind == "tokens" else f"k:{keys[0][0]}"
    cost, tokens = await spend_of(store, org, tag, month_now())
    settled = tokens if unit == "t" else cost
    overshoot = max(0, settled - line)
    evalsha = stats.get("cmdstat_evalsha", {}).get("calls", 0)
    print(
        f"\n[{kind}] admitted {N}/{CONCURRENT} (per process {dict(admitted_per_process)}), "
        f"settled {settled} of line {line} ({unit}), overshoot {overshoot}; "
        f"EVALSHA {evalsha} = {evalsha / CONCURRENT:.2f}/request; commands: "
        + ", ".join(
            f"{name.removeprefix('cmdstat_')}={v['calls']}" for name, v in sorted(stats.items())
        )
    )
    assert settled == N * per_request
    assert settled <= line and overshoot == 0
    # One admit per request, one settle per admitted request, nothing else scripted (batched
    # settles, proxy/ledger/settle_batches.py, may share a call).
    if TEST_BATCH_SETTLES == "1":
        assert CONCURRENT < evalsha <= CONCURRENT + N
    else:
        assert evalsha == CONCURRENT + N
    p = f"bp:{{o:{org}}}:"
    assert await store.xlen(p + "usage") == N
    assert await store.zcard(p + "leases") == 0
    for h in (p + "infl:o", p + f"infl:k:{keys[0][0]}"):
        assert await store.exists(h) == 0, "an idle scope keeps no in-flight hash"


class WallClock(FakeClock):
    """Real time, for the tests in which a lease must really run out."""

    def __call__(self) -> float:
        return time.time()


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "streamed"])
async def test_a_live_request_keeps_its_reservation_however_long_it_takes(
    start_proxy: Callable[..., Any], store: aioredis.Redis, stream: bool
) -> None:
    p: Proxy = await start_proxy(clock=WallClock(), limits={"lease_seconds": 0.3})
    size = await sizes(p)
    kid, key = await p.create_key("acme")
    await put(p, f"/apikey/{kid}", budget(period="monthly", limit=size.reserve(50)))
    headers = {
        "Authorization": f"Bearer {key}",
        "x-mock-output-tokens": "50",
        "x-mock-latency-ms": "1500",  # five lease lengths before the upstream answers
    }

    async def slow() -> None:
        async with p.session.post(
            p.url + "/v1/chat/completions", json=chat_body(50, stream), headers=headers
        ) as response:
            assert response.status == 200
            await response.read()

    task = asyncio.create_task(slow())

    async def leased() -> bool:
        return int(await store.zcard("bp:{o:acme}:leases")) == 1

    await eventually(leased, what="the slow request's lease")
    leased_at = last_refused = time.monotonic()
    try:
        while not task.done():
            # The budget is fully reserved by the running request for as long as it runs.
            await refused(p, key, max_tokens=1)
            last_refused = time.monotonic()
            await asyncio.sleep(0.05)
    finally:
        await task
    assert last_refused - leased_at > 3 * 0.3, "the request did not outlive its lease"
    assert (await spend_of(store, "acme", f"k:{kid}", month_now()))[1] == size.reserve(50)


@pytest.mark.slow
async def test_settles_batched_across_the_line_from_two_processes(
    two_processes: list[str], store: aioredis.Redis
) -> None:
    """Round after round, the line is moved to fit exactly N more requests and N + 4 are sent
    at once through two processes: exactly N are admitted, whose settles land (batched per org
    while others of the org are in flight) before their answers, so the spend read right after
    the round is exact, every usage record is written and no lease is left."""
    n, rounds = 6, 3
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 40}
    org = "batched-line"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        url_a, url_b = two_processes
        cal = await calibrate(session, url_a, store, body)
        keys = [await create_key_on(session, url_a, org), await create_key_on(session, url_b, org)]
        p = f"bp:{{o:{org}}}:"
        for number in range(1, rounds + 1):
            _, spent = await spend_of(store, org, "o", month_now())
            line = spent + n_fit_limit(n, cal.reserve_tokens, cal.used_tokens)
            spec = budget(period="monthly", limit=line)
            status, answer = await admin_call(session, url_b, "PUT", f"{BASE}/org/{org}", spec)
            assert status == 200, answer

            async def one(i: int) -> int:
                _, key = keys[i % 2]
                latency = mock_output(body["max_tokens"], {"x-mock-latency-ms": str(20 * (i % 4))})
                status, _ = await chat_json(session, two_processes[i % 2], key, body, latency)
                return status

            statuses = Counter(await asyncio.gather(*(one(i) for i in range(n + 4))))
            assert statuses == {200: n, 429: 4}, (number, statuses)
            _, spent = await spend_of(store, org, "o", month_now())
            assert spent == number * n * cal.used_tokens <= line
            assert await store.xlen(p + "usage") == number * n
            assert await store.zcard(p + "leases") == 0
