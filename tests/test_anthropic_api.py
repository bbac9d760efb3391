"""Anthropic's Messages API through the proxy, driven by the official ``anthropic`` SDK
unchanged (sync and async, buffered and streamed, tools, count_tokens), and raw HTTP where the
SDK could not produce the request: the same admission as every route, exact metering with
cache rates, errors and rate-limit headers in Anthropic's shape."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import anthropic
import httpx2
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from conftest import Proxy, eventually, usage_record

from proxy.catalog.pricing import reserve_cost_nano
from proxy.config import ModelConfig, PriceConfig, UpstreamConfig
from proxy.dialects.claude_bound import prompt_bound
from proxy.gateway.state import GATEWAY

ORG = "acme"
P = "bp:{o:acme}:"
UPSTREAM_SECRET = "sk-upstream-secret"
MODEL = "claude-test"
MESSAGES: list[Any] = [{"role": "user", "content": "say something nice about budgets"}]
# Mock prompt tokens: words + 4 per message + 3.
MOCK_PROMPT = 5 + 4 + 3
# claude-test's configured price, per 1M tokens.
RATES = {
    "input": "3",
    "cache_read": "0.3",
    "cache_write": "3.75",
    "cache_write_1h": "6",
    "output": "15",
}
CACHE_HEADERS = {
    "x-mock-cached-tokens": "4",
    "x-mock-cache-write-tokens": "3",
    "x-mock-cache-write-1h-tokens": "2",
}
TOOLS: list[Any] = [
    {
        "name": "get_weather",
        "description": "Get the current weather in a given location",
        "input_schema": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    }
]


def expected_cost(usage: Any) -> int:
    """The upstream's usage priced independently of the proxy's code: Decimal rates, rounded
    up once to a whole nano."""
    total = (
        Decimal(usage.input_tokens) * Decimal(RATES["input"])
        + Decimal(usage.cache_read_input_tokens or 0) * Decimal(RATES["cache_read"])
        + Decimal(usage.output_tokens) * Decimal(RATES["output"])
    )
    one_hour = usage.cache_creation.ephemeral_1h_input_tokens if usage.cache_creation else 0
    writes = (usage.cache_creation_input_tokens or 0) - one_hour
    total += Decimal(writes) * Decimal(RATES["cache_write"])
    total += Decimal(one_hour) * Decimal(RATES["cache_write_1h"])
    return math.ceil(total * 10**9 / 10**6)


def claude_sections(mock_root: str, **extra: Any) -> dict[str, Any]:
    sections: dict[str, Any] = {
        "upstreams": [
            UpstreamConfig(
                name="mock",
                base_url=mock_root + "/v1",
                api_key_env="TEST_UPSTREAM_KEY",
                forward_headers=["x-mock-*"],
            ),
            UpstreamConfig(
                name="claude",
                base_url=mock_root,
                api_key_env="TEST_UPSTREAM_KEY",
                kind="anthropic",
                forward_headers=["x-mock-*"],
            ),
        ],
        "models": [
            ModelConfig(name="gpt-4o", upstream="mock", price=PriceConfig(input=1, output=1)),
            ModelConfig(
                name=MODEL,
                upstream="claude",
                context_window=200_000,
                price=PriceConfig(
                    input=Decimal(RATES["input"]),
                    cached_input=Decimal(RATES["cache_read"]),
                    cache_write_input=Decimal(RATES["cache_write"]),
                    cache_write_1h_input=Decimal(RATES["cache_write_1h"]),
                    output=Decimal(RATES["output"]),
                ),
            ),
            ModelConfig(name="claude-*", upstream="claude", context_window=200_000),
        ],
    }
    sections.update(extra)
    return sections


def root(mock: TestServer) -> str:
    return str(mock.make_url("")).rstrip("/")


@pytest.fixture
async def claude(start_proxy: Callable[..., Any], mock_upstream: TestServer) -> Proxy:
    proxy: Proxy = await start_proxy(**claude_sections(root(mock_upstream)))
    return proxy


def async_client(proxy: Proxy, key: str, **kwargs: Any) -> anthropic.AsyncAnthropic:
    kwargs.setdefault("max_retries", 0)
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=key, **kwargs)
    proxy.clients.append(client)  # type: ignore[arg-type]
    return client


def sync_client(proxy: Proxy, key: str, **kwargs: Any) -> anthropic.Anthropic:
    kwargs.setdefault("max_retries", 0)
    return anthropic.Anthropic(base_url=proxy.url, api_key=key, **kwargs)


async def records(store: aioredis.Redis, count: int) -> list[dict[str, Any]]:
    """The usage records, once ``count`` requests have settled (streams settle just after the
    client has read the end)."""

    async def settled() -> bool:
        return int(await store.xlen(P + "usage")) >= count

    await eventually(settled, what="settle")
    return [usage_record(fields) for _, fields in await store.xrange(P + "usage")]


async def spent(store: aioredis.Redis, kid: str) -> tuple[int, int]:
    """(cost nano, tokens) of the key's monthly window."""
    data: dict[str, str] = {}
    async for name in store.scan_iter(f"{P}spend:k:{kid}:*-*"):
        if name.count("-") == 1 and "W" not in name:
            data = await store.hgetall(name)
    return int(data.get("c", 0)), int(data.get("t", 0))


