"""AWS Bedrock's runtime API as the mock speaks it: ``/model/{modelId}/converse`` and
``converse-stream`` (event-stream frames), ``invoke`` and ``invoke-with-response-stream`` for
Anthropic bodies (``anthropic_version``) and Meta Llama bodies (``prompt``), with Bedrock's
token-count headers and errors (``x-amzn-ErrorType``). Every request must carry a valid SigV4
signature for the test credentials of ``MockOptions`` (or its Bedrock API key).

Converse prompt tokens: the words of ``system`` text blocks plus, per message, 4 + the words of
its text blocks, plus 3; cached tokens (``x-mock-cached-tokens``) and cache writes
(``x-mock-cache-write-tokens``) are carved out of them and reported as
``cacheReadInputTokens`` / ``cacheWriteInputTokens`` beside ``inputTokens`` (the rest).
``x-mock-corrupt-stream: 1`` writes a frame with a wrong CRC after the first delta and ends
the stream there (what a proxy must survive from a bad upstream).
"""

from __future__ import annotations

import base64
import json
from typing import Any

from aiohttp import web

from proxy.tools.mock import frames
from proxy.tools.mock.anthropic import _anthropic_prompt_tokens, _anthropic_usage
from proxy.tools.mock.controls import BadRequest, Plan, Tokens, answer_tokens, requested_cap
from proxy.tools.mock.core import Handler, Mock, error_response, stream_answer
from proxy.tools.mock.text import dumps, word_count, words_text

_ACTIONS = ("converse", "converse-stream", "invoke", "invoke-with-response-stream")


def _converse_prompt(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: at least one message is required")
    words = 0
    for block in body.get("system") or []:
        if isinstance(block, dict):
            words += word_count(block.get("text"))
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), list):
            raise BadRequest("messages: each message needs a content list")
        words += 4 + sum(
            word_count(b.get("text")) for b in message["content"] if isinstance(b, dict)
        )
    return words + 3


def _converse_usage(plan: Plan, tokens: Tokens) -> dict[str, int]:
    rest = tokens.prompt - tokens.cached
    write = min(plan.cache_write_tokens, rest)
    return {
        "inputTokens": rest - write,
        "outputTokens": tokens.completion,
        "totalTokens": tokens.prompt + tokens.completion,
        "cacheReadInputTokens": tokens.cached,
        "cacheWriteInputTokens": write,
    }


def _frame(kind: str, payload: dict[str, Any]) -> bytes:
    return frames.event(kind, dumps(payload))


def _chunk(event: dict[str, Any]) -> bytes:
    return _frame("chunk", {"bytes": base64.b64encode(dumps(event)).decode()})


_EMPTY_TEXT = {"type": "text", "text": ""}


def _text_delta(word: str) -> dict[str, str]:
    return {"type": "text_delta", "text": " " + word}


_CORRUPT = bytearray(frames.event("contentBlockDelta", b'{"contentBlockIndex":0}'))
_CORRUPT[-1] ^= 0xFF  # the message CRC no longer matches


