"""OpenAI's API as the mock speaks it: chat completions, completions and embeddings here, the
Responses API in ``openai_responses``; the same handlers serve Azure OpenAI's paths (which
require an ``api-key`` header)."""

from __future__ import annotations

import base64
import json
import struct
import time
import zlib
from typing import Any

from aiohttp import web

from proxy.tools.mock.controls import BadRequest, Plan, Tokens, answer_tokens, requested_cap
from proxy.tools.mock.core import Handler, Mock, error_response, stream_answer
from proxy.tools.mock.text import dumps, visible_words_json, word_count, words_text

_EMBED_MULT = 6364136223846793005
_EMBED_INC = 1442695040888963407
_MASK64 = (1 << 64) - 1
_MAX_DIM = 3072
_FINGERPRINT = "fp_mock"


def content_words(content: Any) -> int:
    """Words of a message's content: a string, or a list of parts with ``text``."""
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        return sum(word_count(p.get("text")) for p in content if isinstance(p, dict))
    return 0


def _input_tokens(value: Any, param: str) -> int:
    """Prompt tokens of a completions prompt or embeddings input."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        total = 0
        for item in value:
            if isinstance(item, str):
                total += len(item.split())
            elif isinstance(item, int):
                total += 1
            elif isinstance(item, list):
                total += len(item)
            else:
                raise BadRequest(f"invalid type in '{param}'", param)
        return total
    raise BadRequest(f"'{param}' must be a string or an array", param)


def _chat_prompt_tokens(messages: Any) -> int:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array", "messages")
    words = sum(content_words(m.get("content")) for m in messages if isinstance(m, dict))
    return words + 4 * len(messages) + 3


def _embedding(item: Any, dim: int) -> list[float]:
    """A unit vector seeded from the input, so equal inputs embed equally."""
    if isinstance(item, str):
        state = zlib.crc32(item.encode("utf-8", "surrogatepass"))
    else:
        state = zlib.crc32(str(item).encode())
    vector: list[float] = []
    for _ in range(dim):
        state = (state * _EMBED_MULT + _EMBED_INC) & _MASK64
        vector.append((state >> 11) / 2**52 - 1.0)
    norm = sum(v * v for v in vector) ** 0.5 or 1.0
    return [v / norm for v in vector]


class OpenAI:
    """The handlers of OpenAI's paths, over the mock's shared state."""

    def __init__(self, mock: Mock) -> None:
        self.mock = mock

    def routes(self) -> list[tuple[str, str, Handler]]:
        chat, completions, embeddings = self.chat_completions, self.completions, self.embeddings
        return [
            ("POST", "/v1/chat/completions", chat),
            ("POST", "/v1/completions", completions),
            ("POST", "/v1/embeddings", embeddings),
            # Azure OpenAI: dated API versions, and the v1 routes.
            ("POST", "/openai/deployments/{deployment}/chat/completions", chat),
            ("POST", "/openai/deployments/{deployment}/completions", completions),
            ("POST", "/openai/deployments/{deployment}/embeddings", embeddings),
            ("POST", "/openai/v1/chat/completions", chat),
            ("POST", "/openai/v1/completions", completions),
            ("POST", "/openai/v1/embeddings", embeddings),
        ]

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        begun = await self.mock.begin(request)
        if isinstance(begun, web.Response):
            return begun
        plan, body = begun
        try:
            prompt = _chat_prompt_tokens(body.get("messages"))
            tokens = answer_tokens(
                plan, prompt, requested_cap(body, ("max_completion_tokens", "max_tokens"))
            )
        except BadRequest as exc:
            return error_response(400, exc.message, param=exc.param)
        finish = "length" if tokens.capped else "stop"
        ident, created, model = self.mock.next_id("chatcmpl-"), int(time.time()), body["model"]
        if not body.get("stream"):
            out: dict[str, Any] = {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "system_fingerprint": _FINGERPRINT,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": words_text(tokens.visible),
                            "refusal": None,
                        },
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
            }
            if not plan.omit_usage:
                out["usage"] = tokens.chat_usage()
                self.mock.report(request, model, tokens)
            return web.Response(body=dumps(out), content_type="application/json")

        sse = _ChunkWriter("chat.completion.chunk", ident, created, model, body, plan)
        if sse.include_usage and plan.fail_after_chunks is None:
            self.mock.report(request, model, tokens)
        end = ',"logprobs":null,"finish_reason":null}'
        role = sse.chunk(
            '{"index":0,"delta":{"role":"assistant","content":"","refusal":null}' + end
        )
        chunks = [
            sse.chunk(f'{{"index":0,"delta":{{"content":{w}}}{end}')
            for w in visible_words_json(tokens.visible)
        ]
        finish_choice = f'{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"{finish}"}}'
        return await stream_answer(request, plan, [role], chunks, sse.ending(finish_choice, tokens))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        begun = await self.mock.begin(request)
        if isinstance(begun, web.Response):
            return begun
        plan, body = begun
        try:
            prompt = _input_tokens(body.get("prompt", ""), "prompt")
            tokens = answer_tokens(
                plan, prompt, requested_cap(body, ("max_completion_tokens", "max_tokens"))
            )
        except BadRequest as exc:
            return error_response(400, exc.message, param=exc.param)
        finish = "length" if tokens.capped else "stop"
        ident, created, model = self.mock.next_id("cmpl-"), int(time.time()), body["model"]
        if not body.get("stream"):
            out: dict[str, Any] = {
                "id": ident,
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": _FINGERPRINT,
                "choices": [
                    {
                        "text": words_text(tokens.visible),
                        "index": 0,
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
            }
            if not plan.omit_usage:
                out["usage"] = tokens.chat_usage()
                self.mock.report(request, model, tokens)
            return web.Response(body=dumps(out), content_type="application/json")

        sse = _ChunkWriter("text_completion", ident, created, model, body, plan)
        if sse.include_usage and plan.fail_after_chunks is None:
            self.mock.report(request, model, tokens)
        chunks = [
            sse.chunk(f'{{"text":{w},"index":0,"logprobs":null,"finish_reason":null}}')
            for w in visible_words_json(tokens.visible)
        ]
        finish_choice = f'{{"text":"","index":0,"logprobs":null,"finish_reason":"{finish}"}}'
        return await stream_answer(request, plan, [], chunks, sse.ending(finish_choice, tokens))

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        begun = await self.mock.begin(request)
        if isinstance(begun, web.Response):
            return begun
        plan, body = begun
        value = body.get("input")
        dim = body.get("dimensions") or self.mock.options.embedding_dim
        try:
            if value is None:
                raise BadRequest("'input' is required", "input")
            prompt = _input_tokens(value, "input")
            if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= _MAX_DIM:
                # As OpenAI does: the embedding models stop at 3072 dimensions.
                raise BadRequest(
                    f"'dimensions' must be a positive integer no greater than {_MAX_DIM}",
                    "dimensions",
                )
        except BadRequest as exc:
            return error_response(400, exc.message, param=exc.param)
        items: list[Any]
        if isinstance(value, str) or (value and isinstance(value[0], int)):
            items = [value]
        else:
            items = value
        if not items:
            return error_response(400, "'input' must not be empty", param="input")
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, item in enumerate(items):
            vector = _embedding(item, dim)
            encoded: list[float] | str = (
                base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode() if as_base64 else vector
            )
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        out: dict[str, Any] = {"object": "list", "data": data, "model": body["model"]}
        if not plan.omit_usage:
            out["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt}
            self.mock.report(request, body["model"], Tokens(prompt, 0, 0, 0, False))
        return web.Response(body=dumps(out), content_type="application/json")


class _ChunkWriter:
    """Renders one chat/completions stream's ``data:`` lines by splicing choices into a fixed
    head, so a whole stream costs one ``json.dumps`` (its usage) rather than one per word."""

    def __init__(
        self,
        kind: str,
        ident: str,
        created: int,
        model: str,
        body: dict[str, Any],
        plan: Plan,
    ) -> None:
        stream_options = body.get("stream_options")
        self.include_usage = (
            isinstance(stream_options, dict)
            and stream_options.get("include_usage") is True
            and not plan.omit_usage
        )
        self.head = (
            f'data: {{"id":"{ident}","object":"{kind}","created":{created},'
            f'"model":{json.dumps(model)},"system_fingerprint":"{_FINGERPRINT}","choices":'
        )
        self.tail = ',"usage":null}\n\n' if self.include_usage else "}\n\n"

    def chunk(self, choice_json: str) -> bytes:
        return f"{self.head}[{choice_json}]{self.tail}".encode()

    def ending(self, finish_choice_json: str, tokens: Tokens) -> list[bytes]:
        """The finishing chunk, the usage chunk if asked for, and ``[DONE]``."""
        out = [self.chunk(finish_choice_json)]
        if self.include_usage:
            usage = json.dumps(tokens.chat_usage(), separators=(",", ":"))
            out.append(f'{self.head}[],"usage":{usage}}}\n\n'.encode())
        out.append(b"data: [DONE]\n\n")
        return out
