"""Google's SDK (``google-genai``, sync and async) against the proxy, which relays to the mock
through a ``kind = "gemini"`` and a ``kind = "vertex"`` upstream: every method, both stream
forms, the books exact to the nano against what the mock reported, Google's error shape,
budget refusals as ``ClientError`` 429 (not retried), and ``?key=`` kept out of logs and
records."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from conftest import Proxy, budget, eventually, usage_record
from google import genai
from google.genai import errors, types
from google_setup import models, reported_cost, service_account_file, upstreams

from proxy.ledger.keys import org_key
from proxy.tools.mock import REPORTED
from proxy.tools.mock.google import GOOGLE

CONTENTS = "hello there general kenobi"


@pytest.fixture
async def gproxy(
    start_proxy: Callable[..., Any],
    mock_upstream: TestServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Proxy:
    monkeypatch.setenv("TEST_GEMINI_KEY", "gemini-upstream-secret")
    root = str(mock_upstream.make_url("")).rstrip("/")
    credentials = service_account_file(tmp_path, f"{root}/token")
    proxy: Proxy = await start_proxy(upstreams=upstreams(root, credentials), models=models())
    return proxy


def client(proxy: Proxy, key: str, **headers: str) -> genai.Client:
    options = types.HttpOptions(base_url=proxy.url, headers=headers or None)
    return genai.Client(api_key=key, http_options=options)


async def records(store: aioredis.Redis, count: int) -> list[dict[str, Any]]:
    async def settled() -> bool:
        return int(await store.xlen(org_key("acme", "usage"))) >= count

    await eventually(settled, what="settle")
    return [usage_record(fields) for _, fields in await store.xrange(org_key("acme", "usage"))]


def _sync_calls(c: genai.Client, model: str, embed: str) -> list[Any]:
    config = types.GenerateContentConfig(max_output_tokens=20)
    answer = c.models.generate_content(model=model, contents=CONTENTS, config=config)
    chunks = list(c.models.generate_content_stream(model=model, contents=CONTENTS, config=config))
    counted = c.models.count_tokens(model=model, contents=CONTENTS)
    embedded = c.models.embed_content(model=embed, contents=[CONTENTS, "and more"])
    return [answer, chunks, counted, embedded]


async def _async_calls(c: genai.Client, model: str, embed: str) -> list[Any]:
    config = types.GenerateContentConfig(max_output_tokens=20)
    answer = await c.aio.models.generate_content(model=model, contents=CONTENTS, config=config)
    stream = await c.aio.models.generate_content_stream(
        model=model, contents=CONTENTS, config=config
    )
    chunks = [chunk async for chunk in stream]
    counted = await c.aio.models.count_tokens(model=model, contents=CONTENTS)
    embedded = await c.aio.models.embed_content(model=embed, contents=[CONTENTS])
    return [answer, chunks, counted, embedded]


@pytest.mark.parametrize(
    ("model", "embed", "upstream_path"),
    [
        ("gemini-2.5-flash", "gemini-embedding-001", "/v1beta/models/gemini-2.5-flash:"),
        ("gemini-2.5-pro", "vertex-embedding", "/publishers/google/models/gemini-2.5-pro:"),
    ],
)
async def test_every_method_sync_and_async_with_books_exact(
    gproxy: Proxy, store: aioredis.Redis, model: str, embed: str, upstream_path: str
) -> None:
    kid, key = await gproxy.create_key("acme")
    controls = {"x-mock-output-tokens": "7", "x-mock-reasoning-tokens": "3"}
    c = client(gproxy, key, **controls, **{"X-On-Behalf-Of": "user-42"})
    sync = await asyncio.to_thread(_sync_calls, c, model, embed)
    asynchronous = await _async_calls(c, model, embed)
    for answer, chunks, counted, embedded in (sync, asynchronous):
        assert answer.text == " the of and to in is it"
        assert answer.usage_metadata.thoughts_token_count == 3
        assert "".join(chunk.text or "" for chunk in chunks) == answer.text
        assert chunks[-1].usage_metadata.candidates_token_count == 7
        assert counted.total_tokens == 7  # 1 + (2 + 4 words)
        assert embedded.embeddings and embedded.embeddings[0].values
    rows = await records(store, 8)
    assert [r["endpoint"] for r in rows] == [
        "generateContent",
        "streamGenerateContent",
        "countTokens",
        "batchEmbedContents",
    ] * 2
    assert all(r["model"] in (model, embed) and r["reported"] for r in rows)
    assert {r["user"] for r in rows} == {"user-42"}
    assert {r["cost_nano"] for r in rows if r["endpoint"] == "countTokens"} == {0}
    reported = [*gproxy.mock.app[REPORTED]]
    assert len(reported) == 6  # countTokens reports nothing, and is charged nothing
    assert sum(r["cost_nano"] for r in rows) == reported_cost(reported)
    assert sum(r["out"] for r in rows) == sum(u.completion_tokens for u in reported)
    sent = [r for r in gproxy.received() if not r.path.startswith("/token")]
    assert all(upstream_path.split(":")[0] in r.path or "embedding" in r.path for r in sent)
    assert all(key not in json.dumps(r.headers) + json.dumps(r.query) for r in sent)
    if "vertex" in upstream_path or "publishers" in upstream_path:
        assert gproxy.mock.app[GOOGLE].issued == 1  # one token for every request, not one each
        batches = [r.body for r in sent if r.path.endswith(":batchEmbedContents")]
        assert batches and all("model" not in q for b in batches for q in b["requests"])
        assert all(r.headers["authorization"].startswith("Bearer ya29.mock-") for r in sent)
    else:
        assert all(r.headers["x-goog-api-key"] == "gemini-upstream-secret" for r in sent)
    await usage_reports_include(gproxy, model, embed, kid)


async def usage_reports_include(proxy: Proxy, model: str, embed: str, kid: str) -> None:
    """The usage API's reports count these requests, by model and key (buckets) and by model
    and end user (costs)."""
    start = int(proxy.clock.now) - 3600
    query = f"start_time={start}&group_by=model&group_by=api_key_id"
    _, completions = await proxy.admin("GET", f"/api/v1/llm/usage/completions?{query}")
    _, embeddings = await proxy.admin("GET", f"/api/v1/llm/usage/embeddings?{query}")
    end = start + 7200
    _, costs = await proxy.admin(
        "GET",
        f"/api/v1/llm/usage/costs?start_time={start}&end_time={end}"
        "&group_by=model&group_by=external_user_id",
    )
    found = {
        (r["model"], r["api_key_id"], r["num_model_requests"])
        for page in (completions, embeddings)
        for bucket in page["data"]
        for r in bucket["results"]
    }
    assert (model, kid, 4) in found, completions
    assert (embed, kid, 2) in found, embeddings
    assert model in json.dumps(costs) and "user-42" in json.dumps(costs), costs


async def test_vertex_mode_client_with_the_proxy_key_as_bearer(
    gproxy: Proxy, store: aioredis.Redis
) -> None:
    from google.oauth2.credentials import Credentials

    _, key = await gproxy.create_key("acme")
    c = genai.Client(
        vertexai=True,
        project="any-project",
        location="us-central1",
        credentials=Credentials(token=key),  # type: ignore[no-untyped-call]
        http_options=types.HttpOptions(base_url=gproxy.url, api_version="v1beta1"),
    )
    answer = await c.aio.models.generate_content(model="gemini-2.5-pro", contents=CONTENTS)
    assert answer.text
    stream = await c.aio.models.generate_content_stream(model="gemini-2.5-pro", contents=CONTENTS)
    assert "".join([chunk.text or "" async for chunk in stream]) == answer.text
    counted = await c.aio.models.count_tokens(model="gemini-2.5-pro", contents=CONTENTS)
    assert counted.total_tokens == 7
    embedded = await c.aio.models.embed_content(model="gemini-embedding-001", contents=CONTENTS)
    assert embedded.embeddings and embedded.embeddings[0].values
    rows = await records(store, 4)
    assert [r["endpoint"] for r in rows] == [
        "generateContent",
        "streamGenerateContent",
        "countTokens",
        "embedContent",
    ]
    assert sum(r["cost_nano"] for r in rows) == reported_cost(gproxy.mock.app[REPORTED])


async def test_streamed_json_array_without_alt_sse(gproxy: Proxy, store: aioredis.Redis) -> None:
    _, key = await gproxy.create_key("acme")
    body = {"contents": [{"role": "user", "parts": [{"text": CONTENTS}]}]}
    async with gproxy.session.post(
        f"{gproxy.url}/v1beta/models/gemini-2.5-flash:streamGenerateContent",
        json=body,
        headers={"x-goog-api-key": key},
    ) as response:
        assert response.status == 200
        chunks = json.loads(await response.read())
    assert isinstance(chunks, list) and chunks[-1]["usageMetadata"]["candidatesTokenCount"] == 16
    [row] = await records(store, 1)
    assert row["cost_nano"] == reported_cost(gproxy.mock.app[REPORTED]) and row["reported"]


async def test_a_budget_refusal_is_a_client_error_429_naming_the_budget_and_not_retried(
    gproxy: Proxy, store: aioredis.Redis
) -> None:
    kid, key = await gproxy.create_key("acme")
    status, body = await gproxy.admin("PUT", f"/api/v1/llm/budgets/apikey/{kid}", budget(limit=50))
    assert status in (200, 201), body
    c = client(gproxy, key)
    with pytest.raises(errors.ClientError) as caught:
        await c.aio.models.generate_content(model="gemini-2.5-flash", contents=CONTENTS)
    assert caught.value.code == 429
    assert caught.value.status == "RESOURCE_EXHAUSTED"
    assert "budget" in (caught.value.message or "").lower()
    assert not gproxy.received()  # refused before the upstream, and asked once only
    assert int(await store.xlen(org_key("acme", "usage"))) == 0


async def test_errors_take_googles_shape(gproxy: Proxy) -> None:
    _, key = await gproxy.create_key("acme")
    with pytest.raises(errors.ClientError) as caught:
        await client(gproxy, key).aio.models.generate_content(model="nope", contents="x")
    assert (caught.value.code, caught.value.status) == (404, "NOT_FOUND")
    with pytest.raises(errors.ClientError) as caught:
        await client(gproxy, "sk-wrong").aio.models.generate_content(
            model="gemini-2.5-flash", contents="x"
        )
    assert (caught.value.code, caught.value.status) == (401, "UNAUTHENTICATED")
    async with gproxy.session.post(
        f"{gproxy.url}/v1beta/models/gemini-2.5-flash:generateContent",
        json={"contents": [], "generationConfig": {"maxOutputTokens": -1}},
        headers={"x-goog-api-key": key},
    ) as response:
        error = (await response.json())["error"]
    assert (response.status, error["status"]) == (400, "INVALID_ARGUMENT")
    assert error["details"][0]["metadata"]["param"] == "generationConfig.maxOutputTokens"


@pytest.mark.parametrize(
    "config", [{"maxOutputTokens": 10**13}, {"maxOutputTokens": 10**400}, {"candidateCount": 9}]
)
async def test_huge_caps_are_a_400_naming_the_param_and_charge_nothing(
    gproxy: Proxy, store: aioredis.Redis, config: dict[str, int]
) -> None:
    _, key = await gproxy.create_key("acme")
    body = {"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": config}
    async with gproxy.session.post(
        f"{gproxy.url}/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        data=json.dumps(body),
        headers={"x-goog-api-key": key},
    ) as response:
        error = (await response.json())["error"]
    assert response.status == 400, error
    [name] = config
    assert error["details"][0]["metadata"]["param"] == f"generationConfig.{name}"
    assert not gproxy.received() and int(await store.xlen(org_key("acme", "usage"))) == 0
    assert await store.zcard(org_key("acme", "leases")) == 0


async def test_key_in_the_query_is_never_logged_nor_forwarded(
    gproxy: Proxy, store: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    _, key = await gproxy.create_key("acme")
    caplog.set_level(logging.DEBUG)
    body = {"contents": [{"parts": [{"text": CONTENTS}]}]}
    for path in ("/v1beta/models/gemini-2.5-flash:generateContent", "/v1beta/models/nope:x"):
        async with gproxy.session.post(f"{gproxy.url}{path}?key={key}", json=body) as response:
            await response.read()
    [row] = await records(store, 1)
    assert key not in json.dumps(row)
    assert key not in caplog.text
    assert all(key not in json.dumps([r.headers, r.query, r.path]) for r in gproxy.received())


async def test_models_list_and_get_in_googles_shape(gproxy: Proxy) -> None:
    _, key = await gproxy.create_key("acme")
    c = client(gproxy, key)
    names = [m.name async for m in await c.aio.models.list(config={"query_base": True})]
    assert "models/gemini-2.5-flash" in names and "models/claude-sonnet-4-5" not in names
    model = await c.aio.models.get(model="gemini-2.5-flash")
    assert model.output_token_limit == 64


async def test_a_rate_limit_refusal_is_a_client_error_429(gproxy: Proxy) -> None:
    _, key = await gproxy.create_key("acme", limits={"rpm": 1})
    c = client(gproxy, key)
    await c.aio.models.generate_content(model="gemini-2.5-flash", contents=CONTENTS)
    with pytest.raises(errors.ClientError) as caught:
        await c.aio.models.generate_content(model="gemini-2.5-flash", contents=CONTENTS)
    assert (caught.value.code, caught.value.status) == (429, "RESOURCE_EXHAUSTED")
    assert "requests per minute" in (caught.value.message or "")
    assert len(gproxy.received()) == 1