async def raw(proxy: Proxy, path: str, body: Any, headers: dict[str, str]) -> tuple[int, Any, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with proxy.session.post(proxy.url + path, data=data, headers=headers) as response:
        text = await response.read()
        return response.status, json.loads(text), response.headers


def assert_anthropic_error(body: Any, type_: str) -> None:
    assert set(body) == {"type", "error"}, body
    assert body["type"] == "error"
    assert set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == type_, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


# --- buffered and streamed, sync and async, metered with cache rates ---------------------


async def test_buffered_message_async_and_sync_is_metered_with_cache_rates(
    claude: Proxy, store: aioredis.Redis
) -> None:
    kid, key = await claude.create_key(ORG)
    headers = {**CACHE_HEADERS, "x-mock-output-tokens": "7"}
    first = await async_client(claude, key).messages.create(
        model=MODEL, max_tokens=50, messages=MESSAGES, extra_headers=headers
    )
    assert first.content[0].type == "text" and first.content[0].text.split() == [
        "the", "of", "and", "to", "in", "is", "it"
    ]  # fmt: skip
    assert first.stop_reason == "end_turn"
    usage = first.usage
    assert (usage.input_tokens, usage.cache_read_input_tokens) == (MOCK_PROMPT - 9, 4)
    assert usage.cache_creation_input_tokens == 5 and usage.output_tokens == 7

    def sync_call() -> Any:
        with sync_client(claude, key) as client:
            return client.messages.create(
                model=MODEL, max_tokens=3, messages=MESSAGES, extra_headers=headers
            )

    second = await asyncio.to_thread(sync_call)
    assert second.stop_reason == "max_tokens" and second.usage.output_tokens == 3

    one, two = await records(store, 2)
    for record, answer in ((one, first), (two, second)):
        u = answer.usage
        assert record["cost_nano"] == expected_cost(u)
        assert (record["in"], record["out"], record["cached"]) == (MOCK_PROMPT, u.output_tokens, 4)
        assert (record["cache_write"], record["cache_write_1h"]) == (3, 2)
        assert record["reported"] and record["endpoint"] == "messages"
        assert record["upstream"] == "claude" and record["model"] == MODEL
    cost, tokens = await spent(store, kid)
    assert cost == expected_cost(first.usage) + expected_cost(second.usage)
    assert tokens == 2 * MOCK_PROMPT + 7 + 3
    assert await store.zcard(P + "leases") == 0


async def test_streamed_message_async_and_sync_is_relayed_and_metered(
    claude: Proxy, store: aioredis.Redis
) -> None:
    kid, key = await claude.create_key(ORG)
    headers = {**CACHE_HEADERS, "x-mock-output-tokens": "5"}
    async with async_client(claude, key).messages.stream(
        model=MODEL, max_tokens=50, messages=MESSAGES, extra_headers=headers
    ) as stream:
        pieces = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert pieces == [" the", " of", " and", " to", " in"]
    assert final.usage.output_tokens == 5 and final.usage.cache_read_input_tokens == 4

    def sync_stream() -> list[str]:
        with sync_client(claude, key) as client:
            events = client.messages.create(
                model=MODEL, max_tokens=2, messages=MESSAGES, stream=True, extra_headers=headers
            )
            return [event.type for event in events]

    kinds = await asyncio.to_thread(sync_stream)
    assert kinds == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]  # the SDK skips ping events
    one, two = await records(store, 2)
    assert one["cost_nano"] == expected_cost(final.usage) and one["out"] == 5
    assert (two["in"], two["out"], two["cached"], two["cache_write"]) == (MOCK_PROMPT, 2, 4, 3)
    assert all(r["reported"] and not r["client_gone"] for r in (one, two))
    cost, _ = await spent(store, kid)
    assert cost == one["cost_nano"] + two["cost_nano"]


