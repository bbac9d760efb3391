"""AWS Bedrock through the proxy: boto3's ``bedrock-runtime`` client (the proxy key as its
Bedrock API key, over HTTPS with a throwaway CA) and ``anthropic``'s ``AnthropicBedrock``,
forwarded to the mock through a ``kind = "bedrock"`` upstream that signs with SigV4 (the mock
recomputes every signature from its test credentials). Books exact against the mock's usage."""

from __future__ import annotations

import asyncio
import json
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anthropic
import botocore.eventstream
import httpx2
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from bedrock_support import (
    CLAUDE,
    LLAMA,
    MESSAGES,
    Tls,
    aws_env,
    bedrock_upstream,
    client,
    expected_cost,
    make_tls,
    start_tls_proxy,
)
from botocore.exceptions import ClientError
from conftest import Proxy, budget, eventually, usage_record

from proxy.catalog.pricing import cost_nano
from proxy.config import ConfigError, ModelConfig, UpstreamConfig
from proxy.dialects import bedrock as bedrock_dialect
from proxy.dialects import bedrock_request, claude_bound, eventstream
from proxy.gateway.state import GATEWAY
from proxy.ledger.keys import org_prefix
from proxy.providers import bedrock as providers_bedrock
from proxy.tools.mock import RECEIVED, MockOptions, build_mock_app

P = org_prefix("acme")
CACHE = {"x-mock-cached-tokens": "2", "x-mock-cache-write-tokens": "3"}


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    return make_tls(tmp_path)


@pytest.fixture
async def bedrock(
    redis_url: str,
    mock_upstream: TestServer,
    tls: Tls,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Any]]:
    monkeypatch.setenv("TEST_PROXY_ADMIN_KEY", "sk-test-admin-0123456789")
    aws_env(monkeypatch, tmp_path)
    started: list[AsyncIterator[Proxy]] = []

    async def start(**sections: Any) -> Proxy:
        run = start_tls_proxy(redis_url, mock_upstream, tls, **sections)
        started.append(run)
        return await run.__anext__()

    yield start
    for run in started:
        with pytest.raises(StopAsyncIteration):
            await run.__anext__()


async def records(store: aioredis.Redis, count: int) -> list[dict[str, Any]]:
    async def settled() -> bool:
        return int(await store.xlen(P + "usage")) >= count

    await eventually(settled, what="settle")
    return [usage_record(fields) for _, fields in await store.xrange(P + "usage")]


def test_frames_round_trip_through_botocores_decoder() -> None:
    frames = eventstream.event("messageStart", b'{"role":"assistant"}') + eventstream.exception(
        "throttlingException", b'{"message":"slow down"}'
    )
    buffer = botocore.eventstream.EventStreamBuffer()
    buffer.add_data(frames)
    decoded = list(buffer)
    assert decoded[0].headers[":event-type"] == "messageStart"
    assert decoded[0].payload == b'{"role":"assistant"}'
    assert decoded[1].headers[":exception-type"] == "throttlingException"
    # Split anywhere: whole frames first, the rest held.
    for cut in range(len(frames)):
        whole, rest = eventstream.split(frames[:cut])
        assert whole + rest == frames[:cut] and len(eventstream.frames(whole)) in (0, 1, 2)
    # A corrupt prelude is never waited on; a corrupt frame is reported, not raised.
    garbage = struct.pack("!II", 10**9, 0) + b"\0" * 20
    assert eventstream.split(garbage) == (garbage, b"")
    bad = bytearray(frames)
    bad[30] ^= 1
    assert eventstream.frames(bytes(bad))[0] is None
    prelude = struct.pack("!II", 16, 0)
    assert eventstream.frames(prelude + struct.pack("!I", zlib.crc32(prelude))) == [None]


