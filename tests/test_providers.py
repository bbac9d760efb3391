"""Every provider configuration the docs show, loaded from the docs page itself and driven
through the proxy against the mock (its base URL swapped for the mock's): the path the proxy
calls, the credential it sends, the model name, and where the price came from."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import pytest
from aiohttp.test_utils import TestServer
from conftest import Proxy

from proxy.catalog.routes import build_routes
from proxy.config import ModelConfig, Settings, UpstreamConfig
from proxy.gateway.state import GATEWAY

PAGE = Path(__file__).resolve().parent.parent / "docs" / "providers.md"
MESSAGES: list[Any] = [{"role": "user", "content": "hello there"}]


def provider_blocks(google: bool = False) -> dict[str, dict[str, Any]]:
    """The providers page's configurations, by upstream name: those whose clients speak
    OpenAI's or Anthropic's API directly, or (``google``) the Gemini and Vertex AI ones,
    driven with Google's SDK in ``test_google_docs.py``."""
    section = PAGE.read_text().split("\n## Fallbacks\n", 1)[0]
    blocks = [tomllib.loads(b) for b in re.findall(r"```toml\n(.*?)```", section, re.S)]
    return {
        block["upstreams"][0]["name"]: block
        for block in blocks
        if (block["upstreams"][0].get("kind") in ("gemini", "vertex")) == google
    }


BLOCKS = provider_blocks()
# What each block must make the proxy do: (path called, credential header, model sent, price).
EXPECTED = {
    "openai": ("/v1/chat/completions", ("authorization", "Bearer "), "gpt-4o-mini", "genai"),
    "anthropic": ("/v1/messages", ("x-api-key", ""), "claude-sonnet-4-5", "genai"),
    "azure": (
        "/openai/deployments/gpt4o-prod/chat/completions",
        ("api-key", ""),
        "gpt4o-prod",
        "genai",
    ),
    "gemini": ("/v1/chat/completions", ("authorization", "Bearer "), "gemini-2.5-flash", "genai"),
    "groq": (
        "/v1/chat/completions",
        ("authorization", "Bearer "),
        "llama-3.3-70b-versatile",
        "genai",
    ),
    "vllm": ("/v1/chat/completions", None, "meta-llama/Llama-3.1-8B-Instruct", "config"),
}


def test_the_docs_show_a_block_for_every_provider() -> None:
    # Bedrock's block is driven by its own clients in tests/test_bedrock.py.
    assert set(BLOCKS) == set(EXPECTED) | {"bedrock"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_each_documented_provider_config_works_against_the_mock(
    name: str,
    start_proxy: Callable[..., Any],
    mock_upstream: TestServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    block = BLOCKS[name]
    root = str(mock_upstream.make_url("")).rstrip("/")
    upstreams = []
    for raw in block["upstreams"]:
        if raw.get("api_key_env"):
            monkeypatch.setenv(raw["api_key_env"], f"secret-for-{name}")
        kind = raw.get("kind", "openai")
        base = root if kind in ("anthropic", "azure") else root + "/v1"
        upstreams.append(UpstreamConfig.model_validate({**raw, "base_url": base}))
    models = [ModelConfig.model_validate(m) for m in block["models"]]
    proxy: Proxy = await start_proxy(upstreams=upstreams, models=models)
    _, key = await proxy.create_key("acme")
    path, credential, sent_model, source = EXPECTED[name]
    public = models[0].name if not models[0].is_pattern else "claude-sonnet-4-5"
    if upstreams[0].kind == "anthropic":
        client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=key, max_retries=0)
        answer = await client.messages.create(model=public, max_tokens=5, messages=MESSAGES)
        await client.close()
        assert answer.usage.output_tokens == 5
    else:
        completion = await proxy.openai(key).chat.completions.create(
            model=public, messages=MESSAGES, max_tokens=5
        )
        assert completion.usage is not None and completion.usage.completion_tokens == 5
    sent = proxy.received()[-1]
    assert sent.path == path
    assert sent.body is not None and sent.body["model"] == sent_model
    if credential is None:
        assert not {"authorization", "api-key", "x-api-key"} & set(sent.headers)
    else:
        header, prefix = credential
        assert sent.headers[header] == f"{prefix}secret-for-{name}"
        assert key not in str(sent.headers)
    route = proxy.app[GATEWAY].routes[public]
    assert route.price.source == ("config" if source == "config" else "genai-prices")
    assert route.price.input_nano_per_m > 0 and route.price.output_nano_per_m > 0


def test_the_documented_fallback_example_is_valid_over_the_openai_and_azure_blocks() -> None:
    section = PAGE.read_text().split("\n## Fallbacks\n", 1)[1].split("\n## ", 1)[0]
    [block] = [tomllib.loads(b) for b in re.findall(r"```toml\n(.*?)```", section, re.S)]
    upstreams = BLOCKS["openai"]["upstreams"] + BLOCKS["azure"]["upstreams"]
    settings = Settings.model_validate({"upstreams": upstreams, "models": block["models"]})
    route = build_routes(settings)["gpt-4o"]
    assert [(c.upstream.name, c.model) for c in route.upstreams] == [
        ("openai", "gpt-4o"),
        ("azure", "gpt4o-prod"),
    ]


async def test_azure_v1_routes_carry_the_deployment_as_the_model(
    start_proxy: Callable[..., Any], mock_upstream: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "azure-secret")
    root = str(mock_upstream.make_url("")).rstrip("/")
    proxy: Proxy = await start_proxy(
        upstreams=[
            UpstreamConfig(
                name="azure",
                base_url=root,
                api_key_env="AZURE_OPENAI_API_KEY",
                kind="azure",
                forward_headers=["x-mock-*"],
            )
        ],
        models=[
            ModelConfig(name="gpt-4o", upstream="azure", deployment="gpt4o-prod"),
            ModelConfig(
                name="text-embedding-3-small",
                upstream="azure",
                deployment="embed-prod",
                encoding="cl100k_base",
                kind="embedding",
            ),
        ],
    )
    _, key = await proxy.create_key("acme")
    client = proxy.openai(key)
    await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=5)
    sent = proxy.received()[-1]
    assert (sent.path, sent.query) == ("/openai/v1/chat/completions", {})
    assert sent.body is not None and sent.body["model"] == "gpt4o-prod"
    assert sent.headers["api-key"] == "azure-secret"
    await client.embeddings.create(model="text-embedding-3-small", input="a b c")
    assert proxy.received()[-1].path == "/openai/v1/embeddings"