async def test_tools_buffered_and_streamed(claude: Proxy, store: aioredis.Redis) -> None:
    _, key = await claude.create_key(ORG)
    client = async_client(claude, key)
    choice: Any = {"type": "tool", "name": "get_weather"}
    answer = await client.messages.create(
        model=MODEL,
        max_tokens=50,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice=choice,
        extra_headers={"x-mock-output-tokens": "3"},
    )
    [block] = answer.content
    assert block.type == "tool_use" and block.name == "get_weather"
    assert block.input == {"text": " the of and"}
    assert answer.stop_reason == "tool_use"
    async with client.messages.stream(
        model=MODEL,
        max_tokens=50,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice=choice,
        extra_headers={"x-mock-output-tokens": "4"},
    ) as stream:
        final = await stream.get_final_message()
    [block] = final.content
    assert block.type == "tool_use" and block.input == {"text": " the of and to"}
    one, two = await records(store, 2)
    assert (one["out"], two["out"]) == (3, 4)
    # The request carried the tools upstream unchanged.
    assert claude.received()[-1].body["tools"] == TOOLS


async def test_count_tokens_is_relayed_and_never_charged(
    claude: Proxy, store: aioredis.Redis
) -> None:
    kid, key = await claude.create_key(ORG)
    counted = await async_client(claude, key).messages.count_tokens(
        model=MODEL, messages=MESSAGES, system="be brief"
    )
    assert counted.input_tokens == MOCK_PROMPT + 2
    assert claude.received()[-1].path == "/v1/messages/count_tokens"
    [record] = await records(store, 1)
    assert record["cost_nano"] == 0 and record["endpoint"] == "messages/count_tokens"
    assert await spent(store, kid) == (0, 0)
    assert await store.zcard(P + "leases") == 0


# --- the key, both ways; the upstream's credential, never the client's --------------------


async def test_the_key_is_accepted_as_x_api_key_and_as_bearer_and_never_forwarded(
    claude: Proxy,
) -> None:
    _, key = await claude.create_key(ORG)
    bearer = async_client(claude, key)  # this SDK sends api_key= as a Bearer token
    token = anthropic.AsyncAnthropic(base_url=claude.url, auth_token=key, max_retries=0)
    header = anthropic.AsyncAnthropic(
        base_url=claude.url, default_headers={"X-Api-Key": key}, max_retries=0
    )
    for client in (bearer, token, header):
        answer = await client.messages.create(
            model=MODEL,
            max_tokens=5,
            messages=MESSAGES,
            extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"},
        )
        assert answer.usage.output_tokens == 5
        sent = claude.received()[-1].headers
        assert sent["x-api-key"] == UPSTREAM_SECRET
        assert "authorization" not in sent
        assert sent["anthropic-version"] == anthropic._constants.ANTHROPIC_API_VERSION
        assert sent["anthropic-beta"] == "prompt-caching-2024-07-31"
        assert key not in json.dumps(sent)
    await token.close()
    await header.close()
    # Neither header: 401 in Anthropic's shape, which the SDK maps to AuthenticationError.
    status, body, _ = await raw(claude, "/v1/messages", {"model": MODEL}, {})
    assert status == 401
    assert_anthropic_error(body, "authentication_error")
    with pytest.raises(anthropic.AuthenticationError):
        await async_client(claude, "sk-bp-not-a-key").messages.create(
            model=MODEL, max_tokens=5, messages=MESSAGES
        )


