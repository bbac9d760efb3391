"""Clamping instead of refusing (opt-in): a request whose worst case does not fit a budget, but
whose prompt plus ``[budgets] clamp_min_output_tokens`` does, is admitted with its output cap
lowered to what fits — the upstream gets the lowered cap, the response says so, the lease
reserves the lowered worst case, and spend never passes the line.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import anthropic
import openai
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from conftest import FakeClock, Proxy, budget, eventually
from helpers import claude_messages, user_messages
from test_anthropic_api import MODEL as CLAUDE
from test_anthropic_api import async_client, claude_sections, root

from proxy.catalog.pricing import cost_nano, reserve_cost_nano
from proxy.catalog.tokenizer import count_prompt
from proxy.dialects.claude_bound import prompt_bound
from proxy.gateway.state import GATEWAY
from proxy.ledger.admission import Admitted, ClampTerms
from proxy.ledger.api_keys import Identity

BASE = "/api/v1/llm/budgets"
NOON = datetime(2026, 11, 24, 12, 0, tzinfo=UTC).timestamp()
DAY = "2026-11-24"
NANO = 10**9
PROMPT = "say something nice about budgets"
MESSAGES = user_messages(PROMPT)
CLAUDE_MESSAGES = claude_messages(PROMPT)
MODEL_MAX = 1000  # gpt-4o's configured max_output_tokens in the test settings
LOWEST = 16
ANSWER = 20  # the mock's answer, when the cap allows it
CLAMP = {"x-budget-clamp": "true"}


@pytest.fixture
async def p(start_proxy: Callable[..., Any]) -> Proxy:
    proxy: Proxy = await start_proxy(
        clock=FakeClock(NOON), budgets={"clamp_min_output_tokens": LOWEST}
    )
    return proxy


async def prompt_of(p: Proxy, body: dict[str, Any]) -> int:
    route = p.app[GATEWAY].routes[body["model"]]
    return await count_prompt(route.encoding, "chat/completions", body)


async def put(p: Proxy, path: str, body: dict[str, Any]) -> Any:
    status, answer = await p.admin("PUT", BASE + path, body)
    assert status == 200, answer
    return answer


async def chat(
    p: Proxy, key: str, headers: dict[str, str] | None = None, **extra: Any
) -> tuple[int, Any, Any]:
    """A chat request without max_tokens (it reserves the model's whole output maximum)."""
    try:
        raw = await p.openai(key).chat.completions.with_raw_response.create(
            model="gpt-4o",
            messages=MESSAGES,
            extra_headers={"x-mock-output-tokens": str(ANSWER), **(headers or {})},
            **extra,
        )
    except openai.APIStatusError as exc:
        return exc.status_code, exc.response.json(), exc.response.headers
    return 200, raw.parse(), raw.headers


async def spent(store: aioredis.Redis, tag: str, unit: str = "t") -> int:
    return int(await store.hget(f"bp:{{o:acme}}:spend:{tag}:{DAY}", unit) or 0)


async def test_a_budget_fitting_ten_short_answers_admits_zero_without_clamping_ten_with_it(
    p: Proxy, store: aioredis.Redis
) -> None:
    prompt = await prompt_of(p, {"model": "gpt-4o", "messages": MESSAGES})
    kid, key = await p.create_key("acme", limits={"tpm": 10**6})
    line = 10 * (prompt + ANSWER)
    assert prompt + MODEL_MAX > line  # the worst case never fits
    await put(p, f"/apikey/{kid}", budget(limit=line))
    # Off by default: every request is refused, however short its answer would be.
    for _ in range(10):
        status, body, headers = await chat(p, key)
        assert status == 429 and body["error"]["code"] == "budget_exceeded"
        assert "x-budget-clamped-max-tokens" not in headers
    assert len(p.received()) == 0
    # Asked for: every request that fits with a smaller cap is admitted.
    caps = []
    while True:
        status, body, headers = await chat(p, key, CLAMP)
        if status != 200:
            break
        cap = int(headers["x-budget-clamped-max-tokens"])
        sent = p.received()[-1].body
        assert sent["max_completion_tokens"] == cap and "max_tokens" not in sent
        assert "x-budget-clamp" not in p.received()[-1].headers  # the proxy's own header
        assert body.usage.completion_tokens == ANSWER
        caps.append(cap)
    assert len(caps) == 10
    assert caps == [line - i * (prompt + ANSWER) - prompt for i in range(10)]
    assert min(caps) == ANSWER >= LOWEST
    assert status == 429 and body["error"]["budget"]["reason"] == "blocked"
    assert await spent(store, f"k:{kid}") == line  # on the line, never past it
    # Tokens per minute were charged the clamped reservation and refunded to actual use.
    level = float(await store.hget(f"bp:{{o:acme}}:rl:k:{kid}", "tpm"))
    assert level == pytest.approx(line)


async def test_a_budget_may_opt_in_for_every_request(p: Proxy, store: aioredis.Redis) -> None:
    prompt = await prompt_of(p, {"model": "gpt-4o", "messages": MESSAGES})
    kid, key = await p.create_key("acme")
    line = 3 * (prompt + ANSWER)
    b = await put(p, f"/apikey/{kid}", budget(limit=line, clamp=True))
    assert b["clamp"] is True
    for _ in range(3):
        status, _, headers = await chat(p, key)
        assert status == 200 and "x-budget-clamped-max-tokens" in headers
    status, body, _ = await chat(p, key)
    assert status == 429
    # A budget that did not opt in still refuses the worst case, unless the request asks.
    _, other = await p.create_key("acme")
    await put(p, "/org/acme", budget(limit=await spent(store, "o") + prompt + 100))
    status, body, _ = await chat(p, other)
    assert status == 429 and body["error"]["budget"]["scope"] == "org"
    status, _, headers = await chat(p, other, CLAMP)
    assert status == 200 and headers["x-budget-clamped-max-tokens"] == "100"


async def test_a_request_that_cannot_keep_the_minimum_output_is_refused(p: Proxy) -> None:
    prompt = await prompt_of(p, {"model": "gpt-4o", "messages": MESSAGES})
    kid, key = await p.create_key("acme")
    await put(p, f"/apikey/{kid}", budget(limit=prompt + LOWEST - 1))
    status, body, headers = await chat(p, key, CLAMP)
    assert status == 429 and body["error"]["budget"]["reason"] == "exceeds"
    assert headers["x-budget-reserved"] == str(prompt + MODEL_MAX)  # the worst case asked
    await put(p, f"/apikey/{kid}", budget(limit=prompt + LOWEST))
    status, _, headers = await chat(p, key, CLAMP)
    assert status == 200 and headers["x-budget-clamped-max-tokens"] == str(LOWEST)
    # A request whose own cap is already at or below the minimum is not clamped at all.
    await put(p, f"/apikey/{kid}", budget(limit=2 * prompt + LOWEST + 5))
    status, body, _ = await chat(p, key, CLAMP, max_tokens=LOWEST)
    assert status == 429


async def test_a_bad_clamp_header_is_400(p: Proxy) -> None:
    _, key = await p.create_key("acme")
    status, body, _ = await chat(p, key, {"x-budget-clamp": "maybe"})
    assert status == 400 and body["error"]["param"] == "x-budget-clamp"


async def test_clamped_requests_in_flight_together_never_overshoot(
    p: Proxy, store: aioredis.Redis
) -> None:
    prompt = await prompt_of(p, {"model": "gpt-4o", "messages": MESSAGES})
    kid, key = await p.create_key("acme")
    line = 10 * (prompt + ANSWER)
    await put(p, f"/apikey/{kid}", budget(limit=line, clamp=True))
    admitted: list[int] = []
    usage = 0
    for _ in range(5):  # waves of 30 in flight until the budget is used up
        results = await asyncio.gather(
            *(chat(p, key, {"x-mock-latency-ms": "100"}) for _ in range(30))
        )
        for status, body, headers in results:
            if status == 200:
                admitted.append(int(headers["x-budget-clamped-max-tokens"]))
                usage += body.usage.total_tokens
            else:
                assert body["error"]["code"] == "budget_exceeded"
    assert admitted and min(admitted) >= LOWEST
    assert await spent(store, f"k:{kid}") == usage <= line
    assert await store.zcard("bp:{o:acme}:leases") == 0


async def test_cost_budgets_clamp_to_the_largest_cap_whose_cost_fits(
    p: Proxy, store: aioredis.Redis
) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES}
    prompt = await prompt_of(p, body)
    price = p.app[GATEWAY].routes["gpt-4o"].price
    kid, key = await p.create_key("acme")
    line = cost_nano(price, prompt, 300) + 7  # room for 300 output tokens and a little more
    limit = Decimal(line) / NANO
    assert Decimal(str(float(limit))) == limit
    await put(p, f"/apikey/{kid}", budget(limit_kind="cost", limit=float(limit)))
    status, _, headers = await chat(p, key, CLAMP, n=2)
    assert status == 200
    cap = int(headers["x-budget-clamped-max-tokens"])
    # The largest cap per choice whose two answers' worst case costs no more than the line.
    assert cost_nano(price, prompt, 2 * cap) <= line < cost_nano(price, prompt, 2 * cap + 2)
    sent = p.received()[-1].body
    assert (sent["max_completion_tokens"], sent["n"]) == (cap, 2)
    assert await spent(store, f"k:{kid}", "c") <= line


