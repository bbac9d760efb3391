"""SDK corners (issue 23, item 4): every route takes the key in any header a dialect takes it
in, and ``GET /v1/models`` lists Claude models and patterns by their concrete names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import pytest
from aiohttp.test_utils import TestServer
from conftest import Proxy
from helpers import user_messages
from test_anthropic_api import claude_sections, root


@pytest.fixture
async def claude(start_proxy: Callable[..., Any], mock_upstream: TestServer) -> Proxy:
    proxy: Proxy = await start_proxy(**claude_sections(root(mock_upstream)))
    return proxy


async def _get(proxy: Proxy, path: str, headers: dict[str, str]) -> tuple[int, Any]:
    async with proxy.session.get(proxy.url + path, headers=headers) as response:
        return response.status, await response.json()


async def test_models_takes_x_api_key_and_lists_claude_and_pattern_models(claude: Proxy) -> None:
    _, key = await claude.create_key("acme")
    status, listing = await _get(claude, "/v1/models", {"x-api-key": key})
    assert status == 200, listing
    ids = [card["id"] for card in listing["data"]]
    assert {"gpt-4o", "claude-test"} <= set(ids)
    # claude-* by the concrete names the price database knows, not as a pattern.
    assert "claude-sonnet-4-5" in ids and "claude-haiku-4-5" in ids
    assert "claude-*" not in ids
    assert len(ids) == len(set(ids))
    status, _ = await _get(claude, "/v1/models", {})
    assert status == 401
    status, model = await _get(claude, "/v1/models/claude-sonnet-4-5", {"x-api-key": key})
    assert (status, model["id"]) == (200, "claude-sonnet-4-5")


async def test_the_anthropic_sdk_lists_models_in_its_own_shape(claude: Proxy) -> None:
    _, key = await claude.create_key("acme")
    async with anthropic.AsyncAnthropic(base_url=claude.url, api_key=key, max_retries=0) as sdk:
        ids = [model.id async for model in sdk.models.list()]
    assert "claude-test" in ids and "claude-sonnet-4-5" in ids
    _, listing = await _get(
        claude, "/v1/models", {"x-api-key": key, "anthropic-version": "2023-06-01"}
    )
    assert listing["has_more"] is False and listing["data"][0]["type"] == "model"


async def test_a_key_allowed_the_pattern_sees_its_concrete_names(claude: Proxy) -> None:
    _, key = await claude.create_key("acme", models=["claude-*"])
    _, listing = await _get(claude, "/v1/models", {"Authorization": f"Bearer {key}"})
    ids = [card["id"] for card in listing["data"]]
    assert "claude-sonnet-4-5" in ids and "gpt-4o" not in ids


async def test_openai_routes_take_x_api_key_too(claude: Proxy) -> None:
    _, key = await claude.create_key("acme")
    body = {"model": "gpt-4o", "messages": user_messages("hi")}
    async with claude.session.post(
        claude.url + "/v1/chat/completions", json=body, headers={"x-api-key": key}
    ) as response:
        assert response.status == 200, await response.text()
    async with claude.session.post(claude.url + "/v1/chat/completions", json=body) as response:
        refused = await response.json()
        assert response.status == 401
    assert "x-api-key" in refused["error"]["message"]
