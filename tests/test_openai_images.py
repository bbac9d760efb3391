"""Image generation (issue 27, item 2) with the real ``openai`` SDK against the proxy and the
mock: the worst case reserved (prompt + n x the cap per image), the books exact to the nano
against the mock's reported usage, streamed partial images, answers without usage settled at
the cap per image returned, and a budget that fits N admitting N of N+4 over two processes."""

from __future__ import annotations

import asyncio
import base64
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import ADMIN_KEY, Proxy, eventually, proxy_processes, usage_record, write_config

from proxy.catalog.pricing import cost_nano
from proxy.catalog.tokenizer import count_text, get_encoding
from proxy.config import ModelConfig, PriceConfig
from proxy.gateway.state import GATEWAY
from proxy.tools.mock.openai_images import PNG_1X1 as PNG
from proxy.tools.mock.records import REPORTED

P = "bp:{o:acme}:"
CAP = 6240
MODELS = [
    ModelConfig(name="gpt-4o-mini", upstream="mock", max_output_tokens=1000),
    ModelConfig(name="gpt-image-1", upstream="mock", kind="image", max_output_tokens=CAP),
    ModelConfig(
        name="dall-e-3",
        upstream="mock",
        kind="image",
        max_output_tokens=1,
        price=PriceConfig(input="0", output="120000"),  # $0.12 an image (hd 1792x1024)
    ),
]


@pytest.fixture
async def proxy(start_proxy: Any) -> Proxy:
    started: Proxy = await start_proxy(models=MODELS)
    return started


async def records(store: aioredis.Redis, count: int) -> list[dict[str, Any]]:
    async def settled() -> bool:
        return int(await store.xlen(P + "usage")) >= count

    await eventually(settled, what="settle")
    return [usage_record(fields) for _, fields in await store.xrange(P + "usage")]


def reported(proxy: Proxy) -> list[Any]:
    mock_app: web.Application = proxy.mock.app
    answers = mock_app[REPORTED]
    return list(answers)


async def test_generated_images_are_charged_exactly_the_reported_usage(
    proxy: Proxy, store: aioredis.Redis
) -> None:
    kid, key = await proxy.create_key("acme")
    client = proxy.openai(key)
    answer = await client.images.generate(
        model="gpt-image-1",
        prompt="a small red cat on a mat",
        n=2,
        size="1024x1024",
        extra_headers={"x-mock-output-tokens": "1056"},
    )
    images = answer.data or []
    assert len(images) == 2 and base64.b64decode(images[0].b64_json or "")
    assert answer.usage is not None and answer.usage.output_tokens == 2112
    [usage] = reported(proxy)
    [record] = await records(store, 1)
    route = proxy.app[GATEWAY].routes.get("gpt-image-1")
    assert route is not None and route.price.output_nano_per_m == 40_000_000_000
    cost = cost_nano(route.price, usage.prompt_tokens, usage.completion_tokens)
    assert (record["endpoint"], record["in"], record["out"]) == (
        "images/generations",
        usage.prompt_tokens,
        2112,
    )
    assert record["cost_nano"] == cost and record["reported"]
    now = int(proxy.clock())
    start = now - now % 86400
    query = f"start_time={start}&end_time={start + 86400}&group_by=api_key_id"
    status, body = await proxy.admin("GET", f"/api/v1/llm/usage/costs?{query}")
    assert status == 200, body
    assert sum(int(r["cost_nano"]) for r in body["data"] if r["api_key_id"] == kid) == cost


async def test_streamed_partial_images_settle_from_the_completed_event(
    proxy: Proxy, store: aioredis.Redis
) -> None:
    _, key = await proxy.create_key("acme")
    client = proxy.openai(key)
    stream = await client.images.generate(
        model="gpt-image-1",
        prompt="a lighthouse",
        stream=True,
        partial_images=2,
        extra_headers={"x-mock-output-tokens": "272"},
    )
    kinds = [event.type async for event in stream]
    assert kinds == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    [usage] = reported(proxy)
    [record] = await records(store, 1)
    assert (record["in"], record["out"]) == (usage.prompt_tokens, 272 + 200)
    route = proxy.app[GATEWAY].routes.get("gpt-image-1")
    assert route is not None
    assert record["cost_nano"] == cost_nano(route.price, usage.prompt_tokens, 472)


async def test_an_answer_without_usage_is_charged_per_image_returned(
    proxy: Proxy, store: aioredis.Redis
) -> None:
    """A model priced per image (cap 1 token, the image's price as the output rate)."""
    _, key = await proxy.create_key("acme")
    client = proxy.openai(key)
    answer = await client.images.generate(
        model="dall-e-3", prompt="a boat", n=3, extra_headers={"x-mock-omit-usage": "true"}
    )
    assert len(answer.data or []) == 3 and answer.usage is None
    [record] = await records(store, 1)
    assert (record["out"], record["reported"]) == (3, False)
    assert record["cost_nano"] == 3 * 120_000_000  # $0.12 x 3, to the nano