async def test_anthropic_version_defaults_to_the_upstreams_when_the_client_sends_none(
    claude: Proxy,
) -> None:
    _, key = await claude.create_key(ORG)
    body = {"model": MODEL, "max_tokens": 5, "messages": MESSAGES}
    status, answer, _ = await raw(claude, "/v1/messages", body, {"x-api-key": key})
    assert status == 200, answer
    assert claude.received()[-1].headers["anthropic-version"] == "2023-06-01"


# --- refusals the SDK handles: budget (no retry) and rate limit (retry after) -------------


async def test_a_budget_refusal_raises_in_the_sdk_without_retrying(claude: Proxy) -> None:
    kid, key = await claude.create_key(ORG)
    status, answer = await claude.admin(
        "PUT",
        f"/api/v1/llm/budgets/apikey/{kid}",
        {
            "period": "daily",
            "limit_kind": "tokens",
            "limit": 100,
            "thresholds": [{"pct": 100, "action": "block"}],
        },
    )
    assert status == 200, answer
    calls = len(claude.received())
    sent: list[httpx2.Request] = []

    async def count(request: httpx2.Request) -> None:
        sent.append(request)

    client = async_client(
        claude,
        key,
        max_retries=3,
        http_client=httpx2.AsyncClient(event_hooks={"request": [count]}),
    )
    with pytest.raises(anthropic.RateLimitError) as caught:
        await client.messages.create(model=MODEL, max_tokens=50, messages=MESSAGES)
    error = caught.value
    assert len(sent) == 1  # the SDK did not retry
    assert error.status_code == 429 and error.type == "rate_limit_error"
    assert error.response.headers["x-should-retry"] == "false"
    assert "Budget exceeded" in str(error.api_message)
    body: Any = error.body
    budget = body["error"].pop("budget")  # the refusal explains itself, as on OpenAI routes
    assert (budget["scope"], budget["scope_id"], budget["reason"]) == ("apikey", kid, "exceeds")
    assert budget["reserved"] == error.response.headers["x-budget-reserved"]
    assert_anthropic_error(body, "rate_limit_error")
    assert len(claude.received()) == calls


async def test_a_rate_limit_is_retried_by_the_sdk_after_retry_after(
    start_proxy: Callable[..., Any], mock_upstream: TestServer
) -> None:
    proxy: Proxy = await start_proxy(clock=time.time, **claude_sections(root(mock_upstream)))
    _, key = await proxy.create_key(ORG, limits={"rps": 1})
    client = async_client(proxy, key, max_retries=2)
    await client.messages.create(model=MODEL, max_tokens=5, messages=MESSAGES)
    # The bucket is empty: the proxy answers 429 with retry-after; the SDK waits and retries.
    raw_answer = await client.messages.with_raw_response.create(
        model=MODEL, max_tokens=5, messages=MESSAGES
    )
    assert raw_answer.retries_taken >= 1
    # The refusal itself, as the SDK saw it.
    status, body, headers = await raw(
        proxy, "/v1/messages", {"model": MODEL, "max_tokens": 5, "messages": MESSAGES},
        {"x-api-key": key},
    )  # fmt: skip
    assert status == 429
    assert_anthropic_error(body, "rate_limit_error")
    assert int(headers["retry-after"]) >= 1 and headers["x-should-retry"] == "true"
    assert headers["anthropic-ratelimit-requests-limit"] == "1"
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert headers["anthropic-ratelimit-requests-reset"].endswith("Z")


async def test_admitted_answers_carry_limits_in_anthropic_names_not_the_upstreams(
    claude: Proxy,
) -> None:
    _, key = await claude.create_key(ORG, limits={"rpm": 10, "tpm": 100000})
    answer = await async_client(claude, key).messages.with_raw_response.create(
        model=MODEL, max_tokens=5, messages=MESSAGES
    )
    headers = answer.headers
    assert headers["anthropic-ratelimit-requests-limit"] == "10"
    assert headers["anthropic-ratelimit-requests-remaining"] == "9"
    reset = headers["anthropic-ratelimit-requests-reset"]
    assert time.strptime(reset, "%Y-%m-%dT%H:%M:%SZ")
    assert headers["anthropic-ratelimit-tokens-limit"] == "100000"
    assert headers["x-ratelimit-limit-requests"] == "10"  # the OpenAI names as well
    assert headers["x-upstream"] == "claude"
    # The upstream account's own limits and identity stay behind.
    assert headers["anthropic-ratelimit-requests-remaining"] != "3999"
    assert "anthropic-organization-id" not in headers


