"""The mock upstream over real HTTP: the proxy's tests trust its shapes and token counts."""

from __future__ import annotations

import base64
import gzip
import json
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import pytest
import tiktoken
import tiktoken_ext.openai_public as openai_public
from aiohttp.test_utils import TestClient
from tiktoken.load import load_tiktoken_bpe

from proxy.tools.mock import (
    RECEIVED,
    WORDS,
    MockOptions,
    ReceivedRequest,
    build_mock_app,
)

ENCODINGS_DIR = Path(__file__).resolve().parent.parent / "proxy" / "catalog" / "encodings"
ENCODING_NAMES = ("cl100k_base", "o200k_base")

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "say hello to me"}]}
# 4 words + 4 per message + 3 priming.
CHAT_PROMPT_TOKENS = 11


@pytest.fixture(scope="module")
def encodings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tiktoken.Encoding]:
    """The real encodings, built offline from the packaged rank files."""
    out = {}
    for name in ENCODING_NAMES:
        path = tmp_path_factory.mktemp("enc") / f"{name}.tiktoken"
        path.write_bytes(gzip.decompress((ENCODINGS_DIR / f"{name}.tiktoken.gz").read_bytes()))
        ranks = load_tiktoken_bpe(str(path))
        # Reuse tiktoken's own pattern and special tokens, but not its download.
        with mock.patch.object(openai_public, "load_tiktoken_bpe", return_value=ranks):
            out[name] = tiktoken.Encoding(**getattr(openai_public, name)())
    return out


@pytest.fixture
async def client(aiohttp_client: MakeClient) -> Client:
    return await aiohttp_client(build_mock_app())


async def post(client: Client, path: str, body: Any, **headers: str) -> aiohttp.ClientResponse:
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
    return await client.post(path, json=body, headers=hdrs)


async def sse_data(resp: aiohttp.ClientResponse) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    text = await resp.text()
    assert text.endswith("\n\n")
    return [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]


async def sse_events(resp: aiohttp.ClientResponse) -> list[tuple[str, dict[str, Any]]]:
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    events = []
    for block in (await resp.text()).split("\n\n"):
        if not block:
            continue
        kind_line, data_line = block.split("\n")
        kind = kind_line.removeprefix("event: ")
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == kind
        events.append((kind, data))
    return events


def expected_text(words: int) -> str:
    return "".join(WORDS[i % len(WORDS)] for i in range(words))


def chat_stream_parts(payloads: list[str]) -> tuple[str, list[dict[str, Any]]]:
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return text, chunks


def test_words_are_single_tokens(encodings: dict[str, tiktoken.Encoding]) -> None:
    for enc in encodings.values():
        for word in WORDS:
            assert len(enc.encode(word)) == 1, (enc.name, word)


async def test_chat_buffered(client: Client) -> None:
    resp = await post(client, "/v1/chat/completions", CHAT)
    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int)
    assert body["model"] == "gpt-4o-mini"
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == expected_text(16)
    assert choice["finish_reason"] == "stop"
    assert choice["logprobs"] is None
    assert body["usage"] == {
        "prompt_tokens": CHAT_PROMPT_TOKENS,
        "completion_tokens": 16,
        "total_tokens": CHAT_PROMPT_TOKENS + 16,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


async def test_chat_prompt_tokens_count_text_parts(client: Client) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "one two three"},
                {"type": "image_url", "image_url": {"url": "data:"}},
            ],
        },
        {"role": "assistant", "content": None},
    ]
    resp = await post(client, "/v1/chat/completions", {"model": "m", "messages": messages})
    assert (await resp.json())["usage"]["prompt_tokens"] == (2 + 4) + (3 + 4) + (0 + 4) + 3


@pytest.mark.parametrize("cap_field", ["max_tokens", "max_completion_tokens"])
async def test_chat_cap(client: Client, cap_field: str) -> None:
    resp = await post(client, "/v1/chat/completions", {**CHAT, cap_field: 5})
    body = await resp.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == expected_text(5)
    assert body["usage"]["completion_tokens"] == 5

    resp = await post(client, "/v1/chat/completions", {**CHAT, cap_field: 1000})
    body = await resp.json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 16