async def test_image_requests_are_validated(proxy: Proxy) -> None:
    _, key = await proxy.create_key("acme")
    for body, param in (
        ({"model": "gpt-image-1", "prompt": "x", "n": 11}, "n"),
        ({"model": "gpt-image-1"}, "prompt"),
        ({"model": "gpt-4o-mini", "prompt": "x"}, "model"),
    ):
        async with proxy.session.post(
            proxy.url + "/v1/images/generations",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
        ) as response:
            answer = await response.json()
            assert response.status == 400, answer
            assert answer["error"]["param"] == param
    assert reported(proxy) == []


# --- a budget that fits N admits N of N+4, over two processes --------------------------------

N = 3
PROMPT = "a red cat"


@pytest.fixture
async def image_processes(
    tmp_path: Path, redis_url: str, mock_upstream: TestServer
) -> AsyncIterator[list[str]]:
    tail = f"""
[[models]]
name = "gpt-image-1"
upstream = "mock"
kind = "image"
max_output_tokens = {CAP}
"""
    config = write_config(
        tmp_path / "proxy.toml", str(mock_upstream.make_url("/v1")), redis_url, tail=tail
    )
    async with proxy_processes(config) as urls:
        yield urls


@pytest.mark.slow
async def test_a_budget_that_fits_n_images_admits_n_of_n_plus_4_over_two_processes(
    image_processes: list[str], store: aioredis.Redis
) -> None:
    prompt_tokens = count_text(get_encoding("o200k_base"), PROMPT)
    assert prompt_tokens == len(PROMPT.split())  # the mock counts words: settles == reserves
    worst = prompt_tokens + 2 * CAP
    org = "images-burst"
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        url_a, url_b = image_processes
        async with session.post(
            url_a + "/api/v1/keys", json={"org_id": org}, headers=admin
        ) as response:
            created = await response.json()
        spec = {
            "period": "monthly",
            "limit_kind": "tokens",
            "limit": N * worst,
            "thresholds": [{"pct": 100, "action": "block"}],
        }
        async with session.put(
            f"{url_b}/api/v1/llm/budgets/org/{org}", json=spec, headers=admin
        ) as response:
            assert response.status == 200, await response.text()

        async def one(i: int) -> int:
            headers = {
                "Authorization": f"Bearer {created['key']}",
                "x-mock-output-tokens": str(CAP),
                "x-mock-latency-ms": "300",
            }
            body = {"model": "gpt-image-1", "prompt": PROMPT, "n": 2}
            url = image_processes[i % 2] + "/v1/images/generations"
            async with session.post(url, json=body, headers=headers) as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(one(i) for i in range(N + 4)))
    assert Counter(statuses) == {200: N, 429: 4}, statuses
    month = datetime.now(UTC).strftime("%Y-%m")
    tokens = await store.hget(f"bp:{{o:{org}}}:spend:o:{month}", "t")
    assert int(tokens) == N * worst


async def test_an_image_edit_uploads_its_image_and_is_charged_the_reported_usage(
    proxy: Proxy, store: aioredis.Redis
) -> None:
    _, key = await proxy.create_key("acme")
    client = proxy.openai(key)
    png = base64.b64decode(PNG)
    answer = await client.images.edit(
        model="gpt-image-1",
        image=[("a.png", png, "image/png"), ("b.png", png, "image/png")],
        prompt="make it blue",
        n=2,
        extra_headers={"x-mock-output-tokens": "400", "x-mock-image-input-tokens": "323"},
    )
    assert len(answer.data or []) == 2
    assert answer.usage is not None and answer.usage.input_tokens_details.image_tokens == 646
    [usage] = reported(proxy)
    [record] = await records(store, 1)
    assert record["endpoint"] == "images/edits"
    assert (record["in"], record["out"]) == (usage.prompt_tokens, 800)
    route = proxy.app[GATEWAY].routes.get("gpt-image-1")
    assert route is not None
    assert record["cost_nano"] == cost_nano(route.price, usage.prompt_tokens, 800)
    # The upload reached the mock as it was sent: a form with both images.
    [sent] = [r for r in proxy.received() if r.path == "/v1/images/edits"]
    assert sent.headers["content-type"].startswith("multipart/form-data; boundary=")


async def test_an_image_edit_without_an_image_is_refused_before_the_upstream(
    proxy: Proxy,
) -> None:
    _, key = await proxy.create_key("acme")
    data = aiohttp.FormData(default_to_multipart=True)
    data.add_field("model", "gpt-image-1")
    data.add_field("prompt", "x")
    async with proxy.session.post(
        proxy.url + "/v1/images/edits", data=data(), headers={"Authorization": f"Bearer {key}"}
    ) as response:
        body = await response.json()
        assert response.status == 400, body
        assert body["error"]["param"] == "image"
    assert reported(proxy) == []