@pytest.mark.parametrize("endpoint", ["completions", "responses"])
async def test_other_endpoints_get_their_own_cap_parameter(p: Proxy, endpoint: str) -> None:
    kid, key = await p.create_key("acme")
    await put(p, f"/apikey/{kid}", budget(limit=300, clamp=True))
    field = {"completions": "max_tokens", "responses": "max_output_tokens"}[endpoint]
    body: dict[str, Any] = {"model": "gpt-4o", field: 900}
    body["prompt" if endpoint == "completions" else "input"] = "say something nice"
    headers = {"Authorization": f"Bearer {key}", "x-mock-output-tokens": str(ANSWER)}
    async with p.session.post(f"{p.url}/v1/{endpoint}", json=body, headers=headers) as response:
        assert response.status == 200, await response.text()
        cap = int(response.headers["x-budget-clamped-max-tokens"])
    assert 0 < cap < 300 and p.received()[-1].body[field] == cap


async def test_a_clamped_stream_still_gets_its_usage_chunk_kept_from_the_client(
    p: Proxy, store: aioredis.Redis
) -> None:
    kid, key = await p.create_key("acme")
    await put(p, f"/apikey/{kid}", budget(limit=300, clamp=True))
    stream = await p.openai(key).chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        max_tokens=900,
        stream=True,
        extra_headers={"x-mock-output-tokens": str(ANSWER)},
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.usage is None for chunk in chunks)
    sent = p.received()[-1].body
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["max_tokens"] < 300
    assert 0 < await spent(store, f"k:{kid}") <= 300


