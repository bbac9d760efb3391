"""The providers page's Gemini API and Vertex AI configurations, loaded from the page and
driven through the proxy to the mock (base URLs swapped for the mock's, the credentials file
for one whose ``token_uri`` is the mock's): Google's SDK for Gemini models, Anthropic's (and
``AnthropicVertex``) for Claude on Vertex."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import pytest
from aiohttp.test_utils import TestServer
from conftest import Proxy
from google import genai
from google.genai import types
from google_setup import service_account_file
from test_providers import provider_blocks

from proxy.config import ModelConfig, UpstreamConfig
from proxy.gateway.state import GATEWAY

BLOCKS = provider_blocks(google=True)
# (model asked for, path the mock sees, credential header and its start, price source)
EXPECTED = {
    "gemini-api": (
        "gemini-2.5-flash",
        "/v1beta/models/gemini-2.5-flash:generateContent",
        ("x-goog-api-key", "secret-for-gemini-api"),
    ),
    "vertex": (
        "gemini-2.5-pro",
        "/v1/projects/my-project/locations/us-central1/publishers/google/models/"
        "gemini-2.5-pro:generateContent",
        ("authorization", "Bearer ya29.mock-"),
    ),
    "vertex-claude": (
        "claude-sonnet-4-5",
        "/v1/projects/my-project/locations/us-east5/publishers/anthropic/models/"
        "claude-sonnet-4-5@20250929:rawPredict",
        ("authorization", "Bearer ya29.mock-"),
    ),
}


def test_the_docs_show_a_block_for_each_google_kind() -> None:
    assert set(BLOCKS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_each_documented_google_config_works_against_the_mock(
    name: str,
    start_proxy: Callable[..., Any],
    mock_upstream: TestServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    block = BLOCKS[name]
    root = str(mock_upstream.make_url("")).rstrip("/")
    credentials = service_account_file(tmp_path, f"{root}/token")
    upstreams = []
    for raw in block["upstreams"]:
        if raw.get("api_key_env"):
            monkeypatch.setenv(raw["api_key_env"], f"secret-for-{name}")
        swapped = {**raw, "base_url": root + ("/v1beta" if raw["kind"] == "gemini" else "")}
        if "credentials_file" in raw:
            swapped["credentials_file"] = str(credentials)
        upstreams.append(UpstreamConfig.model_validate(swapped))
    models = [ModelConfig.model_validate(m) for m in block["models"]]
    proxy: Proxy = await start_proxy(upstreams=upstreams, models=models)
    _, key = await proxy.create_key("acme")
    model, path, (header, start) = EXPECTED[name]
    if upstreams[0].dialect == "anthropic":
        client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=key, max_retries=0)
        answer = await client.messages.create(
            model=model, max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.usage.output_tokens == 5
        vertex = anthropic.AnthropicVertex(
            region="us-east5", project_id="p", access_token=key, base_url=proxy.url
        )
        again = await asyncio.to_thread(
            lambda: vertex.messages.create(
                model=model, max_tokens=5, messages=[{"role": "user", "content": "hi"}]
            )
        )
        assert again.usage.output_tokens == 5
    else:
        google = genai.Client(api_key=key, http_options=types.HttpOptions(base_url=proxy.url))
        reply = await google.aio.models.generate_content(model=model, contents="hi")
        assert reply.usage_metadata is not None and reply.usage_metadata.candidates_token_count
    sent = [r for r in proxy.received() if not r.path.startswith("/token")][-1]
    assert sent.path == path
    assert sent.headers[header].startswith(start)
    assert key not in str(sent.headers)
    route = proxy.app[GATEWAY].routes[model]
    assert route.price.source == "genai-prices"
    assert route.price.input_nano_per_m > 0 and route.price.output_nano_per_m > 0
