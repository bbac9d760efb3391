"""Fallbacks: a model's upstream list, tried in order when one refuses connections, answers 429
or 5xx before the client saw a byte — reserved once, charged once, the one that served named."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import anthropic
import openai
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from conftest import Proxy, eventually, usage_record

from proxy.config import ModelConfig, PriceConfig, UpstreamConfig
from proxy.providers.fallback import Candidate, CoolDowns
from proxy.store.embedded_redis import free_port
from proxy.tools.mock import RECEIVED, MockOptions, build_mock_app

ORG = "acme"
P = "bp:{o:acme}:"
MESSAGES: list[Any] = [{"role": "user", "content": "say something nice about budgets"}]
MOCK_PROMPT = 5 + 4 + 3
PRICE = PriceConfig(input=2, output=10)


def cost(prompt: int, output: int) -> int:
    return prompt * 2000 + output * 10000  # nano: 2 and 10 per 1M tokens


@pytest.fixture
async def failing() -> AsyncIterator[Callable[[int], Any]]:
    """Starts mocks that answer every request with one status."""
    servers: list[TestServer] = []

    async def start(status: int) -> TestServer:
        server = TestServer(build_mock_app(MockOptions(status=status)), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


def root(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


def upstream(name: str, base: str, **fields: Any) -> UpstreamConfig:
    fields.setdefault("forward_headers", ["x-mock-*"])
    return UpstreamConfig(name=name, base_url=base, api_key_env="TEST_UPSTREAM_KEY", **fields)


async def one_record(store: aioredis.Redis) -> dict[str, Any]:
    async def settled() -> bool:
        return int(await store.xlen(P + "usage")) >= 1

    await eventually(settled, what="settle")
    [(_, fields)] = await store.xrange(P + "usage")
    return usage_record(fields)


async def assert_charged_once(store: aioredis.Redis, kid: str, expected: int) -> None:
    record = await one_record(store)
    assert record["cost_nano"] == expected
    spends = [await store.hgetall(k) async for k in store.scan_iter(f"{P}spend:k:{kid}:*")]
    assert spends and all(int(s["c"]) == expected for s in spends)
    assert await store.zcard(P + "leases") == 0
    held = await store.hgetall(P + "infl:o")
    assert all(int(v) == 0 for v in held.values()), held


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "llm_proxy.access"]


@pytest.mark.parametrize("first", ["refused", 429, 500, 503])
async def test_a_failing_first_upstream_falls_back_to_the_next_and_is_charged_once(
    start_proxy: Callable[..., Any],
    mock_upstream: TestServer,
    failing: Callable[[int], Any],
    store: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
    first: str | int,
) -> None:
    caplog.set_level(logging.INFO, logger="llm_proxy.access")
    bad: TestServer | None = None
    if first == "refused":
        first_url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    else:
        assert isinstance(first, int)
        bad = await failing(first)
        first_url = root(bad) + "/v1"
    proxy: Proxy = await start_proxy(
        upstreams=[upstream("primary", first_url), upstream("backup", root(mock_upstream) + "/v1")],
        models=[ModelConfig(name="gpt-4o", upstream=["primary", "backup"], price=PRICE)],
    )
    kid, key = await proxy.create_key(ORG)
    answer = await proxy.openai(key).chat.completions.with_raw_response.create(
        model="gpt-4o",
        messages=MESSAGES,
        max_tokens=10,
        extra_headers={"x-mock-output-tokens": "6"},
    )
    assert answer.http_response.status_code == 200
    assert answer.headers["x-upstream"] == "backup"
    if bad is not None:
        assert len(bad.app[RECEIVED]) == 1  # it was asked, and refused
    assert len(mock_upstream.app[RECEIVED]) == 1
    await assert_charged_once(store, kid, cost(MOCK_PROMPT, 6))
    record = await one_record(store)
    assert record["upstream"] == "backup"
    [line] = [line for line in access_lines(caplog) if line.get("model") == "gpt-4o"]
    why = "connect" if first == "refused" else str(first)
    assert line["upstream"] == "backup" and line["fallback_from"] == f"primary:{why}"


async def test_a_failed_upstream_cools_down_and_is_tried_last(
    start_proxy: Callable[..., Any],
    mock_upstream: TestServer,
    failing: Callable[[int], Any],
) -> None:
    bad = await failing(500)
    proxy: Proxy = await start_proxy(
        upstreams=[
            upstream("primary", root(bad) + "/v1", cooldown_seconds=3600),
            upstream("backup", root(mock_upstream) + "/v1"),
        ],
        models=[ModelConfig(name="gpt-4o", upstream=["primary", "backup"], price=PRICE)],
    )
    _, key = await proxy.create_key(ORG)
    client = proxy.openai(key)
    for _ in range(3):
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=5)
    # Asked once, then skipped for the cool-down: the next two went to the backup directly.
    assert len(bad.app[RECEIVED]) == 1
    assert len(mock_upstream.app[RECEIVED]) == 3


async def test_the_last_upstreams_answer_is_relayed_when_every_one_fails(
    start_proxy: Callable[..., Any], failing: Callable[[int], Any], store: aioredis.Redis
) -> None:
    first, second = await failing(503), await failing(429)
    proxy: Proxy = await start_proxy(
        upstreams=[upstream("a", root(first) + "/v1"), upstream("b", root(second) + "/v1")],
        models=[ModelConfig(name="gpt-4o", upstream=["a", "b"], price=PRICE)],
    )
    kid, key = await proxy.create_key(ORG)
    with pytest.raises(openai.RateLimitError) as caught:
        await proxy.openai(key).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.response.headers["x-upstream"] == "b"
    assert len(first.app[RECEIVED]) == len(second.app[RECEIVED]) == 1
    await assert_charged_once(store, kid, 0)


async def test_client_errors_and_timeouts_are_not_retried(
    start_proxy: Callable[..., Any],
    mock_upstream: TestServer,
    failing: Callable[[int], Any],
) -> None:
    backup = await failing(500)  # would fail loudly if ever asked
    proxy: Proxy = await start_proxy(
        upstreams=[
            upstream("primary", root(mock_upstream) + "/v1"),
            upstream("b", root(backup) + "/v1"),
        ],
        models=[ModelConfig(name="gpt-4o", upstream=["primary", "b"], price=PRICE)],
        timeouts={"read_seconds": 0.2, "connect_seconds": 1, "total_seconds": 5},
    )
    _, key = await proxy.create_key(ORG)
    client = proxy.openai(key)
    with pytest.raises(openai.BadRequestError):  # the upstream's own 400: the request is wrong
        await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_headers={"x-mock-status": "400"}
        )
    with pytest.raises(openai.APIStatusError) as caught:  # it may have done (and billed) the work
        await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_headers={"x-mock-latency-ms": "1000"}
        )
    assert caught.value.status_code == 504
    assert len(backup.app[RECEIVED]) == 0


async def test_a_stream_already_started_is_not_retried(
    start_proxy: Callable[..., Any],
    mock_upstream: TestServer,
    store: aioredis.Redis,
) -> None:
    other = TestServer(build_mock_app(), host="127.0.0.1")
    await other.start_server()
    try:
        proxy: Proxy = await start_proxy(
            upstreams=[
                upstream("primary", root(mock_upstream) + "/v1"),
                upstream("backup", root(other) + "/v1"),
            ],
            models=[ModelConfig(name="gpt-4o", upstream=["primary", "backup"], price=PRICE)],
        )
        _, key = await proxy.create_key(ORG)
        with pytest.raises(openai.APIError):
            stream = await proxy.openai(key).chat.completions.create(
                model="gpt-4o",
                messages=MESSAGES,
                max_tokens=20,
                stream=True,
                extra_headers={"x-mock-fail-after-chunks": "3", "x-mock-output-tokens": "20"},
            )
            async for _ in stream:
                pass
        assert len(other.app[RECEIVED]) == 0
        record = await one_record(store)
        assert record["upstream"] == "primary" and record["out"] > 0
    finally:
        await other.close()


async def test_anthropic_upstreams_fall_back_too(
    start_proxy: Callable[..., Any],
    mock_upstream: TestServer,
    failing: Callable[[int], Any],
    store: aioredis.Redis,
) -> None:
    bad = await failing(529)
    proxy: Proxy = await start_proxy(
        upstreams=[
            upstream("busy", root(bad), kind="anthropic"),
            upstream("claude", root(mock_upstream), kind="anthropic"),
        ],
        models=[
            ModelConfig(
                name="claude-test",
                upstream=["busy", "claude"],
                price=PriceConfig(input=2, output=10, cache_write_input=2, cache_write_1h_input=2),
            )
        ],
    )
    kid, key = await proxy.create_key(ORG)
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=key, max_retries=0)
    answer = await client.messages.with_raw_response.create(
        model="claude-test", max_tokens=5, messages=MESSAGES
    )
    await client.close()
    assert answer.headers["x-upstream"] == "claude"
    assert len(bad.app[RECEIVED]) == 1
    await assert_charged_once(store, kid, cost(MOCK_PROMPT, 5))


async def test_an_azure_fallback_gets_its_deployment_and_its_own_credential(
    start_proxy: Callable[..., Any],
    mock_upstream: TestServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEST_AZURE_KEY", "azure-secret")
    proxy: Proxy = await start_proxy(
        upstreams=[
            upstream("openai", f"http://127.0.0.1:{free_port()}/v1"),
            UpstreamConfig(
                name="azure",
                base_url=root(mock_upstream),
                api_key_env="TEST_AZURE_KEY",
                kind="azure",
                api_version="2024-10-21",
                forward_headers=["x-mock-*"],
            ),
        ],
        models=[
            ModelConfig(
                name="gpt-4o", upstream=["openai", "azure"], deployment="gpt4o-prod", price=PRICE
            )
        ],
    )
    _, key = await proxy.create_key(ORG)
    answer = await proxy.openai(key).chat.completions.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=5
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 5
    sent = proxy.received()[-1]
    assert sent.path == "/openai/deployments/gpt4o-prod/chat/completions"
    assert sent.query == {"api-version": "2024-10-21"}
    assert sent.headers["api-key"] == "azure-secret" and "authorization" not in sent.headers
    assert sent.body is not None and sent.body["model"] == "gpt4o-prod"


def test_weights_order_the_upstreams_and_cooling_ones_go_last() -> None:
    now = [0.0]
    cooldowns = CoolDowns(clock=lambda: now[0], rng=random.Random(7))
    a, b, c = (UpstreamConfig(name=n, base_url="http://x", cooldown_seconds=10) for n in "abc")
    plain = [Candidate(a, "m"), Candidate(b, "m"), Candidate(c, "m")]
    assert [x.upstream.name for x in cooldowns.order(plain)] == ["a", "b", "c"]
    weighted = [Candidate(a, "m", weight=1), Candidate(b, "m", weight=9), Candidate(c, "m")]
    firsts = [cooldowns.order(weighted)[0].upstream.name for _ in range(2000)]
    share = firsts.count("b") / len(firsts)
    assert 0.75 < share < 0.86  # 9 / 11 = 0.82
    cooldowns.failed(a)
    assert [x.upstream.name for x in cooldowns.order(plain)] == ["b", "c", "a"]
    now[0] = 10.5  # the cool-down is over
    assert [x.upstream.name for x in cooldowns.order(plain)] == ["a", "b", "c"]
