"""Exactly N of N+4 concurrent ``google-genai`` requests admitted by a budget that leaves room
for N worst cases, over two ``llm-proxy serve`` processes: no overshoot, no under-admission,
and every refusal a ``ClientError`` 429 naming the budget."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from conftest import ADMIN_KEY, budget, proxy_processes, write_config
from google import genai
from google.genai import errors, types

from proxy.dialects.gemini_bound import prompt_bound
from proxy.ledger.keys import ORG_TAG, org_key
from proxy.tools.mock import RECEIVED

N = 6
MAX_OUT = 40
GEMINI_TAIL = """
[[upstreams]]
name = "gemini"
kind = "gemini"
base_url = "{root}/v1beta"
api_key_env = "TEST_GEMINI_KEY"
forward_headers = ["x-mock-*"]

[[models]]
name = "gemini-2.5-flash"
upstream = "gemini"
[models.price]
input = 0.3
output = 2.5
"""


@pytest.fixture
async def two(
    tmp_path: Path, redis_url: str, mock_upstream: TestServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[list[str]]:
    monkeypatch.setenv("TEST_GEMINI_KEY", "gemini-upstream-secret")
    root = str(mock_upstream.make_url("")).rstrip("/")
    config = write_config(
        tmp_path / "proxy.toml", f"{root}/v1", redis_url, tail=GEMINI_TAIL.format(root=root)
    )
    async with proxy_processes(config) as urls:
        yield urls


async def admin(session: aiohttp.ClientSession, url: str, method: str, path: str, body: Any) -> Any:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with session.request(method, url + path, json=body, headers=headers) as response:
        answer = await response.json()
        assert response.status in (200, 201), answer
        return answer


def client(url: str, key: str) -> genai.Client:
    headers = {"x-mock-output-tokens": str(MAX_OUT), "x-mock-latency-ms": "300"}
    return genai.Client(api_key=key, http_options=types.HttpOptions(base_url=url, headers=headers))


async def generate(c: genai.Client) -> Any:
    config = types.GenerateContentConfig(max_output_tokens=MAX_OUT)
    try:
        return await c.aio.models.generate_content(
            model="gemini-2.5-flash", contents="hello there general kenobi", config=config
        )
    except errors.ClientError as exc:
        return exc


@pytest.mark.slow
async def test_exactly_n_of_n_plus_4_admitted_over_two_processes(
    two: list[str], mock_upstream: TestServer, store: aioredis.Redis
) -> None:
    async with aiohttp.ClientSession() as session:
        calibration = await admin(session, two[0], "POST", "/api/v1/keys", {"org_id": "cal"})
        first = await generate(client(two[0], calibration["key"]))
        assert not isinstance(first, Exception), first
        sent = mock_upstream.app[RECEIVED][-1].body
        assert sent is not None
        reserve = prompt_bound(sent, 1_000_000) + MAX_OUT
        used = first.usage_metadata.total_token_count
        # Room for exactly N worst cases: all N+4 are admitted before any settles (the mock
        # answers after 300 ms), so the (N+1)-th never fits, whichever process it reaches.
        line = N * reserve
        keys = [
            await admin(session, url, "POST", "/api/v1/keys", {"org_id": "burst"}) for url in two
        ]
        spec = budget(period="monthly", limit=line)
        await admin(session, two[1], "PUT", "/api/v1/llm/budgets/org/burst", spec)
    clients = [client(two[i % 2], keys[i % 2]["key"]) for i in range(N + 4)]
    results = await asyncio.gather(*(generate(c) for c in clients))
    refused = [r for r in results if isinstance(r, errors.ClientError)]
    assert len(refused) == 4 and len(results) - len(refused) == N
    for exc in refused:
        assert (exc.code, exc.status) == (429, "RESOURCE_EXHAUSTED")
        assert "budget" in (exc.message or "").lower()
        assert "burst" in json.dumps(exc.details)
    assert await store.xlen(org_key("burst", "usage")) == N
    spend = {}
    async for name in store.scan_iter(org_key("burst", "spend", ORG_TAG, "*")):
        if name.count("-") == 1 and "W" not in name:
            spend = await store.hgetall(name)
    assert int(spend["t"]) == N * used <= line
    assert await store.zcard(org_key("burst", "leases")) == 0