async def test_chat_token_headers(client: Client) -> None:
    resp = await post(
        client,
        "/v1/chat/completions",
        {**CHAT, "max_completion_tokens": 30},
        x_mock_output_tokens="40",
        x_mock_cached_tokens="1000",
        x_mock_reasoning_tokens="12",
    )
    body = await resp.json()
    assert body["choices"][0]["finish_reason"] == "length"
    # Reasoning tokens are inside completion tokens and produce no text.
    assert body["choices"][0]["message"]["content"] == expected_text(30 - 12)
    usage = body["usage"]
    assert usage["completion_tokens"] == 30
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 12}
    assert usage["prompt_tokens_details"] == {"cached_tokens": CHAT_PROMPT_TOKENS}


async def test_chat_stream_without_usage(client: Client) -> None:
    resp = await post(client, "/v1/chat/completions", {**CHAT, "stream": True})
    text, chunks = chat_stream_parts(await sse_data(resp))
    assert text == expected_text(16)
    assert len(chunks) == 1 + 16 + 1  # role, one word each, finish
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["model"] == "gpt-4o-mini" and c["id"] == chunks[0]["id"] for c in chunks)
    assert all("usage" not in c for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-2:] == [None, "stop"]


async def test_chat_stream_with_usage(client: Client) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 3}
    resp = await post(client, "/v1/chat/completions", body)
    text, chunks = chat_stream_parts(await sse_data(resp))
    assert text == expected_text(3)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    assert chunks[-1]["usage"]["prompt_tokens"] == CHAT_PROMPT_TOKENS


@pytest.mark.parametrize("name", ENCODING_NAMES)
async def test_streamed_text_tokenizes_to_completion_tokens(
    client: Client, encodings: dict[str, tiktoken.Encoding], name: str
) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    resp = await post(client, "/v1/chat/completions", body, x_mock_output_tokens="100")
    text, chunks = chat_stream_parts(await sse_data(resp))
    assert len(encodings[name].encode(text)) == chunks[-1]["usage"]["completion_tokens"] == 100


async def test_completions(client: Client) -> None:
    request = {"model": "gpt-3.5-turbo-instruct", "prompt": "once upon a time", "max_tokens": 4}
    resp = await post(client, "/v1/completions", request)
    body = await resp.json()
    assert body["object"] == "text_completion"
    assert body["model"] == "gpt-3.5-turbo-instruct"
    assert body["choices"][0]["text"] == expected_text(4)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == 4
    assert body["usage"]["completion_tokens"] == 4

    tokens_prompt = {"model": "m", "prompt": [[1, 2, 3], [4, 5]]}
    resp = await post(client, "/v1/completions", tokens_prompt)
    assert (await resp.json())["usage"]["prompt_tokens"] == 5


async def test_completions_stream(client: Client) -> None:
    request = {
        "model": "m",
        "prompt": "hi",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    payloads = await sse_data(await post(client, "/v1/completions", request))
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected_text(16)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["total_tokens"] == 1 + 16


async def test_embeddings(client: Client) -> None:
    resp = await post(client, "/v1/embeddings", {"model": "e", "input": "a b c"})
    body = await resp.json()
    assert body["object"] == "list"
    assert body["model"] == "e"
    (item,) = body["data"]
    assert item["object"] == "embedding" and item["index"] == 0
    assert len(item["embedding"]) == 8
    assert sum(v * v for v in item["embedding"]) == pytest.approx(1.0)
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}

    resp = await post(client, "/v1/embeddings", {"model": "e", "input": ["x y", "a b c"]})
    body = await resp.json()
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert body["data"][1]["embedding"] == item["embedding"]  # deterministic from the input
    assert body["data"][0]["embedding"] != item["embedding"]
    assert body["usage"]["prompt_tokens"] == 5

    resp = await post(client, "/v1/embeddings", {"model": "e", "input": [5, 6, 7]})
    body = await resp.json()
    assert len(body["data"]) == 1
    assert body["usage"]["prompt_tokens"] == 3


async def test_embeddings_base64_and_dimensions(client: Client) -> None:
    plain = await (await post(client, "/v1/embeddings", {"model": "e", "input": "q"})).json()
    request: dict[str, Any] = {"model": "e", "input": "q", "encoding_format": "base64"}
    encoded = await (await post(client, "/v1/embeddings", request)).json()
    vector = struct.unpack("<8f", base64.b64decode(encoded["data"][0]["embedding"]))
    assert vector == pytest.approx(plain["data"][0]["embedding"], abs=1e-6)

    request = {"model": "e", "input": "q", "dimensions": 3}
    resized = await (await post(client, "/v1/embeddings", request)).json()
    assert len(resized["data"][0]["embedding"]) == 3


