"""Vertex AI: ``anthropic``'s ``AnthropicVertex`` against the proxy unchanged (buffered,
streamed, token counts) relayed to Claude on Vertex (``publisher = "anthropic"``), the access
token fetched from the credentials' own ``token_uri`` once per lifetime and refreshed before
it expires, and a model falling back from the Gemini API to Vertex."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from anthropic import AnthropicVertex, AsyncAnthropicVertex
from conftest import Proxy, eventually, usage_record
from google import genai
from google.genai import types
from google_setup import LOCATION, PROJECT, models, reported_cost, service_account_file, upstreams

from proxy.config import ModelConfig, Settings, UpstreamConfig
from proxy.gateway.state import GATEWAY
from proxy.ledger.keys import org_key
from proxy.providers import vertex_auth
from proxy.tools.mock import REPORTED
from proxy.tools.mock.google import GOOGLE

MESSAGES: list[Any] = [{"role": "user", "content": "hello there general kenobi"}]


async def start(
    start_proxy: Callable[..., Any], mock: TestServer, tmp_path: Path, token_path: str, **extra: Any
) -> Proxy:
    root = str(mock.make_url("")).rstrip("/")
    credentials = service_account_file(tmp_path, f"{root}{token_path}")
    proxy: Proxy = await start_proxy(
        upstreams=upstreams(root, credentials), models=models(), **extra
    )
    return proxy


@pytest.fixture
async def vp(
    start_proxy: Callable[..., Any],
    mock_upstream: TestServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Proxy:
    monkeypatch.setenv("TEST_GEMINI_KEY", "gemini-upstream-secret")
    return await start(start_proxy, mock_upstream, tmp_path, "/token")


async def records(store: aioredis.Redis, count: int) -> list[dict[str, Any]]:
    async def settled() -> bool:
        return int(await store.xlen(org_key("acme", "usage"))) >= count

    await eventually(settled, what="settle")
    return [usage_record(fields) for _, fields in await store.xrange(org_key("acme", "usage"))]


def _sync(proxy: Proxy, key: str) -> tuple[Any, str, int]:
    client = AnthropicVertex(
        region=LOCATION, project_id="client-project", access_token=key, base_url=proxy.url
    )
    message = client.messages.create(model="claude-sonnet-4-5", max_tokens=9, messages=MESSAGES)
    with client.messages.stream(
        model="claude-sonnet-4-5", max_tokens=9, messages=MESSAGES
    ) as stream:
        text = "".join(stream.text_stream)
    counted = client.messages.count_tokens(model="claude-sonnet-4-5", messages=MESSAGES)
    return message, text, counted.input_tokens


@pytest.mark.parametrize("base", ["", "/v1"])
async def test_anthropic_vertex_buffered_and_streamed_with_books_exact(
    vp: Proxy, store: aioredis.Redis, base: str
) -> None:
    _, key = await vp.create_key("acme")
    message, text, counted = await asyncio.to_thread(_sync, vp, key)
    assert message.usage.output_tokens == 9 and text == message.content[0].text
    assert counted == 3 + 4 + 4
    client = AsyncAnthropicVertex(
        region=LOCATION, project_id="p", access_token=key, base_url=vp.url + base
    )
    again = await client.messages.create(model="claude-sonnet-4-5", max_tokens=4, messages=MESSAGES)
    assert again.usage.output_tokens == 4
    rows = await records(store, 4)
    assert [r["endpoint"] for r in rows] == [
        "messages",
        "messages",
        "messages/count_tokens",
        "messages",
    ]
    assert sum(r["cost_nano"] for r in rows) == reported_cost(vp.mock.app[REPORTED])
    sent = [r for r in vp.received() if not r.path.startswith("/token")]
    claude = f"/v1/projects/{PROJECT}/locations/{LOCATION}/publishers/anthropic/models"
    assert [r.path for r in sent] == [
        f"{claude}/claude-sonnet-4-5:rawPredict",
        f"{claude}/claude-sonnet-4-5:streamRawPredict",
        f"{claude}/count-tokens:rawPredict",
        f"{claude}/claude-sonnet-4-5:rawPredict",
    ]
    for r in sent:
        assert r.body is not None and r.body["anthropic_version"] == "vertex-2023-10-16"
        assert key not in json.dumps(r.headers)
    assert vp.mock.app[GOOGLE].issued == 1


async def test_the_token_is_refreshed_before_it_expires_not_per_request(
    start_proxy: Callable[..., Any],
    mock_upstream: TestServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEST_GEMINI_KEY", "x")
    # Tokens that live 400 s: inside the refresh margin (300 s) only after 100 s, so the test
    # moves the margin instead of waiting.
    proxy = await start(start_proxy, mock_upstream, tmp_path, "/token/ttl/400")
    _, key = await proxy.create_key("acme")
    client = genai.Client(api_key=key, http_options=types.HttpOptions(base_url=proxy.url))
    for _ in range(3):
        await client.aio.models.generate_content(model="gemini-2.5-pro", contents="hi")
    google = mock_upstream.app[GOOGLE]
    assert google.issued == 1
    monkeypatch.setattr(vertex_auth, "REFRESH_MARGIN", 10_000.0)  # now within the margin
    await client.aio.models.generate_content(model="gemini-2.5-pro", contents="hi")
    tokens = proxy.app[GATEWAY].upstream.tokens

    async def refreshed() -> bool:
        return tokens.refreshes("vertex") == 2

    await eventually(refreshed, what="background refresh")
    assert google.issued == 2  # the request went out with the old token; the new one follows
    monkeypatch.setattr(vertex_auth, "REFRESH_MARGIN", 300.0)
    await client.aio.models.generate_content(model="gemini-2.5-pro", contents="hi")
    assert google.issued == 2
    sent = [r.headers["authorization"] for r in proxy.received() if not r.path.startswith("/token")]
    assert sent == ["Bearer ya29.mock-1"] * 4 + ["Bearer ya29.mock-2"]


async def test_a_credentials_failure_is_a_502_in_googles_shape(
    start_proxy: Callable[..., Any],
    mock_upstream: TestServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEST_GEMINI_KEY", "x")
    proxy = await start(start_proxy, mock_upstream, tmp_path, "/no-such-token-endpoint")
    _, key = await proxy.create_key("acme")
    async with proxy.session.post(
        f"{proxy.url}/v1beta/models/gemini-2.5-pro:generateContent",
        json={"contents": [{"parts": [{"text": "hi"}]}]},
        headers={"x-goog-api-key": key},
    ) as response:
        body = await response.json()
    assert response.status == 502 and body["error"]["status"] == "UNAVAILABLE"
    assert "could not be authenticated" in body["error"]["message"]


async def test_a_model_falls_back_from_the_gemini_api_to_vertex(
    start_proxy: Callable[..., Any],
    mock_upstream: TestServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    store: aioredis.Redis,
) -> None:
    monkeypatch.setenv("TEST_GEMINI_KEY", "x")
    root = str(mock_upstream.make_url("")).rstrip("/")
    credentials = service_account_file(tmp_path, f"{root}/token")
    both = models()[:1]
    both[0] = ModelConfig.model_validate({**both[0].model_dump(), "upstream": ["gemini", "vertex"]})
    proxy: Proxy = await start_proxy(
        upstreams=upstreams(root, credentials),
        models=both,
    )
    _, key = await proxy.create_key("acme")
    client = genai.Client(
        api_key=key,
        http_options=types.HttpOptions(base_url=proxy.url, headers={"x-mock-status": "503"}),
    )
    with pytest.raises(genai.errors.ServerError):  # both answer 503: the last one's answer
        await client.aio.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert [
        r.path.rsplit("/", 1)[-1] for r in proxy.received() if not r.path.startswith("/token")
    ] == ["gemini-2.5-flash:generateContent"] * 2
    [row] = await records(store, 1)
    assert row["upstream"] == "vertex" and row["cost_nano"] == 0


async def test_application_default_credentials_when_no_file_is_named(
    start_proxy: Callable[..., Any],
    mock_upstream: TestServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEST_GEMINI_KEY", "x")
    root = str(mock_upstream.make_url("")).rstrip("/")
    credentials = service_account_file(tmp_path, f"{root}/token")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(credentials))
    adc = [
        UpstreamConfig.model_validate({**u.model_dump(), "credentials_file": None})
        for u in upstreams(root, credentials)
    ]
    proxy: Proxy = await start_proxy(upstreams=adc, models=models())
    _, key = await proxy.create_key("acme")
    client = genai.Client(api_key=key, http_options=types.HttpOptions(base_url=proxy.url))
    answer = await client.aio.models.generate_content(model="gemini-2.5-pro", contents="hi")
    assert answer.text and mock_upstream.app[GOOGLE].issued == 1


def test_the_configuration_checks_google_upstreams() -> None:
    vertex = {"name": "v", "kind": "vertex", "base_url": "https://x"}
    with pytest.raises(ValueError, match="needs project"):
        UpstreamConfig.model_validate(vertex)
    claude = UpstreamConfig.model_validate({**vertex, "project": "p", "publisher": "anthropic"})
    gemini = UpstreamConfig.model_validate({**vertex, "name": "g", "project": "p"})
    assert (claude.dialect, claude.price_provider_id) == ("anthropic", "anthropic")
    assert (gemini.dialect, gemini.price_provider_id) == ("gemini", "google")
    api = {"name": "a", "kind": "gemini", "base_url": "https://y/v1beta"}
    Settings.model_validate(
        {"upstreams": [gemini, api], "models": [{"name": "m", "upstream": ["g", "a"]}]}
    )
    with pytest.raises(ValueError, match="one API"):
        Settings.model_validate(
            {"upstreams": [claude, api], "models": [{"name": "m", "upstream": ["v", "a"]}]}
        )
