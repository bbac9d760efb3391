"""Anthropic's Messages API as the mock speaks it (``/v1/messages`` and ``count_tokens``):
the credential and version headers it requires, prompt tokens counted over its content blocks,
cache reads and writes carved out of them, a forced tool's ``tool_use`` answer, its stream's
event sequence, and an upstream account's headers the proxy must not pass on."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from proxy.tools.mock.controls import BadRequest, Plan, Tokens, answer_tokens, requested_cap
from proxy.tools.mock.core import Handler, Mock, error_response, stream_answer
from proxy.tools.mock.text import dumps, visible_words_json, word_count, words_text

_ANTHROPIC_ACCOUNT_HEADERS = {
    "anthropic-ratelimit-requests-limit": "4000",
    "anthropic-ratelimit-requests-remaining": "3999",
    "anthropic-ratelimit-requests-reset": "2026-01-01T00:00:00Z",
    "anthropic-organization-id": "org-mock-upstream-account",
}


def _anthropic_text_words(content: Any) -> int:
    """Words of a message's text: string content, text blocks and tool results' text."""
    if isinstance(content, str):
        return len(content.split())
    if not isinstance(content, list):
        return 0
    words = 0
    for block in content:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            words += word_count(block.get("text"))
        elif block.get("type") == "tool_result":
            words += _anthropic_text_words(block.get("content"))
    return words


def _anthropic_prompt_tokens(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: at least one message is required", "messages")
    words = _anthropic_text_words(body.get("system"))
    for message in messages:
        if isinstance(message, dict):
            words += 4 + _anthropic_text_words(message.get("content"))
    return words + 3


def _anthropic_usage(plan: Plan, tokens: Tokens) -> dict[str, Any]:
    """Input usage: cache reads, then 5-minute and 1-hour writes, carved out of the prompt."""
    rest = tokens.prompt - tokens.cached
    write = min(plan.cache_write_tokens, rest)
    write_1h = min(plan.cache_write_1h_tokens, rest - write)
    return {
        "input_tokens": rest - write - write_1h,
        "cache_creation_input_tokens": write + write_1h,
        "cache_read_input_tokens": tokens.cached,
        "cache_creation": {
            "ephemeral_5m_input_tokens": write,
            "ephemeral_1h_input_tokens": write_1h,
        },
    }


def _chosen_tool(body: dict[str, Any]) -> str | None:
    """The tool a ``tool_choice`` of ``any`` or ``tool`` forces, else None (a text answer)."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not isinstance(tools, list) or not tools or not isinstance(choice, dict):
        return None
    if choice.get("type") == "tool" and isinstance(choice.get("name"), str):
        return str(choice["name"])
    first = tools[0]
    if choice.get("type") == "any" and isinstance(first, dict):
        return str(first.get("name", "tool"))
    return None


def _anthropic_event(kind: str, **fields: Any) -> bytes:
    data = json.dumps({"type": kind, **fields}, separators=(",", ":"))
    return f"event: {kind}\ndata: {data}\n\n".encode()


class Anthropic:
    """The handlers of Anthropic's paths, over the mock's shared state."""

    def __init__(self, mock: Mock) -> None:
        self.mock = mock

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("POST", "/v1/messages", self.messages),
            ("POST", "/v1/messages/count_tokens", self.count_tokens),
        ]

    async def messages(self, request: web.Request) -> web.StreamResponse:
        begun = await self.mock.begin(request, dialect="anthropic")
        if isinstance(begun, web.Response):
            return begun
        plan, body = begun
        try:
            prompt = _anthropic_prompt_tokens(body)
            cap = requested_cap(body, ("max_tokens",))
            if cap is None:
                raise BadRequest("max_tokens: Field required", "max_tokens")
            tokens = answer_tokens(plan, prompt, cap)
        except BadRequest as exc:
            return error_response(400, exc.message, dialect="anthropic")
        usage = _anthropic_usage(plan, tokens)
        tool = _chosen_tool(body)
        stop = "tool_use" if tool else ("max_tokens" if tokens.capped else "end_turn")
        ident, model = self.mock.next_id("msg_"), body["model"]
        headers = {"request-id": self.mock.next_id("req_"), **_ANTHROPIC_ACCOUNT_HEADERS}
        text = words_text(tokens.visible)
        if tool:
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": self.mock.next_id("toolu_"),
                "name": tool,
                "input": {"text": text},
            }
        else:
            block = {"type": "text", "text": text}
        message: dict[str, Any] = {
            "id": ident,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [block],
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {**usage, "output_tokens": tokens.completion},
        }
        if not body.get("stream"):
            return web.Response(
                body=dumps(message), content_type="application/json", headers=headers
            )
        started = {
            **message,
            "content": [],
            "stop_reason": None,
            "usage": {**usage, "output_tokens": min(1, tokens.completion)},
        }
        if tool:
            opening = {**block, "input": {}}
            deltas = [
                _anthropic_event(
                    "content_block_delta",
                    index=0,
                    delta={"type": "input_json_delta", "partial_json": part},
                )
                for part in (
                    '{"text":"',
                    *(w.strip('"') for w in visible_words_json(tokens.visible)),
                    '"}',
                )
            ]
        else:
            opening = {"type": "text", "text": ""}
            head = (
                b"event: content_block_delta\ndata: "
                b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":'
            )
            deltas = [head + w.encode() + b"}}\n\n" for w in visible_words_json(tokens.visible)]
        pre = [
            _anthropic_event("message_start", message=started),
            _anthropic_event("content_block_start", index=0, content_block=opening),
            _anthropic_event("ping"),
        ]
        trailer = [
            _anthropic_event("content_block_stop", index=0),
            _anthropic_event(
                "message_delta",
                delta={"stop_reason": stop, "stop_sequence": None},
                usage={"output_tokens": tokens.completion},
            ),
            _anthropic_event("message_stop"),
        ]
        return await stream_answer(request, plan, pre, deltas, trailer, headers)

    async def count_tokens(self, request: web.Request) -> web.StreamResponse:
        begun = await self.mock.begin(request, dialect="anthropic")
        if isinstance(begun, web.Response):
            return begun
        _plan, body = begun
        try:
            prompt = _anthropic_prompt_tokens(body)
        except BadRequest as exc:
            return error_response(400, exc.message, dialect="anthropic")
        return web.Response(body=dumps({"input_tokens": prompt}), content_type="application/json")
