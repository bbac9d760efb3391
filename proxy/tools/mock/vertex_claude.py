"""The mock's Claude on Vertex AI (``…/publishers/anthropic/models/{model}:rawPredict``,
``:streamRawPredict``, ``count-tokens:rawPredict``), beside its Gemini side
(``proxy.tools.mock.google``, whose authentication and recording it shares): the body must carry
``anthropic_version: "vertex-2023-10-16"`` and no ``model``; prompt tokens are 3 + per message
4 + its words; Anthropic's answer and event sequence."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from proxy.tools.mock.google import WORDS, Google, _error, _field, _int, _words


def handler(mock: Google) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await _claude(mock, request)

    return handle


async def _claude(mock: Google, request: web.Request) -> web.StreamResponse:
    body = await mock.begin(request, vertex=True)
    if isinstance(body, web.Response):
        return body
    if body.get("anthropic_version") != "vertex-2023-10-16":
        return _error(400, "anthropic_version must be vertex-2023-10-16")
    model = request.match_info["model"]
    messages = body.get("messages")
    messages = messages if isinstance(messages, list) else []
    prompt = 3 + sum(4 + _claude_words(m.get("content")) for m in messages if isinstance(m, dict))
    if model == "count-tokens":
        return web.json_response({"input_tokens": prompt})
    if "model" in body:
        return _error(400, "model: Extra inputs are not permitted")
    cap = _field(body, "max_tokens") or 1
    wanted = _int(request.headers, "x-mock-output-tokens", mock.output_tokens)
    out = min(wanted, cap)
    text = "".join(WORDS[i % len(WORDS)] for i in range(out))
    stop = "max_tokens" if out < wanted else "end_turn"
    mock.report(request.path, model, prompt, out, 0, 0)
    message = {
        "id": "msg_vertex",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": prompt, "output_tokens": out},
    }
    if request.match_info["method"] == "rawPredict":
        return web.json_response(message)
    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "usage": {"input_tokens": prompt, "output_tokens": 1},
    }
    events = [
        _claude_event("message_start", message=start),
        _claude_event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        *(
            _claude_event(
                "content_block_delta",
                index=0,
                delta={"type": "text_delta", "text": WORDS[i % len(WORDS)]},
            )
            for i in range(out)
        ),
        _claude_event("content_block_stop", index=0),
        _claude_event(
            "message_delta",
            delta={"stop_reason": stop, "stop_sequence": None},
            usage={"output_tokens": out},
        ),
        _claude_event("message_stop"),
    ]
    response = web.StreamResponse()
    response.content_type = "text/event-stream"
    await response.prepare(request)
    for event in events:
        await response.write(event)
    await response.write_eof()
    return response


def _claude_words(content: Any) -> int:
    if isinstance(content, str):
        return _words(content)
    blocks = content if isinstance(content, list) else []
    return sum(_words(b.get("text")) for b in blocks if isinstance(b, dict))


def _claude_event(kind: str, **fields: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n".encode()
