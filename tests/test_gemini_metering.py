"""Gemini's metering: the worst case (``maxOutputTokens`` x ``candidateCount``, the prompt's
tokenizer-less bound, media), ``usageMetadata`` field by field, long-context tiers from the
price database, a stream cut short (as events or as Google's JSON array, relayed element by
element), clamping and the quote endpoint on this dialect."""

from __future__ import annotations

import base64
import json
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from conftest import FakeClock, Proxy, budget, eventually, usage_record
from google_setup import PRICE, models, service_account_file, upstreams

from proxy.catalog.pricing import cost_nano, price_from_config, reserve_cost_nano
from proxy.catalog.routes import build_routes
from proxy.config import ModelConfig, Settings, UpstreamConfig
from proxy.dialects import GEMINI, json_array
from proxy.dialects.base import Usage
from proxy.dialects.gemini_bound import IMAGE_MIN, prompt_bound
from proxy.dialects.gemini_usage import usage_of
from proxy.errors import ApiError
from proxy.gateway.state import GATEWAY
from proxy.ledger.keys import org_key
from proxy.store.embedded_redis import free_port

TEXT = {"contents": [{"role": "user", "parts": [{"text": "hello there"}]}]}
PATH = "/v1beta/models/gemini-2.5-flash"


def png(width: int, height: int) -> str:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    data = (
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    )
    return base64.b64encode(data).decode()


def test_the_prompt_bound_covers_text_structure_and_media() -> None:
    assert prompt_bound(TEXT, 1_000_000) == 32 + 16 + 16 + len("hello there")
    image = {
        "contents": [
            {"parts": [{"inlineData": {"mimeType": "image/png", "data": png(3000, 2000)}}]}
        ]
    }
    assert prompt_bound(image, 1_000_000) == 32 + 16 + 16 + 258 * 12 * 8
    small = {
        "contents": [{"parts": [{"inlineData": {"mimeType": "image/png", "data": png(10, 10)}}]}]
    }
    assert prompt_bound(small, 1_000_000) == 32 + 16 + 16 + IMAGE_MIN
    for unbounded in (
        {"contents": [{"parts": [{"inlineData": {"mimeType": "audio/mp3", "data": "AAAA"}}]}]},
        {
            "contents": [
                {"parts": [{"inlineData": {"mimeType": "application/pdf", "data": "AAAA"}}]}
            ]
        },
        {"contents": [{"parts": [{"fileData": {"fileUri": "gs://b/f.mp4"}}]}]},
        {**TEXT, "cachedContent": "cachedContents/abc"},
    ):
        assert prompt_bound(unbounded, 123_456) == 123_456
    assert prompt_bound({}, 1000) == 32  # never 0
    deep: Any = {"text": "x"}
    for _ in range(200):
        deep = {"functionResponse": {"response": deep}}
    assert prompt_bound({"contents": [{"parts": [deep]}]}, 1_000_000) > 200


async def test_the_worst_case_is_max_output_tokens_times_candidates() -> None:
    settings = Settings.model_validate(
        {
            "upstreams": [u.model_dump() for u in upstreams("http://x", Path("/nonexistent"))],
            "models": [m.model_dump() for m in models()],
        }
    )
    route = build_routes(settings)["gemini-2.5-flash"]
    config = {"maxOutputTokens": 100, "candidateCount": 3, "thinkingConfig": {"thinkingBudget": 50}}
    r = await GEMINI.reserve({}, "generateContent", {**TEXT, "generationConfig": config}, route)
    assert (r.output_tokens, r.choices, r.stream) == (300, 3, False)
    assert r.cost_nano == reserve_cost_nano(route.price, r.prompt_tokens, 300)
    r = await GEMINI.reserve({}, "streamGenerateContent", TEXT, route)
    assert (r.output_tokens, r.stream) == (route.max_output_tokens, True)
    assert (await GEMINI.reserve({}, "countTokens", TEXT, route)).cost_nano == 0
    for bad in ({"maxOutputTokens": 0}, {"maxOutputTokens": 10**12}, {"candidateCount": 9}, "x"):
        with pytest.raises(ApiError) as caught:
            await GEMINI.reserve({}, "generateContent", {**TEXT, "generationConfig": bad}, route)
        assert caught.value.status == 400 and caught.value.param is not None


