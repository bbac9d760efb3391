"""Redis going away mid-run: requests are refused with 503 (never passed through unmetered),
/readyz reports it, and everything recovers when Redis is back, without restarting the proxy."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from conftest import ADMIN_KEY, eventually, make_settings
from helpers import user_messages

from proxy.app import create_app
from proxy.ledger.windows import windows_at
from proxy.store.embedded_redis import EmbeddedRedis
from proxy.tools.mock import RECEIVED

pytestmark = [pytest.mark.slow, pytest.mark.redis]  # a Redis of their own, crashed and restarted

MESSAGES = user_messages("are you there")
CHAT = {"model": "gpt-4o", "messages": MESSAGES}


@dataclass
class Outage:
    redis: EmbeddedRedis
    url: str
    mock: TestServer
    session: aiohttp.ClientSession

    async def post(self, path: str, key: str, body: Any, **headers: str) -> tuple[int, Any]:
        async with self.session.post(
            self.url + path, json=body, headers={"Authorization": f"Bearer {key}", **headers}
        ) as response:
            return response.status, await response.json(content_type=None)

    async def get(self, path: str, key: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with self.session.get(self.url + path, headers=headers) as response:
            return response.status, await response.json(content_type=None)

    async def create_key(self) -> tuple[str, str]:
        status, body = await self.post("/api/v1/keys", ADMIN_KEY, {"org_id": "acme"})
        assert status == 201, body
        return body["id"], body["key"]

    async def crash_redis(self) -> None:
        await asyncio.to_thread(self.redis.kill)

    async def restart_redis(self) -> None:
        await self.redis.astart()
        async with aioredis.Redis.from_url(self.redis.url) as client:
            await client.config_set("appendfsync", "always")


@pytest.fixture
async def outage(
    tmp_path: Path, mock_upstream: TestServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Outage]:
    """A proxy on its own Redis, which the test may crash and bring back on the same port.

    Redis persists every write (appendfsync always), so a crash loses nothing already
    acknowledged, as with a production Redis that has persistence."""
    monkeypatch.setenv("TEST_PROXY_ADMIN_KEY", ADMIN_KEY)
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-upstream-secret")
    server = EmbeddedRedis(tmp_path / "redis", persist=True)
    await server.astart()
    async with aioredis.Redis.from_url(server.url) as client:
        await client.config_set("appendfsync", "always")
    app = create_app(make_settings(str(mock_upstream.make_url("/v1"))), server.url)
    proxy = TestServer(app, host="127.0.0.1")
    await proxy.start_server()
    session = aiohttp.ClientSession()
    try:
        yield Outage(server, str(proxy.make_url("")).rstrip("/"), mock_upstream, session)
    finally:
        await session.close()
        await proxy.close()
        await server.astop()


async def key_spend(url: str, kid: str) -> tuple[int, int]:
    """(cost nano, tokens) in the key's daily window."""
    async with aioredis.Redis.from_url(url, decode_responses=True) as client:
        data = await client.hgetall(f"bp:{{o:acme}}:spend:k:{kid}:{windows_at(time.time()).daily}")
        leases = await client.zcard("bp:{o:acme}:leases")
    assert leases == 0, "a lease was left behind"
    return int(data.get("c", 0)), int(data.get("t", 0))