async def test_converse_is_signed_upstream_and_charged_exactly(
    bedrock: Callable[..., Any], store: aioredis.Redis, tls: Tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy: Proxy = await bedrock()
    _, key = await proxy.create_key("acme")
    runtime = client(proxy.url, tls, key, monkeypatch, mock=CACHE)
    answer = await asyncio.to_thread(runtime.converse, modelId=CLAUDE, messages=MESSAGES)
    usage = answer["usage"]
    assert usage["cacheReadInputTokens"] == 2 and usage["cacheWriteInputTokens"] == 3
    assert answer["output"]["message"]["content"][0]["text"].strip()
    [record] = await records(store, 1)
    assert record["cost_nano"] == expected_cost(usage) > 0
    assert record["endpoint"] == "converse" and record["model"] == CLAUDE
    sent = proxy.received()[-1]
    assert sent.path == f"/model/{CLAUDE}/converse"  # the id as boto3 percent-encodes it
    assert sent.headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDMOCK")
    assert key not in json.dumps(sent.headers)
    route = proxy.app[GATEWAY].routes[CLAUDE]
    # No maxTokens from the client: the cap reserved is the one the upstream is sent.
    assert sent.body is not None
    assert sent.body["inferenceConfig"]["maxTokens"] == route.max_output_tokens


async def test_converse_stream_is_relayed_as_event_stream_and_charged_exactly(
    bedrock: Callable[..., Any], store: aioredis.Redis, tls: Tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy: Proxy = await bedrock()
    _, key = await proxy.create_key("acme")
    runtime = client(proxy.url, tls, key, monkeypatch, mock=CACHE)

    def stream() -> tuple[str, dict[str, int]]:
        answer = runtime.converse_stream(
            modelId=CLAUDE, messages=MESSAGES, inferenceConfig={"maxTokens": 7}
        )
        text, usage = "", {}
        for event in answer["stream"]:
            if "contentBlockDelta" in event:
                text += event["contentBlockDelta"]["delta"]["text"]
            if "metadata" in event:
                usage = event["metadata"]["usage"]
        return text, usage

    text, usage = await asyncio.to_thread(stream)
    assert len(text.split()) == 7 and usage["outputTokens"] == 7
    [record] = await records(store, 1)
    assert record["cost_nano"] == expected_cost(usage) and record["endpoint"] == "converse-stream"


async def test_invoke_model_with_an_anthropic_body_buffered_and_streamed(
    bedrock: Callable[..., Any], store: aioredis.Redis, tls: Tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy: Proxy = await bedrock()
    _, key = await proxy.create_key("acme")
    runtime = client(proxy.url, tls, key, monkeypatch, mock=CACHE)
    body = json.dumps(
        {
            "anthropic_version": "bedrock-2023-05-31",
            "max_tokens": 6,
            "messages": [{"role": "user", "content": "hello there"}],
        }
    )

    def invoke() -> dict[str, Any]:
        answer = runtime.invoke_model(modelId=CLAUDE, body=body)
        return dict(json.loads(answer["body"].read()))

    def invoke_stream() -> dict[str, Any]:
        answer = runtime.invoke_model_with_response_stream(modelId=CLAUDE, body=body)
        events = [json.loads(e["chunk"]["bytes"]) for e in answer["body"]]
        return dict(events[-1]["amazon-bedrock-invocationMetrics"])

    message = await asyncio.to_thread(invoke)
    metrics = await asyncio.to_thread(invoke_stream)
    one, two = await records(store, 2)
    u = message["usage"]
    assert one["cost_nano"] == expected_cost(
        {
            "inputTokens": u["input_tokens"],
            "cacheReadInputTokens": u["cache_read_input_tokens"],
            "cacheWriteInputTokens": u["cache_creation_input_tokens"],
            "outputTokens": u["output_tokens"],
        }
    )
    assert two["cost_nano"] == expected_cost(
        {
            "inputTokens": metrics["inputTokenCount"],
            "cacheReadInputTokens": metrics["cacheReadInputTokenCount"],
            "cacheWriteInputTokens": metrics["cacheWriteInputTokenCount"],
            "outputTokens": metrics["outputTokenCount"],
        }
    )
    assert (one["endpoint"], two["endpoint"]) == ("invoke", "invoke-with-response-stream")
    assert two["out"] == 6


async def test_invoke_model_of_another_family_is_metered_from_the_token_count_headers(
    bedrock: Callable[..., Any], store: aioredis.Redis, tls: Tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy: Proxy = await bedrock()
    _, key = await proxy.create_key("acme")
    runtime = client(proxy.url, tls, key, monkeypatch)

    def invoke() -> Any:
        answer = runtime.invoke_model(modelId=LLAMA, body=json.dumps({"prompt": "hi there"}))
        return answer["ResponseMetadata"]["HTTPHeaders"], json.loads(answer["body"].read())

    headers, body = await asyncio.to_thread(invoke)
    [record] = await records(store, 1)
    assert record["in"] == int(headers["x-amzn-bedrock-input-token-count"]) == 2
    assert record["out"] == body["generation_token_count"] == 16
    route = proxy.app[GATEWAY].routes[LLAMA]
    assert record["cost_nano"] == -(
        -(2 * route.price.input_nano_per_m + 16 * route.price.output_nano_per_m) // 10**6
    )
    assert proxy.received()[-1].body == {"prompt": "hi there", "max_gen_len": 2048}


async def test_anthropic_bedrock_sends_the_key_as_a_bearer_token(
    bedrock: Callable[..., Any], store: aioredis.Redis, tls: Tls
) -> None:
    proxy: Proxy = await bedrock()
    _, key = await proxy.create_key("acme")
    http = httpx2.AsyncClient(verify=tls.client_context())
    claude = anthropic.AsyncAnthropicBedrock(
        api_key=key, base_url=proxy.url, aws_region="us-east-1", http_client=http, max_retries=0
    )
    message = await claude.messages.create(model=CLAUDE, max_tokens=5, messages=[
        {"role": "user", "content": "hello there"}
    ])  # fmt: skip
    async with claude.messages.stream(
        model=CLAUDE, max_tokens=4, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        final = await stream.get_final_message()
    await claude.close()
    one, two = await records(store, 2)
    assert (one["out"], two["out"]) == (message.usage.output_tokens, final.usage.output_tokens)
    assert one["endpoint"] == "invoke" and two["endpoint"] == "invoke-with-response-stream"


async def test_a_budget_refusal_is_service_quota_exceeded_and_not_retried(
    bedrock: Callable[..., Any], store: aioredis.Redis, tls: Tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy: Proxy = await bedrock()
    kid, key = await proxy.create_key("acme")
    status, _ = await proxy.admin("PUT", f"/api/v1/llm/budgets/apikey/{kid}", budget(limit=10))
    assert status == 200
    runtime = client(proxy.url, tls, key, monkeypatch)
    before = len(proxy.received())
    with pytest.raises(ClientError) as caught:
        await asyncio.to_thread(runtime.converse, modelId=CLAUDE, messages=MESSAGES)
    error = caught.value.response
    assert error["Error"]["Code"] == "ServiceQuotaExceededException"
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert error["ResponseMetadata"]["RetryAttempts"] == 0
    assert "Budget exceeded" in error["Error"]["Message"]
    assert len(proxy.received()) == before
    assert await store.xlen(P + "usage") == 0


async def test_errors_reach_boto3_as_bedrock_codes_and_charge_nothing(
    bedrock: Callable[..., Any], store: aioredis.Redis, tls: Tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy: Proxy = await bedrock()
    _, key = await proxy.create_key("acme", limits={"rpm": 1})
    runtime = client(proxy.url, tls, key, monkeypatch, retries={"max_attempts": 1})

    async def code(**call: Any) -> str:
        call.setdefault("messages", MESSAGES)
        with pytest.raises(ClientError) as caught:
            await asyncio.to_thread(runtime.converse, **call)
        return str(caught.value.response["Error"]["Code"])

    assert await code(modelId="amazon.unknown-model-v1:0") == "ResourceNotFoundException"
    assert await code(modelId="bad model id!") == "ValidationException"
    huge = {"maxTokens": 10**12}
    assert await code(modelId=CLAUDE, inferenceConfig=huge) == "ValidationException"
    await asyncio.to_thread(runtime.converse, modelId=CLAUDE, messages=MESSAGES)
    assert await code(modelId=CLAUDE) == "ThrottlingException"
    assert await store.xlen(P + "usage") == 1


async def test_a_sigv4_signed_client_is_told_to_use_the_bearer_token(
    bedrock: Callable[..., Any], tls: Tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    proxy: Proxy = await bedrock()
    monkeypatch.delenv("AWS_BEARER_TOKEN_BEDROCK", raising=False)
    runtime = boto3.client(
        "bedrock-runtime", region_name="us-east-1", endpoint_url=proxy.url, verify=str(tls.ca)
    )
    with pytest.raises(ClientError) as caught:
        await asyncio.to_thread(runtime.converse, modelId=CLAUDE, messages=MESSAGES)
    error = caught.value.response
    assert error["Error"]["Code"] == "AccessDeniedException"
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert "AWS_BEARER_TOKEN_BEDROCK" in error["Error"]["Message"]


async def test_a_wrong_upstream_signature_fails_and_charges_nothing(
    bedrock: Callable[..., Any], store: aioredis.Redis, tls: Tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-mocks-secret")
    proxy: Proxy = await bedrock()
    _, key = await proxy.create_key("acme")
    runtime = client(proxy.url, tls, key, monkeypatch, retries={"max_attempts": 1})
    with pytest.raises(ClientError) as caught:
        await asyncio.to_thread(runtime.converse, modelId=CLAUDE, messages=MESSAGES)
    assert caught.value.response["Error"]["Code"] == "InvalidSignatureException"
    [record] = await records(store, 1)
    assert record["cost_nano"] == 0 and record["status"] == 403


async def test_streams_cut_or_corrupted_upstream_end_in_an_error_and_charge_a_bound(
    bedrock: Callable[..., Any], store: aioredis.Redis, tls: Tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy: Proxy = await bedrock()
    _, key = await proxy.create_key("acme")
    route = proxy.app[GATEWAY].routes[CLAUDE]
    for controls in ({"x-mock-fail-after-chunks": "2"}, {"x-mock-corrupt-stream": "1"}):
        runtime = client(proxy.url, tls, key, monkeypatch, mock=controls)

        def stream(runtime: Any = runtime) -> None:
            answer = runtime.converse_stream(
                modelId=CLAUDE, messages=MESSAGES, inferenceConfig={"maxTokens": 50}
            )
            for _ in answer["stream"]:
                pass

        with pytest.raises(Exception) as caught:
            await asyncio.to_thread(stream)
        if "fail" in next(iter(controls)):
            # botocore names a stream's exception by its member: the camel-cased shape name
            assert isinstance(caught.value, ClientError)
            assert caught.value.response["Error"]["Code"] == "modelStreamErrorException"
    for record in await records(store, 2):
        assert 0 < record["cost_nano"] and not record["reported"]
        assert record["out"] <= 50 and record["in"] <= route.context_window


async def test_the_api_prefix_and_the_usage_report(
    bedrock: Callable[..., Any], store: aioredis.Redis, tls: Tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy: Proxy = await bedrock()
    _, key = await proxy.create_key("acme")
    runtime = client(proxy.url + "/api/v1/llm/bedrock", tls, key, monkeypatch)
    answer = await asyncio.to_thread(runtime.converse, modelId=CLAUDE, messages=MESSAGES)
    [record] = await records(store, 1)
    start = int(proxy.clock()) - int(proxy.clock()) % 86400
    status, body = await proxy.admin(
        "GET", f"/api/v1/llm/usage/completions?start_time={start}&group_by=model"
    )
    assert status == 200, body
    rows = [r for bucket in body["data"] for r in bucket["results"] if r.get("model") == CLAUDE]
    assert sum(r["num_model_requests"] for r in rows) == 1
    assert sum(r["output_tokens"] for r in rows) == answer["usage"]["outputTokens"]
    assert record["cost_nano"] == expected_cost(answer["usage"])


async def test_the_documented_config_block_drives_converse_and_invoke(
    bedrock: Callable[..., Any],
    mock_upstream: TestServer,
    store: aioredis.Redis,
    tls: Tls,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from test_providers import BLOCKS

    block = BLOCKS["bedrock"]
    assert set(block["server"]) == {"tls_cert", "tls_key"}
    [raw] = block["upstreams"]
    assert UpstreamConfig.model_validate(raw).base_url == (
        "https://bedrock-runtime.us-east-1.amazonaws.com"
    )
    root = str(mock_upstream.make_url("")).rstrip("/")
    upstream = UpstreamConfig.model_validate({**raw, "base_url": root})
    models = [ModelConfig.model_validate(m) for m in block["models"]]
    proxy: Proxy = await bedrock(upstreams=[upstream], models=models)
    _, key = await proxy.create_key("acme")
    runtime = client(proxy.url, tls, key, monkeypatch)
    answer = await asyncio.to_thread(runtime.converse, modelId=CLAUDE, messages=MESSAGES)
    body = json.dumps({"prompt": "hi there", "max_gen_len": 3})
    await asyncio.to_thread(runtime.invoke_model, modelId=LLAMA, body=body)
    one, two = await records(store, 2)
    claude, llama = (proxy.app[GATEWAY].routes[m] for m in (CLAUDE, LLAMA))
    assert claude.price.source == llama.price.source == "genai-prices"
    usage = answer["usage"]
    assert one["cost_nano"] == cost_nano(claude.price, usage["inputTokens"], usage["outputTokens"])
    assert two["cost_nano"] == cost_nano(llama.price, 2, 3)


async def test_an_upstream_bedrock_api_key_is_sent_as_bearer_instead_of_signing(
    bedrock: Callable[..., Any], store: aioredis.Redis, tls: Tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream_mock = TestServer(build_mock_app(MockOptions(bedrock_api_key="brk-upstream")))
    await upstream_mock.start_server()
    try:
        monkeypatch.setenv("BEDROCK_UPSTREAM_KEY", "brk-upstream")
        root = str(upstream_mock.make_url("")).rstrip("/")
        upstream = bedrock_upstream(root, api_key_env="BEDROCK_UPSTREAM_KEY")
        proxy: Proxy = await bedrock(upstreams=[upstream])
        _, key = await proxy.create_key("acme")
        runtime = client(proxy.url, tls, key, monkeypatch)
        await asyncio.to_thread(runtime.converse, modelId=CLAUDE, messages=MESSAGES)
        sent = upstream_mock.app[RECEIVED][-1]
        assert sent.headers["authorization"] == "Bearer brk-upstream"
        assert "x-amz-date" not in sent.headers
        [record] = await records(store, 1)
        assert record["status"] == 200
    finally:
        await upstream_mock.close()


def test_a_signing_upstream_without_credentials_stops_start_up(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    aws_env(monkeypatch, tmp_path)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ConfigError, match="no AWS credentials"):
        providers_bedrock.check([bedrock_upstream("http://127.0.0.1:9")])


def test_the_prompt_bound_never_counts_images_or_documents_as_nothing() -> None:
    text = {"role": "user", "content": [{"text": "hi"}]}
    plain = bedrock_request.converse_bound({"messages": [text]}, 200_000)
    image = {"image": {"format": "png", "source": {"bytes": "iVBORw0KGgo="}}}
    with_image = {"messages": [{"role": "user", "content": [{"text": "hi"}, image]}]}
    assert bedrock_request.converse_bound(with_image, 200_000) >= plain + claude_bound.IMAGE_MAX
    document = {"document": {"format": "pdf", "name": "d", "source": {"bytes": "JVBERi0="}}}
    with_doc = {"messages": [{"role": "user", "content": [document]}]}
    assert bedrock_request.converse_bound(with_doc, 200_000) == 200_000
    assert bedrock_request.family("arn:aws:bedrock:us-east-1:1:inference-profile/" + CLAUDE) == (
        "anthropic"
    )
    assert bedrock_request.family("us.amazon.nova-pro-v1:0") == "amazon.nova"
    assert bedrock_request.family(LLAMA) == "meta"


@pytest.mark.parametrize(
    ("status", "type_", "answer"),
    [
        (429, "insufficient_quota", (400, "ServiceQuotaExceededException")),
        (429, "requests", (429, "ThrottlingException")),
        (401, "authentication_error", (403, "AccessDeniedException")),
        (404, "invalid_request_error", (404, "ResourceNotFoundException")),
        (413, "invalid_request_error", (413, "ValidationException")),
        (502, "server_error", (503, "ServiceUnavailableException")),
        (503, "server_error", (503, "ServiceUnavailableException")),
        (504, "server_error", (408, "ModelTimeoutException")),
        (500, "server_error", (500, "InternalServerException")),
    ],
)
def test_proxy_errors_map_to_bedrock_exceptions(
    status: int, type_: str, answer: tuple[int, str]
) -> None:
    assert bedrock_dialect.error_code(status, type_) == answer
