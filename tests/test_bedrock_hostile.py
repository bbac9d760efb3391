"""Hostile input on the Bedrock routes: seeded malformed model ids, bodies, caps (huge
``maxTokens`` included), credentials and upstream answers (error statuses, streams cut off or
with corrupt event-stream frames), sent raw. No 500 the mock was not told to send, every error
in Bedrock's shape, no key echoed, nothing charged for a refusal or an upstream error, spend
equal to the usage records, no lease left. And the event-stream reader over random bytes and
mutated frames: it never raises, and a meter's bound never exceeds the cap."""

from __future__ import annotations

import json
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from bedrock_support import CLAUDE, LLAMA, Tls, aws_env, make_tls, start_tls_proxy
from conftest import Proxy, eventually, usage_record
from yarl import URL

from proxy.dialects import eventstream
from proxy.dialects.bedrock_usage import StreamMeter

SEED = int(os.environ.get("HOSTILE_SEED", "26"))
COUNT = int(os.environ.get("BEDROCK_HOSTILE_REQUESTS", "300"))
P = "bp:{o:acme}:"
ACTIONS = ("converse", "converse-stream", "invoke", "invoke-with-response-stream")
IDS = (
    CLAUDE,
    CLAUDE,
    CLAUDE,
    CLAUDE,
    LLAMA,
    LLAMA,
    "eu.anthropic.claude-haiku-4-5-20251001-v1:0",
    "arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2F" + CLAUDE,
    "amazon.unknown-v1:0",
    "",
    "%00",
    "a" * 3000,
    "..%2F..%2Fetc",
    "model%20with%20spaces",
    "%F0%9F%94%91",
    "anthropic.claude-*",
)
JUNK: tuple[object, ...] = (
    0, -3, 1.5, "12", True, None, [], {"n": 1}, 10**6, 10**13, 2**53 + 1, 10**400,
)  # fmt: skip


def _body(rng: random.Random, action: str) -> bytes:
    roll = rng.random()
    if roll < 0.05:
        return rng.choice((b"", b"{", b"[]", b"null", b'"x"', b"\xff\xfe", b'{"messages": ['))
    text = rng.choice(("hello there", "", "数据 🔑 naïve", "x " * 200))
    if action.startswith("converse"):
        body: dict[str, Any] = {"messages": [{"role": "user", "content": [{"text": text}]}]}
        if rng.random() < 0.5:
            body["inferenceConfig"] = {"maxTokens": rng.choice((*JUNK, 5, 20))}
        if rng.random() < 0.1:
            image = {"image": {"format": "png", "source": {"bytes": "iVBORw0KGgo="}}}
            body["messages"][0]["content"].append(rng.choice((image, {"document": {}}, 7)))
        if rng.random() < 0.15:
            body["messages"] = rng.choice(JUNK)
        if rng.random() < 0.1:
            body["system"] = rng.choice(([{"text": text}], "sys", [1], {"a": 1}))
        if rng.random() < 0.1:
            body["toolConfig"] = {"tools": [{"toolSpec": {"name": "t", "inputSchema": {}}}]}
        if rng.random() < 0.1:
            body["inferenceConfig"] = rng.choice(JUNK)
    elif rng.random() < 0.6:
        body = {
            "anthropic_version": "bedrock-2023-05-31",
            "max_tokens": rng.choice((*JUNK, 4, 9)),
            "messages": [{"role": "user", "content": text}],
        }
    else:
        body = {"prompt": text, "max_gen_len": rng.choice((*JUNK, 3))}
    try:
        return json.dumps(body).encode()
    except ValueError:
        return b'{"messages": 1e999}'