async def test_redis_down_is_503_then_recovers_without_restart(outage: Outage) -> None:
    kid, key = await outage.create_key()
    client = openai.AsyncOpenAI(base_url=outage.url + "/v1", api_key=key, max_retries=0)
    try:
        first = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert first.usage is not None
        assert (await outage.get("/readyz"))[0] == 200
        forwarded = len(outage.mock.app[RECEIVED])

        await outage.crash_redis()

        status, body = await outage.post("/v1/chat/completions", key, CHAT)
        assert status == 503
        assert body == {
            "error": {
                "message": body["error"]["message"],
                "type": "server_error",
                "code": "store_unavailable",
                "param": None,
            }
        }
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert caught.value.status_code == 503
        # Refused, not passed through unmetered: the upstream saw nothing.
        assert len(outage.mock.app[RECEIVED]) == forwarded
        # Admin calls and readiness say so too; liveness does not.
        status, body = await outage.get("/api/v1/keys", ADMIN_KEY)
        assert (status, body["error"]["code"]) == (503, "store_unavailable")
        status, ready = await outage.get("/readyz")
        assert (status, ready["status"]) == (503, "unavailable")
        assert (await outage.get("/healthz"))[0] == 200

        await outage.restart_redis()

        async def ready() -> bool:
            return (await outage.get("/readyz"))[0] == 200

        await eventually(ready, within=10, what="/readyz back to 200")
        second = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert second.usage is not None
        # Only the two answered requests were charged; the refused ones cost nothing.
        _, tokens = await key_spend(outage.redis.url, kid)
        assert tokens == first.usage.total_tokens + second.usage.total_tokens
    finally:
        await client.close()


async def test_settle_deferred_by_a_crash_lands_after_recovery(outage: Outage) -> None:
    """A stream admitted before the crash is charged once Redis is back (no lost spend)."""
    kid, key = await outage.create_key()
    client = openai.AsyncOpenAI(base_url=outage.url + "/v1", api_key=key, max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-mock-output-tokens": "30", "x-mock-chunk-delay-ms": "10"},
        )
        usage = None
        crashed = False
        async for chunk in stream:
            if not crashed:
                await outage.crash_redis()  # mid-stream: the answer keeps flowing
                crashed = True
            if chunk.usage is not None:
                usage = chunk.usage
        assert usage is not None and usage.completion_tokens == 30
        await outage.restart_redis()

        async def charged() -> bool:
            try:
                return (await key_spend(outage.redis.url, kid))[1] > 0
            except AssertionError:
                return False

        await eventually(charged, within=10, what="the deferred settle")
        _, tokens = await key_spend(outage.redis.url, kid)
        assert tokens == usage.total_tokens
    finally:
        await client.close()


async def test_a_503_while_redis_is_down_is_recorded_as_store_unavailable(
    outage: Outage, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 11 item 9: when the key lookup itself failed, the request was logged (and
    counted) as decision ``auth``, as if the key had been wrong."""
    caplog.set_level(logging.INFO, logger="llm_proxy.access")
    _, key = await outage.create_key()  # never used: not in any authentication cache
    await outage.crash_redis()
    status, body = await outage.post("/v1/chat/completions", key, CHAT, **{"x-request-id": "r-1"})
    assert (status, body["error"]["code"]) == (503, "store_unavailable")
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "llm_proxy.access"]
    [line] = [line for line in lines if line["request_id"] == "r-1"]
    assert (line["status"], line["decision"]) == (503, "store_unavailable")


async def test_no_call_fails_on_a_stale_connection_once_redis_is_back(outage: Outage) -> None:
    """Issue #12 item 4: right after Redis came back, a few calls got 503 "Connection closed by
    server" from connections opened to the old server. A connection found dead before its
    reply is replaced transparently: once Redis answers again, every call succeeds."""
    kid, key = await outage.create_key()
    # Concurrent calls leave several connections open in the pool and on the hot path.
    warm = await asyncio.gather(
        *(outage.post("/v1/chat/completions", key, CHAT) for _ in range(20)),
        *(outage.get("/api/v1/keys", ADMIN_KEY) for _ in range(10)),
    )
    assert {status for status, _ in warm} == {200}

    await asyncio.to_thread(outage.redis.restart)
    async with aioredis.Redis.from_url(outage.redis.url) as client:
        assert await client.ping()

    statuses = []
    for n in range(40):
        if n % 4 == 3:
            status, _ = await outage.get("/api/v1/keys", ADMIN_KEY)
        else:
            status, _ = await outage.post("/v1/chat/completions", key, CHAT)
        statuses.append(status)
    assert statuses == [200] * 40
    _, tokens = await key_spend(outage.redis.url, kid)
    assert tokens > 0
