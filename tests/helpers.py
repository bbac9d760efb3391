"""Requests the test modules share: one chat completion by raw HTTP or through the ``openai``
SDK, and admin calls on a proxy running in another process.

One definition each, so that a change to how a test talks to the proxy (a header, how a
stream is read) is made once. Fixtures stay in ``conftest.py``; this module holds plain
functions and imports nothing from the proxy, so any test may use it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import aiohttp
import openai
from anthropic.types import MessageParam
from conftest import ADMIN_KEY
from multidict import CIMultiDict
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam

CHAT_PATH = "/v1/chat/completions"


def user_messages(text: str) -> list[ChatCompletionMessageParam]:
    """One user message, typed as the ``openai`` SDK wants it (the mock counts its words)."""
    return [{"role": "user", "content": text}]


def claude_messages(text: str) -> list[MessageParam]:
    """One user message, typed as the ``anthropic`` SDK wants it."""
    return [{"role": "user", "content": text}]


def auth(key: str, **extra: str) -> dict[str, str]:
    """``Authorization`` for ``key``, with ``extra`` headers."""
    return {"Authorization": f"Bearer {key}", **extra}


def chat_body(
    model: str,
    messages: Sequence[Any],
    max_tokens: int | None = None,
    stream: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """A chat completion request body; ``max_tokens`` and ``stream`` only when given."""
    body: dict[str, Any] = {"model": model, "messages": list(messages)}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if stream:
        body["stream"] = True
    body.update(extra)
    return body


class Reply(NamedTuple):
    """An answer read to its end (a stream too): unpacks as ``status, raw, headers``."""

    status: int
    raw: bytes
    headers: CIMultiDict[str]

    def json(self) -> Any:
        return json.loads(self.raw)

    @property
    def body(self) -> Any:
        """Parsed JSON when the answer says it is JSON, else the text (an SSE stream)."""
        if self.headers.get("Content-Type", "").startswith("application/json"):
            return self.json()
        return self.raw.decode()

    @property
    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = self.body["error"]
        return error


async def post_chat(
    session: aiohttp.ClientSession,
    base_url: str,
    key: str,
    body: Mapping[str, Any],
    headers: Mapping[str, str] | None = None,
) -> Reply:
    """POST ``body`` to the chat completions endpoint of ``base_url`` as ``key``."""
    async with session.post(
        base_url + CHAT_PATH, json=body, headers=auth(key, **(headers or {}))
    ) as response:
        return Reply(response.status, await response.read(), response.headers.copy())


async def chat_json(
    session: aiohttp.ClientSession,
    base_url: str,
    key: str,
    body: Mapping[str, Any],
    headers: Mapping[str, str] | None = None,
) -> tuple[int, Any]:
    """(status, parsed JSON body) of one buffered chat request."""
    reply = await post_chat(session, base_url, key, body, headers)
    return reply.status, reply.json()


async def chat_status(
    session: aiohttp.ClientSession | None,
    base_url: str,
    key: str,
    body: Mapping[str, Any],
    headers: Mapping[str, str] | None = None,
) -> int:
    """Only the status of one chat request; ``session`` None: a session of its own."""
    if session is None:
        async with aiohttp.ClientSession() as own:
            return (await post_chat(own, base_url, key, body, headers)).status
    return (await post_chat(session, base_url, key, body, headers)).status


def mock_output(tokens: int, headers: Mapping[str, str] | None = None) -> dict[str, str]:
    """``headers`` and the one telling the mock upstream to answer ``tokens`` output tokens
    (one a word)."""
    return {"x-mock-output-tokens": str(tokens), **(headers or {})}


def _mock_headers(output_tokens: int | None, headers: Mapping[str, str] | None) -> dict[str, str]:
    if output_tokens is None:
        return dict(headers or {})
    return mock_output(output_tokens, headers)


async def sdk_chat(
    client: openai.AsyncOpenAI,
    model: str,
    messages: Sequence[ChatCompletionMessageParam],
    *,
    output_tokens: int | None = None,
    headers: Mapping[str, str] | None = None,
    **params: Any,
) -> ChatCompletion:
    """A buffered chat completion through the SDK; ``output_tokens``: the mock's answer size."""
    extra = _mock_headers(output_tokens, headers)
    answer: ChatCompletion = await client.chat.completions.create(
        model=model, messages=messages, extra_headers=extra, **params
    )
    return answer


async def metered_chat(
    client: openai.AsyncOpenAI,
    model: str,
    messages: Sequence[ChatCompletionMessageParam],
    max_tokens: int,
    headers: Mapping[str, str] | None = None,
) -> int:
    """An admitted request whose answer is exactly ``max_tokens`` long (the mock is told so);
    returns the tokens it used, prompt + ``max_tokens``."""
    answer = await sdk_chat(
        client, model, messages, output_tokens=max_tokens, headers=headers, max_tokens=max_tokens
    )
    assert answer.usage is not None and answer.usage.completion_tokens == max_tokens
    return answer.usage.total_tokens


async def sdk_stream(
    client: openai.AsyncOpenAI,
    model: str,
    messages: Sequence[ChatCompletionMessageParam],
    *,
    output_tokens: int | None = None,
    headers: Mapping[str, str] | None = None,
    **params: Any,
) -> list[ChatCompletionChunk]:
    """A streamed chat completion through the SDK, every chunk read."""
    extra = _mock_headers(output_tokens, headers)
    stream: openai.AsyncStream[ChatCompletionChunk] = await client.chat.completions.create(
        model=model, messages=messages, stream=True, extra_headers=extra, **params
    )
    return [chunk async for chunk in stream]


def streamed_content(chunks: Sequence[ChatCompletionChunk]) -> str:
    """The text of a chat stream's chunks, joined."""
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


async def admin_call(
    session: aiohttp.ClientSession,
    base_url: str,
    method: str,
    path: str,
    body: Any = None,
    key: str = ADMIN_KEY,
) -> tuple[int, Any]:
    """An admin API call on a proxy in another process (``Proxy.admin`` for in-process ones)."""
    async with session.request(
        method, base_url + path, json=body, headers=auth(key)
    ) as response:
        return response.status, await response.json(content_type=None)


async def create_key_on(
    session: aiohttp.ClientSession, base_url: str, org: str, role: str = "member"
) -> tuple[str, str]:
    """(key id, plaintext) of a new key on a proxy in another process (``Proxy.create_key``
    for in-process ones)."""
    status, body = await admin_call(
        session, base_url, "POST", "/api/v1/keys", {"org_id": org, "role": role}
    )
    assert status == 201, body
    return body["id"], body["key"]
