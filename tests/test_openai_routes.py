"""OpenAI's routes beyond chat (issue 27): moderations metered end to end with the real
``openai`` SDK against the mock, and every route not metered yet refused in OpenAI's shape
(never forwarded, never a bare 404)."""

from __future__ import annotations

from typing import Any

import openai
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from conftest import Proxy, eventually, usage_record
from openai.types import ModerationTextInputParam

from proxy.catalog.pricing import cost_nano
from proxy.config import ModelConfig, PriceConfig
from proxy.dialects.openai_routes import UNMETERED
from proxy.gateway.state import GATEWAY
from proxy.tools.mock.records import REPORTED

P = "bp:{o:acme}:"
ORG = "acme"
MODELS = [
    ModelConfig(name="gpt-4o-mini", upstream="mock", max_output_tokens=1000),
    ModelConfig(
        name="omni-moderation-latest",
        upstream="mock",
        kind="moderation",
        price=PriceConfig(input="0", output="0"),
    ),
    ModelConfig(
        name="priced-moderation",
        upstream="mock",
        kind="moderation",
        price=PriceConfig(input="0.37", output="0"),
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


async def costs_of(proxy: Proxy, kid: str) -> int:
    now = int(proxy.clock())
    start = now - now % 86400
    query = {"start_time": start, "end_time": start + 86400, "group_by": "api_key_id"}
    status, body = await proxy.admin(
        "GET", "/api/v1/llm/usage/costs?" + "&".join(f"{k}={v}" for k, v in query.items())
    )
    assert status == 200, body
    return sum(int(r["cost_nano"]) for r in body["data"] if r["api_key_id"] == kid)


async def test_moderations_are_metered_exactly_at_the_models_price(
    proxy: Proxy, store: aioredis.Redis
) -> None:
    kid, key = await proxy.create_key(ORG, name="mod")
    client = proxy.openai(key)
    texts = ["I want to hug a kitten today.", "Nothing to see here, move along please."]
    answer = await client.moderations.create(model="priced-moderation", input=texts)
    assert len(answer.results) == 2 and not answer.results[0].flagged
    # A second one whose upstream reports usage, and a free model.
    await client.moderations.create(
        model="priced-moderation",
        input=[ModerationTextInputParam(type="text", text="hello there")],
        extra_headers={"x-mock-moderation-usage": "true"},
    )
    free = await client.moderations.create(
        model="omni-moderation-latest", input="hello", extra_headers={"x-mock-flagged": "true"}
    )
    assert free.results[0].flagged
    mock_app: web.Application = proxy.mock.app
    answers = mock_app[REPORTED]
    reported = list(answers)
    assert [r.path for r in reported] == ["/v1/moderations"] * 3
    got = await records(store, 3)
    assert [(r["endpoint"], r["model"]) for r in got] == [
        ("moderations", "priced-moderation"),
        ("moderations", "priced-moderation"),
        ("moderations", "omni-moderation-latest"),
    ]
    routes = proxy.app[GATEWAY].routes
    expected = []
    for record, usage in zip(got, reported, strict=True):
        route = routes.get(record["model"])
        assert route is not None
        assert (record["in"], record["out"]) == (usage.prompt_tokens, 0)
        cost = cost_nano(route.price, usage.prompt_tokens, 0)
        assert record["cost_nano"] == cost
        expected.append(cost)
    assert [r["reported"] for r in got] == [False, True, False]
    assert expected[0] > 0 and expected[2] == 0
    assert await costs_of(proxy, kid) == sum(expected)
    assert await store.zcard(P + "leases") == 0
    now = int(proxy.clock())
    start = now - now % 86400
    status, page = await proxy.admin(
        "GET", f"/api/v1/llm/usage/moderations?start_time={start}&bucket_width=1d"
    )
    assert status == 200, page
    [result] = page["data"][0]["results"]
    assert result["object"] == "organization.usage.moderations.result"
    assert result["num_model_requests"] == 3
    assert result["input_tokens"] == sum(r.prompt_tokens for r in reported)


async def test_moderations_validate_input_and_model_kind(proxy: Proxy) -> None:
    _, key = await proxy.create_key(ORG)
    client = proxy.openai(key)
    with pytest.raises(openai.BadRequestError) as bad:
        bad_input: Any = [{"type": "video"}]
        await client.moderations.create(model="priced-moderation", input=bad_input)
    assert bad.value.param == "input"
    with pytest.raises(openai.BadRequestError) as wrong:
        await client.moderations.create(model="gpt-4o-mini", input="hi")
    assert wrong.value.code == "model_not_supported"
    with pytest.raises(openai.AuthenticationError):
        await proxy.openai("sk-wrong").moderations.create(model="priced-moderation", input="x")


async def test_moderations_are_rate_limited(start_proxy: Any) -> None:
    proxy: Proxy = await start_proxy(models=MODELS)
    _, key = await proxy.create_key(ORG, limits={"rpm": 1})
    client = proxy.openai(key)
    await client.moderations.create(model="omni-moderation-latest", input="one")
    with pytest.raises(openai.RateLimitError):
        await client.moderations.create(model="omni-moderation-latest", input="two")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        (method, path.partition("{")[0] + tail)
        for method, path in UNMETERED
        for tail in ("", "/obj_1/sub", "/a%0Ab")
        if tail == "" or "{tail" in path
    ],
)
async def test_unmetered_routes_are_refused_in_openais_shape_and_never_forwarded(
    proxy: Proxy, method: str, path: str
) -> None:
    _, key = await proxy.create_key(ORG)
    concrete = path
    for prefix in ("/v1", "/api/v1/llm"):
        async with proxy.session.request(
            method,
            f"{proxy.url}{prefix}/{concrete}",
            data=b"x" * 10,
            headers={"Authorization": f"Bearer {key}"},
        ) as response:
            body = await response.json()
            assert response.status == 403, body
            assert body["error"]["code"] == "route_not_metered"
            assert body["error"]["type"] == "permission_error"
        async with proxy.session.request(method, f"{proxy.url}{prefix}/{concrete}") as response:
            assert response.status == 401
    assert not [r for r in proxy.received() if r.path.endswith(concrete)]


