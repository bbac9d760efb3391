"""Cost on every answer (issue 23, item 7): ``x-llm-cost`` headers on buffered answers, a
``cost`` field in a stream's final usage object, both equal to what the books charged."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import anthropic
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from conftest import Proxy
from helpers import mock_output, sdk_stream, user_messages
from test_anthropic_api import MESSAGES, MODEL, claude_sections, records, root

from proxy.gateway.answer_cost import major_units, with_cost


@pytest.fixture
async def claude(start_proxy: Callable[..., Any], mock_upstream: TestServer) -> Proxy:
    proxy: Proxy = await start_proxy(**claude_sections(root(mock_upstream)))
    return proxy


def _booked(record: dict[str, Any]) -> int:
    cost: int = record["cost_nano"]
    return cost


async def test_a_buffered_answer_says_what_the_books_charged(
    claude: Proxy, store: aioredis.Redis
) -> None:
    _, key = await claude.create_key("acme")
    body = {"model": "gpt-4o", "messages": user_messages("hello there"), "max_tokens": 50}
    headers = {"Authorization": f"Bearer {key}", **mock_output(7)}
    async with claude.session.post(
        claude.url + "/v1/chat/completions", json=body, headers=headers
    ) as response:
        assert response.status == 200
        nano = int(response.headers["x-llm-cost-nano"])
        major = response.headers["x-llm-cost"]
        assert response.headers["x-llm-cost-currency"] == "USD"
    [record] = await records(store, 1)
    assert nano == _booked(record) > 0
    assert Decimal(major) == Decimal(nano) / 10**9


async def test_an_openai_stream_carries_the_cost_in_its_usage_chunk(
    claude: Proxy, store: aioredis.Redis
) -> None:
    _, key = await claude.create_key("acme")
    chunks = await sdk_stream(
        claude.openai(key),
        "gpt-4o",
        user_messages("hello there"),
        output_tokens=5,
        stream_options={"include_usage": True},
    )
    usage = chunks[-1].usage
    assert usage is not None and usage.model_extra is not None
    [record] = await records(store, 1)
    assert usage.model_extra["cost_nano"] == _booked(record) > 0
    assert Decimal(str(usage.model_extra["cost"])) == Decimal(_booked(record)) / 10**9


async def test_anthropic_answers_carry_the_cost(claude: Proxy, store: aioredis.Redis) -> None:
    _, key = await claude.create_key("acme")
    async with anthropic.AsyncAnthropic(base_url=claude.url, api_key=key, max_retries=0) as sdk:
        raw = await sdk.messages.with_raw_response.create(
            model=MODEL, max_tokens=30, messages=MESSAGES
        )
        buffered_nano = int(raw.headers["x-llm-cost-nano"])
        async with sdk.messages.stream(model=MODEL, max_tokens=30, messages=MESSAGES) as stream:
            deltas = [e async for e in stream if e.type == "message_delta"]
    extra = deltas[-1].usage.model_extra
    assert extra is not None
    first, second = await records(store, 2)
    assert buffered_nano == _booked(first) > 0
    assert extra["cost_nano"] == _booked(second) > 0


async def test_the_off_switch(start_proxy: Callable[..., Any], mock_upstream: TestServer) -> None:
    proxy: Proxy = await start_proxy(metering={"cost_in_answers": False})
    _, key = await proxy.create_key("acme")
    body = {"model": "gpt-4o-mini", "messages": user_messages("hi")}
    async with proxy.session.post(
        proxy.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        assert response.status == 200
        assert "x-llm-cost" not in response.headers
    chunks = await sdk_stream(
        proxy.openai(key),
        "gpt-4o-mini",
        user_messages("hi"),
        stream_options={"include_usage": True},
    )
    usage = chunks[-1].usage
    assert usage is not None and "cost" not in (usage.model_extra or {})


def test_the_cost_goes_into_the_last_usage_object_as_exact_json() -> None:
    assert major_units(123) == "0.000000123" and major_units(0) == "0"
    assert major_units(2_500_000_000) == "2.5"
    event = b'data: {"usage":{"a":1}}\n\ndata: {"usage": {}}\n\n'
    assert with_cost(event, 5) == (
        b'data: {"usage":{"a":1}}\n\ndata: {"usage": {"cost":0.000000005,"cost_nano":5}}\n\n'
    )
    assert with_cost(b"data: {}\n\n", 5) == b"data: {}\n\n"