class Bedrock:
    """The handlers of the runtime API's paths, over the mock's shared state."""

    def __init__(self, mock: Mock) -> None:
        self.mock = mock

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [("POST", "/model/{modelId}/" + action, self.handle) for action in _ACTIONS]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        begun = await self.mock.begin(request, dialect="bedrock")
        if isinstance(begun, web.Response):
            return begun
        plan, body = begun
        model = request.match_info["modelId"]
        action = request.path.rpartition("/")[2]
        try:
            if action.startswith("converse"):
                return await self._converse(request, plan, body, model, action == "converse")
            if "anthropic_version" in body:
                return await self._anthropic(request, plan, body, model, action == "invoke")
            if isinstance(body.get("prompt"), str):
                return self._llama(request, plan, body, model)
            raise BadRequest("Malformed input request: no anthropic_version or prompt")
        except BadRequest as exc:
            return error_response(400, exc.message, dialect="bedrock")

    def _headers(self, tokens: Tokens, read: int = 0, write: int = 0) -> dict[str, str]:
        """Input excludes cache reads and writes, which have headers of their own."""
        return {
            "x-amzn-RequestId": self.mock.next_id("req-"),
            "X-Amzn-Bedrock-Input-Token-Count": str(tokens.prompt - read - write),
            "X-Amzn-Bedrock-Output-Token-Count": str(tokens.completion),
            "X-Amzn-Bedrock-Cache-Read-Input-Token-Count": str(read),
            "X-Amzn-Bedrock-Cache-Write-Input-Token-Count": str(write),
            "X-Amzn-Bedrock-Invocation-Latency": "1",
        }

    async def _converse(
        self, request: web.Request, plan: Plan, body: dict[str, Any], model: str, whole: bool
    ) -> web.StreamResponse:
        config = body.get("inferenceConfig") or {}
        cap = requested_cap(config if isinstance(config, dict) else {}, ("maxTokens",))
        tokens = answer_tokens(plan, _converse_prompt(body), cap)
        usage = _converse_usage(plan, tokens)
        stop = "max_tokens" if tokens.capped else "end_turn"
        self.mock.report(request, model, tokens)
        text = words_text(tokens.visible)
        if whole:
            answer = {
                "output": {"message": {"role": "assistant", "content": [{"text": text}]}},
                "stopReason": stop,
                "usage": usage,
                "metrics": {"latencyMs": 1},
            }
            headers = self._headers(
                tokens, usage["cacheReadInputTokens"], usage["cacheWriteInputTokens"]
            )
            return web.Response(
                body=dumps(answer), content_type="application/json", headers=headers
            )
        words = text.split(" ")[1:]
        deltas = [
            _frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": " " + w}})
            for w in words
        ]
        if request.headers.get("x-mock-corrupt-stream") == "1":
            deltas = [*deltas[:1], bytes(_CORRUPT)]
            trailer: list[bytes] = []
        else:
            trailer = [
                _frame("contentBlockStop", {"contentBlockIndex": 0}),
                _frame("messageStop", {"stopReason": stop}),
                _frame("metadata", {"usage": usage, "metrics": {"latencyMs": 1}}),
            ]
        pre = [_frame("messageStart", {"role": "assistant"})]
        return await stream_answer(
            request, plan, pre, deltas, trailer, {}, content_type=frames.CONTENT_TYPE
        )

    async def _anthropic(
        self, request: web.Request, plan: Plan, body: dict[str, Any], model: str, whole: bool
    ) -> web.StreamResponse:
        cap = requested_cap(body, ("max_tokens",))
        if cap is None:
            raise BadRequest("max_tokens: Field required")
        tokens = answer_tokens(plan, _anthropic_prompt_tokens(body), cap)
        usage = _anthropic_usage(plan, tokens)
        stop = "max_tokens" if tokens.capped else "end_turn"
        text = words_text(tokens.visible)
        message = {
            "id": self.mock.next_id("msg_bdrk_"),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {**usage, "output_tokens": tokens.completion},
        }
        self.mock.report(request, model, tokens)
        if whole:
            headers = self._headers(
                tokens, usage["cache_read_input_tokens"], usage["cache_creation_input_tokens"]
            )
            return web.Response(
                body=dumps(message), content_type="application/json", headers=headers
            )
        started = {**message, "content": [], "stop_reason": None}
        started["usage"] = {**usage, "output_tokens": min(1, tokens.completion)}
        pre = [
            _chunk({"type": "message_start", "message": started}),
            _chunk({"type": "content_block_start", "index": 0, "content_block": _EMPTY_TEXT}),
        ]
        deltas = [
            _chunk({"type": "content_block_delta", "index": 0, "delta": _text_delta(w)})
            for w in text.split(" ")[1:]
        ]
        metrics = {
            "inputTokenCount": usage["input_tokens"],
            "outputTokenCount": tokens.completion,
            "invocationLatency": 1,
            "firstByteLatency": 1,
            "cacheReadInputTokenCount": usage["cache_read_input_tokens"],
            "cacheWriteInputTokenCount": usage["cache_creation_input_tokens"],
        }
        trailer = [
            _chunk({"type": "content_block_stop", "index": 0}),
            _chunk(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop, "stop_sequence": None},
                    "usage": {"output_tokens": tokens.completion},
                }
            ),
            _chunk({"type": "message_stop", "amazon-bedrock-invocationMetrics": metrics}),
        ]
        if request.headers.get("x-mock-corrupt-stream") == "1":
            deltas, trailer = [*deltas[:1], bytes(_CORRUPT)], []
        return await stream_answer(
            request, plan, pre, deltas, trailer, {}, content_type=frames.CONTENT_TYPE
        )

    def _llama(
        self, request: web.Request, plan: Plan, body: dict[str, Any], model: str
    ) -> web.Response:
        cap = requested_cap(body, ("max_gen_len",))
        tokens = answer_tokens(plan, word_count(body["prompt"]), cap)
        self.mock.report(request, model, tokens)
        answer = {
            "generation": words_text(tokens.visible),
            "prompt_token_count": tokens.prompt,
            "generation_token_count": tokens.completion,
            "stop_reason": "length" if tokens.capped else "stop",
        }
        return web.Response(
            body=json.dumps(answer), content_type="application/json", headers=self._headers(tokens)
        )