# --- errors in Anthropic's shape ------------------------------------------------------------


async def test_errors_on_the_messages_routes_are_in_anthropics_shape(
    start_proxy: Callable[..., Any], mock_upstream: TestServer, store: aioredis.Redis
) -> None:
    proxy: Proxy = await start_proxy(
        server={"max_body_bytes": 4096}, **claude_sections(root(mock_upstream))
    )
    kid, key = await proxy.create_key(ORG, models=[MODEL])
    auth = {"x-api-key": key}
    good = {"model": MODEL, "max_tokens": 5, "messages": MESSAGES}
    cases: list[tuple[str, Any, int, str]] = [
        ("/v1/messages", {**good, "max_tokens": 0}, 400, "invalid_request_error"),
        ("/v1/messages", {**good, "stream": "yes"}, 400, "invalid_request_error"),
        ("/v1/messages", b"{not json", 400, "invalid_request_error"),
        ("/v1/messages", {**good, "model": "claude-nope-1"}, 404, "not_found_error"),
        ("/v1/messages", {**good, "model": "gpt-4o"}, 403, "permission_error"),
        ("/v1/messages/nothing-here", good, 404, "not_found_error"),
        ("/v1/messages", {**good, "pad": "x" * 5000}, 413, "request_too_large"),
    ]
    for path, body, status, kind in cases:
        got, answer, _ = await raw(proxy, path, body, auth)
        assert (got, answer["error"]["type"]) == (status, kind), (path, answer)
        assert_anthropic_error(answer, kind)
    # The same failures on an OpenAI route stay OpenAI-shaped.
    got, answer, _ = await raw(proxy, "/v1/chat/completions", b"{not json", {
        "Authorization": f"Bearer {key}"
    })  # fmt: skip
    assert got == 400 and set(answer) == {"error"} and answer["error"]["code"] == "invalid_request"
    # Upstream errors pass through with their status; the SDK maps them.
    client = async_client(proxy, key)
    for status, exc in ((529, anthropic.OverloadedError), (500, anthropic.InternalServerError)):
        with pytest.raises(exc) as caught:
            await client.messages.create(
                model=MODEL, max_tokens=5, messages=MESSAGES,
                extra_headers={"x-mock-status": str(status)},
            )  # fmt: skip
        assert caught.value.status_code == status
    # Nothing above cost anything.
    assert (await spent(store, kid))[0] == 0


async def test_each_model_answers_on_its_own_api_only(claude: Proxy) -> None:
    _, key = await claude.create_key(ORG)
    status, answer, _ = await raw(
        claude,
        "/v1/chat/completions",
        {"model": MODEL, "messages": MESSAGES},
        {"Authorization": f"Bearer {key}"},
    )
    assert status == 400 and answer["error"]["code"] == "wrong_endpoint"
    assert "/v1/messages" in answer["error"]["message"]
    status, answer, _ = await raw(
        claude, "/v1/messages", {"model": "gpt-4o", "max_tokens": 5, "messages": MESSAGES},
        {"x-api-key": key},
    )  # fmt: skip
    assert status == 400
    assert_anthropic_error(answer, "invalid_request_error")


async def test_server_tools_are_refused_before_anything_is_sent(claude: Proxy) -> None:
    _, key = await claude.create_key(ORG)
    calls = len(claude.received())
    with pytest.raises(anthropic.BadRequestError) as caught:
        await async_client(claude, key).messages.create(
            model=MODEL,
            max_tokens=5,
            messages=MESSAGES,
            tools=[{"type": "web_search_20250305", "name": "web_search"}],
        )
    assert "web_search_20250305" in str(caught.value.api_message)
    assert len(claude.received()) == calls


# --- the reservation is the documented bound, and the settle the upstream's usage ---------