def test_usage_metadata_field_by_field() -> None:
    usage = usage_of(
        {
            "promptTokenCount": 100,
            "cachedContentTokenCount": 40,
            "candidatesTokenCount": 10,
            "thoughtsTokenCount": 5,
            "toolUsePromptTokenCount": 7,
        }
    )
    assert (usage.input_tokens, usage.cached_tokens, usage.output_tokens) == (107, 40, 15)
    assert usage.reasoning_tokens == 5
    price = price_from_config(PRICE)
    assert usage.cost_nano(price) == cost_nano(price, 107, 15, 40)


def test_long_context_tiers_from_the_price_database() -> None:
    settings = Settings.model_validate(
        {
            "upstreams": [
                {"name": "g", "kind": "gemini", "base_url": "http://x/v1beta"},
                {"name": "o", "base_url": "http://x/v1", "price_provider": "google"},
            ],
            "models": [
                {"name": "gemini-2.5-pro", "upstream": "g"},
                {
                    "name": "openai-compatible-pro",
                    "upstream": "o",
                    "upstream_model": "gemini-2.5-pro",
                },
            ],
        }
    )
    table = build_routes(settings)
    price = table["gemini-2.5-pro"].price
    assert price.tier is not None and price.tier_above == 200_000
    assert price.tier.input_nano_per_m == 2 * price.input_nano_per_m
    small, large = Usage(200_000, 1000), Usage(200_001, 1000)
    assert small.cost_nano(price) == cost_nano(price, 200_000, 1000)
    assert large.cost_nano(price) == cost_nano(price.tier, 200_001, 1000)
    assert table["openai-compatible-pro"].price.tier is None  # other dialects: base rates