async def test_responses_buffered(client: Client) -> None:
    request = {"model": "gpt-4o", "input": [{"role": "user", "content": "four words right here"}]}
    resp = await post(client, "/v1/responses", request, x_mock_cached_tokens="2")
    body = await resp.json()
    assert body["object"] == "response"
    assert body["id"].startswith("resp_")
    assert body["status"] == "completed"
    assert body["model"] == "gpt-4o"
    (message,) = body["output"]
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["content"] == [
        {"type": "output_text", "text": expected_text(16), "annotations": []}
    ]
    assert body["usage"] == {
        "input_tokens": 4,
        "input_tokens_details": {"cached_tokens": 2},
        "output_tokens": 16,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 20,
    }


async def test_responses_cap_is_incomplete(client: Client) -> None:
    resp = await post(
        client, "/v1/responses", {"model": "m", "input": "hi", "max_output_tokens": 2}
    )
    body = await resp.json()
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["content"][0]["text"] == expected_text(2)
    assert body["usage"]["output_tokens"] == 2


async def test_responses_stream(client: Client) -> None:
    request = {"model": "m", "input": "hello there", "stream": True}
    events = await sse_events(await post(client, "/v1/responses", request))
    kinds = [kind for kind, _ in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    deltas = [data["delta"] for kind, data in events if kind == "response.output_text.delta"]
    assert deltas == [WORDS[i % len(WORDS)] for i in range(16)]
    assert events[0][1]["response"]["usage"] is None
    completed = events[-1][1]["response"]
    assert completed["status"] == "completed"
    assert completed["output"][0]["content"][0]["text"] == expected_text(16)
    assert completed["usage"]["input_tokens"] == 2
    assert completed["usage"]["output_tokens"] == 16
    assert completed["usage"]["total_tokens"] == 18


async def test_responses_stream_capped_ends_incomplete(client: Client) -> None:
    request = {"model": "m", "input": "x", "stream": True, "max_output_tokens": 3}
    events = await sse_events(await post(client, "/v1/responses", request))
    kind, data = events[-1]
    assert kind == "response.incomplete"
    assert data["response"]["usage"]["output_tokens"] == 3


async def test_models(client: Client) -> None:
    resp = await client.get("/v1/models")
    body = await resp.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == list(MockOptions().models)
    assert all(m["object"] == "model" for m in body["data"])


@pytest.mark.parametrize(
    ("status", "kind"), [(503, "server_error"), (429, "invalid_request_error")]
)
async def test_injected_status(client: Client, status: int, kind: str) -> None:
    resp = await post(client, "/v1/chat/completions", CHAT, x_mock_status=str(status))
    assert resp.status == status
    error = (await resp.json())["error"]
    assert error["type"] == kind
    assert error["message"] == f"mock injected error {status}"


async def test_omit_usage(client: Client) -> None:
    resp = await post(client, "/v1/chat/completions", CHAT, x_mock_omit_usage="1")
    assert "usage" not in await resp.json()

    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    resp = await post(client, "/v1/chat/completions", body, x_mock_omit_usage="1")
    text, chunks = chat_stream_parts(await sse_data(resp))
    assert text == expected_text(16)
    assert all(c["choices"] and "usage" not in c for c in chunks)

    resp = await post(client, "/v1/responses", {"model": "m", "input": "x"}, x_mock_omit_usage="1")
    assert (await resp.json())["usage"] is None
    request = {"model": "m", "input": "x", "stream": True}
    events = await sse_events(await post(client, "/v1/responses", request, x_mock_omit_usage="1"))
    assert events[-1][1]["response"]["usage"] is None

    resp = await post(client, "/v1/embeddings", {"model": "e", "input": "x"}, x_mock_omit_usage="1")
    assert "usage" not in await resp.json()


async def test_fail_after_chunks_truncates_stream(client: Client) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    resp = await post(client, "/v1/chat/completions", body, x_mock_fail_after_chunks="3")
    assert resp.status == 200
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async for data in resp.content.iter_any():
            received += data
    payloads = [
        line[len(b"data: ") :] for line in received.split(b"\n") if line.startswith(b"data: ")
    ]
    assert b"[DONE]" not in payloads
    content = [json.loads(p)["choices"][0]["delta"].get("content") for p in payloads[1:]]
    assert content == list(WORDS[:3])


async def test_fail_after_chunks_responses(client: Client) -> None:
    request = {"model": "m", "input": "x", "stream": True}
    resp = await post(client, "/v1/responses", request, x_mock_fail_after_chunks="0")
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()


async def test_bad_requests(client: Client) -> None:
    resp = await client.post(
        "/v1/chat/completions", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert resp.status == 400
    assert (await resp.json())["error"]["type"] == "invalid_request_error"

    resp = await post(client, "/v1/chat/completions", {"messages": CHAT["messages"]})
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "model"

    resp = await post(client, "/v1/chat/completions", CHAT, x_mock_output_tokens="many")
    assert resp.status == 400


async def test_unknown_path_is_openai_404(client: Client) -> None:
    for resp in (await client.get("/v1/nope"), await client.get("/v1/chat/completions")):
        assert resp.status == 404
        assert await resp.json() == {
            "error": {
                "message": f"Unknown request URL: GET {resp.url.path}.",
                "type": "invalid_request_error",
                "code": "not_found",
                "param": None,
            }
        }


async def test_received_log(aiohttp_client: MakeClient) -> None:
    app = build_mock_app()
    client = await aiohttp_client(app)
    await post(client, "/v1/chat/completions", CHAT, X_Custom_Thing="v")
    await client.post("/v1/embeddings", data=b"nope")
    log = app[RECEIVED]
    assert log.maxlen == 1000
    first, second = log
    assert isinstance(first, ReceivedRequest)
    assert (first.method, first.path, first.body) == ("POST", "/v1/chat/completions", CHAT)
    assert first.headers["x-custom-thing"] == "v"
    assert second.body is None


async def test_latency_and_chunk_delay(aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(build_mock_app(MockOptions(latency_ms=30, output_tokens=2)))
    started = time.monotonic()
    await (await post(client, "/v1/chat/completions", CHAT)).read()
    assert time.monotonic() - started >= 0.03

    started = time.monotonic()
    body = {**CHAT, "stream": True}
    resp = await post(
        client, "/v1/chat/completions", body, x_mock_latency_ms="0", x_mock_chunk_delay_ms="10"
    )
    await resp.read()
    # role, 2 words, finish, [DONE]: four gaps.
    assert time.monotonic() - started >= 0.04


# --- Anthropic's Messages API ----------------------------------------------------------------

CLAUDE = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 100,
    "system": "be brief",
    "messages": [{"role": "user", "content": "say hello to me"}],
}
# 2 system words + (4 + 4 words) + 3.
CLAUDE_PROMPT = 13
ANTHROPIC_HEADERS = {"x_api_key": "sk-ant-upstream", "anthropic_version": "2023-06-01"}


async def test_messages_buffered_with_cache_reads_and_writes(client: Client) -> None:
    resp = await post(
        client,
        "/v1/messages",
        CLAUDE,
        x_mock_output_tokens="4",
        x_mock_cached_tokens="5",
        x_mock_cache_write_tokens="3",
        x_mock_cache_write_1h_tokens="2",
        **ANTHROPIC_HEADERS,
    )
    assert resp.status == 200
    assert resp.headers["anthropic-organization-id"] == "org-mock-upstream-account"
    body = await resp.json()
    assert body["type"] == "message" and body["role"] == "assistant"
    assert body["id"].startswith("msg_") and body["model"] == "claude-sonnet-4-5"
    assert body["content"] == [{"type": "text", "text": expected_text(4)}]
    assert (body["stop_reason"], body["stop_sequence"]) == ("end_turn", None)
    assert body["usage"] == {
        "input_tokens": CLAUDE_PROMPT - 10,
        "cache_creation_input_tokens": 5,
        "cache_read_input_tokens": 5,
        "cache_creation": {"ephemeral_5m_input_tokens": 3, "ephemeral_1h_input_tokens": 2},
        "output_tokens": 4,
    }
    capped = await (await post(client, "/v1/messages", {**CLAUDE, "max_tokens": 2},
                               **ANTHROPIC_HEADERS)).json()  # fmt: skip
    assert capped["stop_reason"] == "max_tokens" and capped["usage"]["output_tokens"] == 2


async def test_messages_stream_follows_anthropics_event_sequence(client: Client) -> None:
    resp = await post(
        client,
        "/v1/messages",
        {**CLAUDE, "stream": True},
        x_mock_output_tokens="3",
        x_mock_cached_tokens="4",
        **ANTHROPIC_HEADERS,
    )
    events = await sse_events(resp)
    kinds = [kind for kind, _ in events]
    assert kinds == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == CLAUDE_PROMPT - 4
    assert start["usage"]["cache_read_input_tokens"] == 4
    text = "".join(data["delta"]["text"] for kind, data in events if kind == "content_block_delta")
    assert text == expected_text(3)
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"] == {"output_tokens": 3}


async def test_messages_tool_use_buffered_and_streamed(client: Client) -> None:
    tools = [{"name": "lookup", "input_schema": {"type": "object"}}]
    request = {**CLAUDE, "tools": tools, "tool_choice": {"type": "any"}}
    body = await (
        await post(client, "/v1/messages", request, x_mock_output_tokens="2", **ANTHROPIC_HEADERS)
    ).json()
    [block] = body["content"]
    assert block["type"] == "tool_use" and block["name"] == "lookup"
    assert block["input"] == {"text": expected_text(2)}
    assert body["stop_reason"] == "tool_use"
    resp = await post(
        client,
        "/v1/messages",
        {**request, "stream": True},
        x_mock_output_tokens="2",
        **ANTHROPIC_HEADERS,
    )
    events = await sse_events(resp)
    assert events[1][1]["content_block"]["type"] == "tool_use"
    partial = "".join(
        data["delta"]["partial_json"] for kind, data in events if kind == "content_block_delta"
    )
    assert json.loads(partial) == {"text": expected_text(2)}


async def test_count_tokens_and_anthropic_errors(client: Client) -> None:
    resp = await post(client, "/v1/messages/count_tokens", CLAUDE, **ANTHROPIC_HEADERS)
    assert await resp.json() == {"input_tokens": CLAUDE_PROMPT}
    for headers, status, kind in (
        ({"anthropic_version": "2023-06-01"}, 401, "authentication_error"),
        ({"x_api_key": "k"}, 400, "invalid_request_error"),
        ({**ANTHROPIC_HEADERS, "x_mock_status": "429"}, 429, "rate_limit_error"),
        ({**ANTHROPIC_HEADERS, "x_mock_status": "529"}, 529, "overloaded_error"),
        ({**ANTHROPIC_HEADERS, "x_mock_status": "500"}, 500, "api_error"),
    ):
        resp = await post(client, "/v1/messages", CLAUDE, **headers)
        assert resp.status == status
        body = await resp.json()
        assert body["type"] == "error" and body["error"]["type"] == kind, body
    no_cap = {k: v for k, v in CLAUDE.items() if k != "max_tokens"}
    resp = await post(client, "/v1/messages", no_cap, **ANTHROPIC_HEADERS)
    assert resp.status == 400 and "max_tokens" in (await resp.json())["error"]["message"]
    resp = await client.post("/v1/messages/batches", json={})
    assert resp.status == 404 and (await resp.json())["error"]["type"] == "not_found_error"


async def test_messages_stream_can_break_off(client: Client) -> None:
    resp = await post(
        client,
        "/v1/messages",
        {**CLAUDE, "stream": True},
        x_mock_fail_after_chunks="2",
        **ANTHROPIC_HEADERS,
    )
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()


# --- Azure OpenAI's paths, and upstreams that always fail --------------------------------------


async def test_azure_paths_need_an_api_key_and_dated_ones_an_api_version(client: Client) -> None:
    dated = "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
    for path in (dated, "/openai/v1/chat/completions"):
        resp = await post(client, path, CHAT, api_key="azure-key")
        assert resp.status == 200, path
        assert (await resp.json())["usage"]["prompt_tokens"] == CHAT_PROMPT_TOKENS
    resp = await post(client, dated, CHAT)
    assert resp.status == 401
    no_version = "/openai/deployments/gpt4o-prod/chat/completions"
    resp = await post(client, no_version, CHAT, api_key="azure-key")
    assert resp.status == 400 and "api-version" in (await resp.json())["error"]["message"]
    embed = "/openai/deployments/e/embeddings?api-version=2024-10-21"
    resp = await post(client, embed, {"model": "e", "input": "a b"}, api_key="k")
    assert (await resp.json())["usage"]["prompt_tokens"] == 2
    resp = await post(
        client, "/openai/responses?api-version=2025-03-01-preview", {"model": "d", "input": "x"},
        api_key="k",
    )  # fmt: skip
    assert resp.status == 200


async def test_a_mock_told_to_fail_answers_every_request_with_that_status(
    aiohttp_client: MakeClient,
) -> None:
    client = await aiohttp_client(build_mock_app(MockOptions(status=503)))
    resp = await post(client, "/v1/chat/completions", CHAT)
    assert resp.status == 503 and (await resp.json())["error"]["type"] == "server_error"
    resp = await post(client, "/v1/messages", CLAUDE, **ANTHROPIC_HEADERS)
    assert resp.status == 503 and (await resp.json())["error"]["type"] == "api_error"
    assert len(client.app[RECEIVED]) == 2
    with pytest.raises(ValueError):
        MockOptions(status=200)