async def test_the_reservation_is_the_prompt_bound_plus_max_tokens_at_the_dearest_rate(
    claude: Proxy, store: aioredis.Redis
) -> None:
    kid, key = await claude.create_key(ORG)
    route = claude.app[GATEWAY].routes[MODEL]
    body = {"model": MODEL, "max_tokens": 40, "messages": MESSAGES}
    bound = prompt_bound(body, route.context_window)
    reserve = reserve_cost_nano(route.price, bound, 40)
    assert reserve == math.ceil((bound * 6 + 40 * 15) * 10**9 / 10**6)  # 1-hour writes: 6/M
    limit = Decimal(reserve) / 10**9
    status, answer = await claude.admin(
        "PUT",
        f"/api/v1/llm/budgets/apikey/{kid}",
        {
            "period": "daily",
            "limit_kind": "cost",
            "limit": float(limit),
            "thresholds": [{"pct": 100, "action": "block"}],
        },
    )
    assert status == 200, answer
    assert Decimal(str(answer["limit"])) == limit
    # One token more than fits: refused. Exactly what fits: admitted.
    with pytest.raises(anthropic.RateLimitError):
        await async_client(claude, key).messages.create(
            model=MODEL, max_tokens=41, messages=MESSAGES
        )
    answer_ = await async_client(claude, key).messages.create(
        model=MODEL, max_tokens=40, messages=MESSAGES, extra_headers={"x-mock-output-tokens": "40"}
    )
    [record] = await records(store, 1)
    assert record["cost_nano"] == expected_cost(answer_.usage) < reserve


async def test_a_stream_broken_off_upstream_ends_in_an_error_and_charges_an_upper_bound(
    claude: Proxy, store: aioredis.Redis
) -> None:
    _, key = await claude.create_key(ORG)
    with pytest.raises(anthropic.APIStatusError) as caught:
        async with async_client(claude, key).messages.stream(
            model=MODEL,
            max_tokens=50,
            messages=MESSAGES,
            extra_headers={"x-mock-fail-after-chunks": "3", "x-mock-output-tokens": "20"},
        ) as stream:
            async for _ in stream.text_stream:
                pass
    assert "broke off" in str(caught.value)
    [record] = await records(store, 1)
    # message_start reported the input; the output is the bytes relayed (" the of and").
    assert (record["in"], record["out"], record["reported"]) == (MOCK_PROMPT, 11, False)
    assert await store.zcard(P + "leases") == 0


async def test_patterns_route_every_match_and_price_each_name_from_the_database(
    claude: Proxy, store: aioredis.Redis
) -> None:
    _, key = await claude.create_key(ORG, models=["claude-*"])
    client = async_client(claude, key)
    answer = await client.messages.create(
        model="claude-haiku-4-5", max_tokens=5, messages=MESSAGES, extra_headers=CACHE_HEADERS
    )
    route = claude.app[GATEWAY].routes["claude-haiku-4-5"]
    assert route.price.source == "genai-prices" and route.entry == "claude-*"
    # Claude Haiku 4.5: $1 input, $0.10 cache read, $1.25 / $2 cache writes, $5 output.
    u = answer.usage
    expected = u.input_tokens * 1 + 4 * Decimal("0.1") + 3 * Decimal("1.25") + 2 * 2 + 5 * 5
    [record] = await records(store, 1)
    assert record["cost_nano"] == math.ceil(expected * 10**9 / 10**6)
    assert record["model"] == "claude-haiku-4-5"
    assert claude.received()[-1].body["model"] == "claude-haiku-4-5"
    # A name the pattern matches but no price is known for: refused, never served free.
    with pytest.raises(anthropic.NotFoundError) as caught:
        await client.messages.create(model="claude-unknown-9", max_tokens=5, messages=MESSAGES)
    assert "no known price" in str(caught.value.api_message)


async def test_both_path_prefixes(claude: Proxy) -> None:
    _, key = await claude.create_key(ORG)
    body = {"model": MODEL, "max_tokens": 5, "messages": MESSAGES}
    for path in ("/api/v1/llm/messages", "/api/v1/llm/v1/messages"):
        status, answer, _ = await raw(claude, path, body, {"x-api-key": key})
        assert status == 200 and answer["usage"]["output_tokens"] == 5, (path, answer)
    sdk = anthropic.AsyncAnthropic(base_url=claude.url + "/api/v1/llm", api_key=key, max_retries=0)
    counted = await sdk.messages.count_tokens(model=MODEL, messages=MESSAGES)
    assert counted.input_tokens == MOCK_PROMPT
    await sdk.close()