async def test_claude_requests_clamp_max_tokens(
    start_proxy: Callable[..., Any], mock_upstream: TestServer, store: aioredis.Redis
) -> None:
    sections = claude_sections(root(mock_upstream), budgets={"clamp_min_output_tokens": LOWEST})
    claude: Proxy = await start_proxy(clock=FakeClock(NOON), **sections)
    kid, key = await claude.create_key("acme")
    route = claude.app[GATEWAY].routes[CLAUDE]
    bound = prompt_bound({"model": CLAUDE, "max_tokens": 1, "messages": CLAUDE_MESSAGES}, 200_000)
    line = reserve_cost_nano(route.price, bound, 100)
    limit = Decimal(line) / NANO
    assert Decimal(str(float(limit))) == limit
    await put(claude, f"/apikey/{kid}", budget(limit_kind="cost", limit=float(limit)))
    client = async_client(claude, key)
    with pytest.raises(anthropic.RateLimitError):
        await client.messages.create(model=CLAUDE, max_tokens=4096, messages=CLAUDE_MESSAGES)
    raw = await client.messages.with_raw_response.create(
        model=CLAUDE, max_tokens=4096, messages=CLAUDE_MESSAGES, extra_headers=CLAMP
    )
    assert raw.headers["x-budget-clamped-max-tokens"] == "100"
    assert claude.received()[-1].body["max_tokens"] == 100
    assert await spent(store, f"k:{kid}", "c") <= line


async def test_the_clamp_arithmetic_is_exact_near_the_largest_exact_double(
    p: Proxy, store: aioredis.Redis
) -> None:
    """The script computes ceil((A + o * R) / 1e6) in parts: checked against Python's exact
    integers where the whole products are far past 2**53."""
    kid, _ = await p.create_key("acme")
    line = 4_000_000_125_000_000  # 4000000.125 currency units: exact as a JSON number
    await put(p, f"/apikey/{kid}", budget(limit_kind="cost", limit=line / NANO))
    prompt, cap, input_rate, output_rate = 1000, 10**9, 7_000_000_001, 8_999_999_999_999
    terms = ClampTerms(1, cap, LOWEST, prompt * input_rate, output_rate)

    def cost(o: int) -> int:
        return -(-(terms.input_cost + o * output_rate) // 10**6)

    assert cost(cap) < 2**53 and (terms.input_cost + cap * output_rate) > 2**70
    gw = p.app[GATEWAY]
    decision = await gw.admission.admit(
        Identity(kid, "acme", "member"),
        "req_exact",
        prompt + cap,
        cost(cap),
        prompt_tokens=prompt,
        clamp=terms,
        clamp_asked=True,
        dry_run=True,
    )
    assert isinstance(decision, Admitted) and decision.clamped_cap is not None
    m = decision.clamped_cap
    assert cost(m) <= line < cost(m + 1)
    assert (decision.reserved_tokens, decision.reserved_cost_nano) == (prompt + m, cost(m))
    assert await store.zcard("bp:{o:acme}:leases") == 0  # a dry run reserves nothing


async def test_the_access_log_says_a_request_was_clamped(
    p: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llm_proxy.access")
    kid, key = await p.create_key("acme")
    await put(p, f"/apikey/{kid}", budget(limit=300, clamp=True))
    status, _, headers = await chat(p, key, {"x-request-id": "clamped-1"})
    assert status == 200

    async def logged() -> dict[str, Any] | None:
        for record in caplog.records:
            line = json.loads(record.getMessage()) if record.name == "llm_proxy.access" else {}
            if line.get("request_id") == "clamped-1":
                return line
        return None

    line = await eventually(logged, what="the access-log line")
    assert line["clamped_max_tokens"] == int(headers["x-budget-clamped-max-tokens"])
