"""``POST /api/v1/llm/budgets/quote``: a dry run of the admit script on a request body. It
reserves and charges nothing, and agrees with the next real admission on the same state —
admitted, clamped, refused by a budget or by a rate limit — down to the headers and the error
body the request then gets.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import anthropic
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from conftest import FakeClock, Proxy, budget
from helpers import claude_messages, user_messages
from test_anthropic_api import MODEL as CLAUDE
from test_anthropic_api import async_client, claude_sections, root

from proxy.catalog.tokenizer import count_prompt
from proxy.gateway.state import GATEWAY

QUOTE = "/api/v1/llm/budgets/quote"
BASE = "/api/v1/llm/budgets"
NOON = datetime(2026, 11, 24, 12, 0, tzinfo=UTC).timestamp()
PROMPT = "say something nice about budgets"
MESSAGES = user_messages(PROMPT)


@pytest.fixture
async def p(start_proxy: Callable[..., Any]) -> Proxy:
    proxy: Proxy = await start_proxy(clock=FakeClock(NOON), budgets={"clamp_min_output_tokens": 8})
    return proxy


async def state(store: aioredis.Redis, org: str = "acme") -> dict[str, Any]:
    """Everything an admission could write in the org."""
    found = {}
    async for name in store.scan_iter(f"bp:{{o:{org}}}:*"):
        kind = await store.type(name)
        if kind == "hash":
            found[name] = await store.hgetall(name)
        elif kind == "zset":
            found[name] = await store.zrange(name, 0, -1, withscores=True)
        elif kind == "stream":
            found[name] = await store.xlen(name)
        else:
            found[name] = kind
    return found


async def real(
    p: Proxy, key: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, Any, dict[str, str]]:
    all_headers = {
        "Authorization": f"Bearer {key}",
        "x-mock-output-tokens": "50",
        **(headers or {}),
    }
    async with p.session.post(p.url + "/v1/chat/completions", json=body, headers=all_headers) as r:
        return r.status, await r.json(), dict(r.headers)


def budget_headers(headers: dict[str, str]) -> dict[str, str]:
    return {
        k.lower(): v
        for k, v in headers.items()
        if k.lower().startswith(("x-budget-", "x-ratelimit-", "ratelimit", "retry-after"))
        or k.lower() == "x-should-retry"
    }


async def quote(p: Proxy, spec: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    status, answer = await p.admin("POST", QUOTE, spec, key)
    assert status == 200, answer
    return answer  # type: ignore[no-any-return]


async def test_a_quote_agrees_with_the_next_real_admission(p: Proxy, store: aioredis.Redis) -> None:
    route = p.app[GATEWAY].routes["gpt-4o"]
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 50}
    prompt = await count_prompt(route.encoding, "chat/completions", body)
    kid, key = await p.create_key("acme", limits={"rpm": 3, "tpm": 10**5})
    await p.admin("PUT", f"{BASE}/apikey/{kid}", budget(limit=2 * (prompt + 50) + prompt + 20))
    await p.admin("PUT", f"{BASE}/org/acme", budget(period="monthly", limit=10**5))
    spec: dict[str, Any] = {"api_key_id": kid, "request": body}
    steps = [
        ("admit", {}),
        ("admit", {}),
        ("refuse", {}),  # the key's budget: 50 output tokens no longer fit
        ("clamp", {"x-budget-clamp": "true"}),  # ... but 20 do
        ("refuse", {}),  # the key's rate limit: 3 requests per minute (fixed clock)
    ]
    for i, (expected, headers) in enumerate(steps):
        if i == 4:
            await p.admin("PUT", f"{BASE}/apikey/{kid}", budget(limit=10**6))
        before = await state(store)
        q = await quote(p, {**spec, "headers": headers})
        assert await state(store) == before, "a quote wrote something"
        assert q["decision"] == expected, (i, q)
        assert q["worst_case"]["tokens"] == prompt + 50
        status, answer, got = await real(p, key, body, headers)
        assert status == q["response"]["status"], (i, answer)
        assert budget_headers(got) == budget_headers(q["response"]["headers"]), i
        if status == 200:
            assert q["reserved"]["tokens"] == prompt + (q["clamp"]["max_tokens"] or 50)
            if expected == "clamp":
                assert q["clamp"]["max_tokens"] == 20 == p.received()[-1].body["max_tokens"]
        else:
            assert answer == q["response"]["body"], i
    assert q["binding"]["kind"] == "rate_limit" and q["binding"]["limit_name"] == "rpm"


async def test_a_quote_names_the_budget_that_binds(p: Proxy) -> None:
    kid, _ = await p.create_key("acme")
    await p.admin("PUT", f"{BASE}/org/acme", budget(period="weekly", limit=500))
    await p.admin("PUT", "/api/v1/llm/budgets/external-user-default?org_id=acme", budget(limit=400))
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 100}
    q = await quote(p, {"api_key_id": kid, "external_user_id": "zoe", "request": body})
    assert q["decision"] == "admit" and q["external_user_id"] == "zoe"
    binding = q["binding"]
    assert (binding["kind"], binding["scope"], binding["period"]) == (
        "budget",
        "external_user_default",
        "daily",
    )
    assert binding["reset_at"] == "2026-11-25T00:00:00Z"
    q = await quote(
        p, {"api_key_id": kid, "external_user_id": "zoe", "request": {**body, "max_tokens": 450}}
    )
    assert q["decision"] == "refuse" and q["response"]["status"] == 429
    binding = q["binding"]
    assert (binding["scope"], binding["target_id"], binding["reason"]) == (
        "external_user_default",
        "zoe",
        "exceeds",
    )
    assert binding["remaining"] == "400" and int(binding["reserved"]) > 400


async def test_quote_validation_and_permissions(p: Proxy) -> None:
    kid, member = await p.create_key("acme")
    _, acme_admin = await p.create_key("acme", role="org_admin")
    _, globex_admin = await p.create_key("globex", role="org_admin")
    body = {"model": "gpt-4o", "messages": MESSAGES}
    status, _ = await p.admin("POST", QUOTE, {"api_key_id": kid, "request": body}, member)
    assert status == 403
    status, _ = await p.admin("POST", QUOTE, {"api_key_id": kid, "request": body}, globex_admin)
    assert status == 404
    assert (await quote(p, {"api_key_id": kid, "request": body}, acme_admin))["decision"] == "admit"
    for bad, param in (
        ({"request": body}, "api_key_id"),
        ({"api_key_id": kid, "request": body, "endpoint": "images"}, "endpoint"),
        ({"api_key_id": kid, "request": body, "extra": 1}, "extra"),
        ({"api_key_id": kid, "request": body, "external_user_id": ""}, "external_user_id"),
    ):
        status, answer = await p.admin("POST", QUOTE, bad)
        assert status == 400 and answer["error"]["param"] == param, answer
    # A request the LLM route would reject is quoted as that rejection.
    q = await quote(p, {"api_key_id": kid, "request": {**body, "max_tokens": -1}})
    assert q["decision"] == "refuse" and q["response"]["status"] == 400
    assert q["response"]["body"]["error"]["param"] == "max_tokens"
    q = await quote(p, {"api_key_id": kid, "request": {**body, "model": "nope"}})
    assert q["response"]["status"] == 404
    # ... and so is one the org's end-user policy would reject.
    await p.admin("PUT", "/api/v1/orgs/acme/end-user-policy", {"require_on_behalf_of": True})
    q = await quote(p, {"api_key_id": kid, "request": body})
    assert q["response"]["status"] == 400
    assert q["response"]["body"]["error"]["code"] == "on_behalf_of_required"


async def test_a_claude_quote_agrees_with_the_messages_route(
    start_proxy: Callable[..., Any], mock_upstream: TestServer
) -> None:
    claude: Proxy = await start_proxy(clock=FakeClock(NOON), **claude_sections(root(mock_upstream)))
    kid, key = await claude.create_key("acme")
    messages = claude_messages(PROMPT)
    body = {"model": CLAUDE, "max_tokens": 300, "messages": messages}
    await claude.admin("PUT", f"{BASE}/apikey/{kid}", budget(limit=250))
    q = await quote(claude, {"api_key_id": kid, "endpoint": "messages", "request": body})
    assert q["decision"] == "refuse" and q["response"]["body"]["type"] == "error"
    with pytest.raises(anthropic.RateLimitError) as caught:
        await async_client(claude, key).messages.create(
            model=CLAUDE, max_tokens=300, messages=messages
        )
    assert caught.value.body == q["response"]["body"]