async def test_sdk_calls_to_unmetered_routes_raise_permission_denied(proxy: Proxy) -> None:
    _, key = await proxy.create_key(ORG)
    client = proxy.openai(key)
    with pytest.raises(openai.PermissionDeniedError) as files:
        await client.files.create(file=("a.jsonl", b"{}"), purpose="batch")
    assert files.value.code == "route_not_metered"
    with pytest.raises(openai.PermissionDeniedError):
        await client.batches.retrieve("batch_1")


async def test_a_huge_declared_upload_is_refused_without_reading_it(proxy: Proxy) -> None:
    _, key = await proxy.create_key(ORG)
    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": "multipart/form-data; boundary=x",
        "Content-Length": str(2 * 1024**3),
    }

    async def never_ending() -> Any:
        yield b"--x\r\n"

    async with proxy.session.post(
        f"{proxy.url}/v1/audio/transcriptions", data=never_ending(), headers=headers
    ) as response:
        assert response.status in (403, 413)


async def test_a_background_response_is_refused_not_settled_unmetered(proxy: Proxy) -> None:
    _, key = await proxy.create_key(ORG)
    with pytest.raises(openai.BadRequestError) as refused:
        await proxy.openai(key).responses.create(model="gpt-4o-mini", input="hi", background=True)
    assert (refused.value.code, refused.value.param) == ("background_not_metered", "background")
    assert not [r for r in proxy.received() if r.path == "/v1/responses"]
    answer = await proxy.openai(key).responses.create(
        model="gpt-4o-mini", input="hi", background=False
    )
    assert answer.status == "completed"