@pytest.fixture
async def gp(
    start_proxy: Callable[..., Any],
    mock_upstream: TestServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Proxy:
    monkeypatch.setenv("TEST_GEMINI_KEY", "gemini-upstream-secret")
    root = str(mock_upstream.make_url("")).rstrip("/")
    credentials = service_account_file(tmp_path, f"{root}/token")
    proxy: Proxy = await start_proxy(
        clock=FakeClock(1_764_936_000),
        upstreams=[
            *upstreams(root, credentials),
            UpstreamConfig(name="dead", kind="gemini", base_url=f"http://127.0.0.1:{free_port()}"),
        ],
        models=[*models(), ModelConfig(name="gemini-2.5-*", upstream=["dead", "gemini"])],
        budgets={"clamp_min_output_tokens": 5},
    )
    return proxy


async def post(p: Proxy, path: str, body: Any, key: str, **headers: str) -> tuple[int, Any, Any]:
    async with p.session.post(
        p.url + path, json=body, headers={"x-goog-api-key": key, **headers}
    ) as response:
        return response.status, await response.read(), response.headers


async def rows(store: aioredis.Redis, count: int) -> list[dict[str, Any]]:
    async def settled() -> bool:
        return int(await store.xlen(org_key("acme", "usage"))) >= count

    await eventually(settled, what="settle")
    return [usage_record(fields) for _, fields in await store.xrange(org_key("acme", "usage"))]


async def test_a_stream_cut_short_is_charged_what_was_relayed(
    gp: Proxy, store: aioredis.Redis
) -> None:
    _, key = await gp.create_key("acme")
    body = {**TEXT, "generationConfig": {"maxOutputTokens": 40}}
    status, data, _ = await post(
        gp, f"{PATH}:streamGenerateContent?alt=sse", body, key, **{"x-mock-fail-after-chunks": "3"}
    )
    assert status == 200 and b'"status": "UNAVAILABLE"' in data  # google-genai raises on it
    [row] = await rows(store, 1)
    assert not row["reported"]
    assert row["in"] == 1 + 2 + 2  # the prompt as the chunks reported it
    assert row["out"] == len(" the of and")  # the bytes of the three words relayed
    assert row["cost_nano"] == cost_nano(price_from_config(PRICE), row["in"], row["out"])


async def test_clamping_lowers_max_output_tokens_and_the_quote_agrees(gp: Proxy) -> None:
    kid, key = await gp.create_key("acme")
    route = gp.app[GATEWAY].routes["gemini-2.5-flash"]
    bound = prompt_bound(TEXT, route.context_window)
    status, answer = await gp.admin(
        "PUT", f"/api/v1/llm/budgets/apikey/{kid}", budget(limit=bound + 12, clamp=True)
    )
    assert status == 200, answer
    body = {**TEXT, "generationConfig": {"maxOutputTokens": 50}}
    spec = {"api_key_id": kid, "endpoint": "generateContent", "headers": {"x-budget-clamp": "true"}}
    status, quote = await gp.admin(
        "POST",
        "/api/v1/llm/budgets/quote",
        {**spec, "request": {**body, "model": "gemini-2.5-flash"}},
    )
    assert status == 200, quote
    assert quote["decision"] == "clamp" and quote["clamp"]["max_tokens"] == 12
    assert quote["worst_case"]["prompt_tokens"] == bound
    status, _, headers = await post(
        gp, f"{PATH}:generateContent", body, key, **{"x-budget-clamp": "true"}
    )
    assert status == 200 and headers["x-budget-clamped-max-tokens"] == "12"
    sent = gp.received()[-1]
    assert sent.body["generationConfig"]["maxOutputTokens"] == 12 and "model" not in sent.body


async def test_a_pattern_falls_back_from_a_dead_upstream_and_is_priced_from_the_database(
    gp: Proxy, store: aioredis.Redis
) -> None:
    _, key = await gp.create_key("acme")
    status, data, headers = await post(
        gp, "/v1beta/models/gemini-2.5-flash-lite:generateContent", TEXT, key
    )
    assert status == 200, data
    route = gp.app[GATEWAY].routes["gemini-2.5-flash-lite"]
    assert route.price.source == "genai-prices" and headers["x-upstream"] == "gemini"
    [row] = await rows(store, 1)
    assert row["model"] == "gemini-2.5-flash-lite" and row["reported"]
    assert row["cost_nano"] == cost_nano(route.price, row["in"], row["out"])


def test_a_streamed_array_splits_into_whole_elements_wherever_reads_end() -> None:
    elements = [{"candidates": [{"content": {"parts": [{"text": ' a "}]{[,\\'}]}}]}, {"n": [1, {}]}]
    stream = b"[" + b",\r\n".join(json.dumps(e).encode() for e in elements) + b"\r\n]"
    for cut in range(len(stream) + 1):
        pending, seen = b"", []
        for read in (stream[:cut], stream[cut:]):
            whole, pending = json_array.split(pending + read)
            seen += json_array.elements(whole)
            assert pending == b"" or pending.lstrip(b",\r\n[").startswith(b"{"), (cut, pending)
        assert seen == elements and pending == b"", cut


async def test_a_streamed_array_is_relayed_element_by_element(gp: Proxy) -> None:
    _, key = await gp.create_key("acme")
    headers = {"x-goog-api-key": key, "x-mock-output-tokens": "3", "x-mock-chunk-delay-ms": "400"}
    started = time.monotonic()
    async with gp.session.post(
        f"{gp.url}{PATH}:streamGenerateContent", json=TEXT, headers=headers
    ) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/json")
        received = b""
        while not json_array.elements(json_array.split(received)[0]):
            received += await response.content.readany()
        first = time.monotonic() - started
        received += await response.read()
        whole = time.monotonic() - started
    assert whole - first >= 1.0  # three more chunks, 400 ms apart, came after the first
    assert len(json.loads(received)) == 4


async def test_a_streamed_array_cut_short_ends_in_an_error_element_and_is_charged_what_was_relayed(
    gp: Proxy, store: aioredis.Redis
) -> None:
    _, key = await gp.create_key("acme")
    body = {**TEXT, "generationConfig": {"maxOutputTokens": 40}}
    status, data, _ = await post(
        gp, f"{PATH}:streamGenerateContent", body, key, **{"x-mock-fail-after-chunks": "3"}
    )
    chunks = json.loads(data)  # the array is closed, its last element the error
    assert status == 200 and len(chunks) == 4 and chunks[-1]["error"]["status"] == "UNAVAILABLE"
    [row] = await rows(store, 1)
    assert not row["reported"]
    assert row["in"] == 1 + 2 + 2  # the prompt as the chunks reported it
    assert row["out"] == len(" the of and")  # the bytes of the three words relayed
    assert row["cost_nano"] == cost_nano(price_from_config(PRICE), row["in"], row["out"])