def _headers(rng: random.Random, key: str) -> dict[str, str]:
    roll = rng.random()
    if roll < 0.05:
        auth = {}
    elif roll < 0.1:
        auth = {"Authorization": "Bearer sk-bp-not-a-key"}
    elif roll < 0.15:
        auth = {"Authorization": "AWS4-HMAC-SHA256 Credential=AKID/20260101/us-east-1/bedrock"}
    else:
        auth = {"Authorization": f"Bearer {key}"}
    headers = {**auth, "Content-Type": "application/json"}
    if rng.random() < 0.1:
        headers["x-mock-status"] = str(rng.choice((400, 403, 429, 500, 503)))
    if rng.random() < 0.1:
        headers["x-mock-fail-after-chunks"] = str(rng.randint(0, 3))
    if rng.random() < 0.1:
        headers["x-mock-corrupt-stream"] = "1"
    if rng.random() < 0.3:
        headers["x-mock-output-tokens"] = str(rng.randint(0, 30))
    return headers


@pytest.fixture
async def proxy(
    redis_url: str, mock_upstream: TestServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AsyncIterator[tuple[Proxy, Tls]]:
    monkeypatch.setenv("TEST_PROXY_ADMIN_KEY", "sk-test-admin-0123456789")
    aws_env(monkeypatch, tmp_path)
    tls = make_tls(tmp_path)
    async for running in start_tls_proxy(redis_url, mock_upstream, tls):
        yield running, tls


async def test_hostile_requests_on_the_bedrock_routes(
    proxy: tuple[Proxy, Tls], store: aioredis.Redis
) -> None:
    running, _tls = proxy
    _, key = await running.create_key("acme")
    rng = random.Random(SEED)
    statuses: dict[int, int] = {}
    for index in range(COUNT):
        action = rng.choice((*ACTIONS, "converse-typo"))
        prefix = rng.choice(("", "/api/v1/llm/bedrock"))
        path = f"{prefix}/model/{rng.choice(IDS)}/{action}"
        headers = _headers(rng, key)
        body = _body(rng, action)
        url = URL(running.url + path, encoded=True)
        async with running.session.post(url, data=body, headers=headers) as response:
            data = await response.read()
            status = response.status
            where = f"seed {SEED} #{index}: POST {path} {body[:200]!r} {headers} -> {status}"
            statuses[status] = statuses.get(status, 0) + 1
            assert status != 500 or headers.get("x-mock-status") == "500", where
            assert key.encode() not in data + json.dumps(dict(response.headers)).encode(), where
            if status >= 400:
                assert response.headers.get("x-amzn-ErrorType"), where
                error = json.loads(data)
                assert isinstance(error, dict) and isinstance(error.get("message"), str), where
    assert statuses.get(200, 0) > COUNT // 20, statuses  # the upstream path is exercised

    async def settled() -> bool:
        return not await store.zcard(P + "leases")

    await eventually(settled, what="no lease left")
    records = [usage_record(f) for _, f in await store.xrange(P + "usage")]
    for record in records:
        if record["status"] != 200:
            assert record["cost_nano"] == 0, record
    spent = 0
    async for name in store.scan_iter(P + "spend:o:????-??-??"):
        spent += int((await store.hgetall(name)).get("c", 0))
    assert spent == sum(r["cost_nano"] for r in records)


def test_the_frame_reader_and_the_meter_survive_any_bytes() -> None:
    rng = random.Random(SEED)
    valid = b"".join(
        eventstream.event(kind, json.dumps(payload).encode())
        for kind, payload in (
            ("messageStart", {"role": "assistant"}),
            ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": " hello"}}),
            ("metadata", {"usage": {"inputTokens": 3, "outputTokens": 1}}),
            ("chunk", {"bytes": "eyJ0eXBlIjoibWVzc2FnZV9zdG9wIn0="}),
        )
    )
    for _ in range(2000):
        data = bytearray(valid if rng.random() < 0.7 else rng.randbytes(rng.randint(0, 200)))
        for _ in range(rng.randint(0, 4)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        cut = rng.randint(0, len(data))
        meter = StreamMeter(prompt_tokens=50, output_cap=10)
        whole, rest = eventstream.split(bytes(data[:cut]))
        meter.relay(whole)
        meter.relay(rest + bytes(data[cut:]))
        usage = meter.usage()
        assert usage.output_tokens <= 10 or usage.reported
        assert usage.input_tokens <= 50 or usage.reported


