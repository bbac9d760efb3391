"""A deterministic, OpenAI-compatible fake upstream for tests, demos and load tests.

It stays independent of the proxy's own modules (including ``proxy.errors``), so a bug in the
proxy cannot also hide in the upstream it is tested against.

Generated text: the words of ``WORDS`` in order, repeating. Each one has a leading space and is
exactly one token in tiktoken's ``cl100k_base`` and ``o200k_base``, so tokenizing the text
gives exactly the visible completion tokens. ``completion_tokens = min(output_tokens, cap)``.
The cap is ``max_completion_tokens`` (or else ``max_tokens``) for chat and completions, and
``max_output_tokens`` for responses. ``finish_reason`` is ``"length"`` only when the cap is
below the tokens the mock wanted to produce. Reasoning tokens are counted inside completion
tokens and produce no text, as with OpenAI. So the visible words are
``completion - reasoning``.

Prompt tokens are a cheap count the mock does itself, not tiktoken's. "words" means
``len(text.split())``:

* chat: the sum over messages of (words of the string content, or of the ``text`` of its
  parts) + 4, then + 3;
* completions and embeddings: the words of ``prompt`` / ``input`` (a list of strings is
  summed; a token-id list counts its length; a list of token-id lists sums their lengths);
* responses: the words of ``input``. It may be a string, or a list of items whose
  ``content`` is a string or a list of parts with ``text``. ``instructions`` are not counted.

Headers that change one request (invalid values are a 400):

* ``x-mock-output-tokens: N`` sets the tokens wanted when the request sets no lower cap;
* ``x-mock-cached-tokens: N`` sets cached prompt tokens (at most the prompt tokens);
* ``x-mock-reasoning-tokens: N`` sets reasoning tokens (at most the completion tokens);
* ``x-mock-latency-ms`` / ``x-mock-chunk-delay-ms`` set the delay before the response starts
  and the delay between streamed chunks;
* ``x-mock-status: <400-599>`` sends that status with an OpenAI-shaped error body;
* ``x-mock-fail-after-chunks: N`` sends N content chunks of a stream, then drops the
  connection without the terminating chunk;
* ``x-mock-stall-after-chunks: N`` sends N content chunks of a stream, then goes silent
  (keeps the connection open and sends nothing more until the client leaves);
* ``x-mock-omit-usage: 1`` sends no usage at all (responses: ``"usage": null``).

``app[EXCHANGES]`` records, per request, what the mock wrote and whether its client (the
proxy) went away before the answer was complete (``MockExchange``): tests compare what the
proxy charged with what the upstream actually sent.

A Responses request whose cap cuts the output ends as OpenAI's does: ``status
"incomplete"`` with ``incomplete_details``, and streamed as a ``response.incomplete`` event
instead of ``response.completed``. Both carry usage.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import itertools
import json
import struct
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

WORDS: tuple[str, ...] = (
    " the", " of", " and", " to", " in", " is", " it", " that",
    " for", " on", " with", " as", " was", " at", " by", " be",
    " this", " from", " are", " or", " an", " not", " have", " but",
    " they", " we", " you", " all", " one", " can", " had", " more",
)  # fmt: skip
"""Each word is one token in cl100k_base and o200k_base (checked by the tests)."""

_CYCLE = "".join(WORDS)
_CYCLE_OFFSETS = tuple(itertools.accumulate((len(w) for w in WORDS), initial=0))
_WORDS_JSON = tuple(json.dumps(w) for w in WORDS)
_RECEIVED_MAXLEN = 1000
_FINGERPRINT = "fp_mock"
_EMBED_MULT = 6364136223846793005
_EMBED_INC = 1442695040888963407
_MASK64 = (1 << 64) - 1


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass(frozen=True)
class MockOptions:
    latency_ms: float = 0.0
    """Delay before the response starts."""
    output_tokens: int = 16
    """Completion tokens generated when the request sets no lower cap."""
    chunk_delay_ms: float = 0.0
    """Delay between streamed chunks."""
    embedding_dim: int = 8
    models: tuple[str, ...] = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")

    def __post_init__(self) -> None:
        if self.latency_ms < 0 or self.chunk_delay_ms < 0 or self.output_tokens < 0:
            raise ValueError("mock latency, chunk delay and output tokens must not be negative")
        if self.embedding_dim < 1:
            raise ValueError("mock embedding_dim must be positive")


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]
    """Header names are lower-cased."""
    body: dict[str, Any] | None
    """The parsed JSON body; None when the request had no body or an invalid one."""


RECEIVED: web.AppKey[collections.deque[ReceivedRequest]] = web.AppKey(
    "mock_upstream_received", collections.deque
)


@dataclass
class MockExchange:
    """What the mock did for one request, as it happens."""

    path: str
    transport: Any
    """The request's connection, for tests that look at its kernel queues."""
    started: float
    """``time.monotonic()`` when the request arrived."""
    content_chunks: int = 0
    """Streamed content chunks handed to the connection (one word, one token each)."""
    body_bytes: int = 0
    """Bytes of the streamed body handed to the connection, chunked framing included."""
    content_ends: list[int] = field(default_factory=list)
    """``body_bytes`` after each content chunk: how much must arrive for it to be whole."""
    complete: bool = False
    """The whole answer was handed to the connection."""
    ended: float | None = None
    """``time.monotonic()`` when the handler ended, however it ended."""
    peer_gone: bool = False
    """The client went away (or the handler was cancelled) before the answer was complete."""


EXCHANGES: web.AppKey[collections.deque[MockExchange]] = web.AppKey(
    "mock_upstream_exchanges", collections.deque
)
_EXCHANGE = web.RequestKey("mock_upstream_exchange", MockExchange)


class _BadRequest(Exception):
    """Lets validation deep in a handler end the request with a 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _error(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> web.Response:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = _dumps({"error": {"message": message, "type": kind, "code": code, "param": param}})
    return web.Response(status=status, body=body, content_type="application/json")


def _text(words: int) -> str:
    laps, rest = divmod(words, len(WORDS))
    return _CYCLE * laps + _CYCLE[: _CYCLE_OFFSETS[rest]]


def _word_count(value: Any) -> int:
    return len(value.split()) if isinstance(value, str) else 0


def _content_words(content: Any) -> int:
    """Words of a message's content: a string, or a list of parts with ``text``."""
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        return sum(_word_count(p.get("text")) for p in content if isinstance(p, dict))
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
                raise _BadRequest(f"invalid type in '{param}'", param)
        return total
    raise _BadRequest(f"'{param}' must be a string or an array", param)


def _chat_prompt_tokens(messages: Any) -> int:
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("'messages' must be a non-empty array", "messages")
    words = sum(_content_words(m.get("content")) for m in messages if isinstance(m, dict))
    return words + 4 * len(messages) + 3


def _responses_prompt_tokens(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        total = 0
        for item in value:
            if isinstance(item, str):
                total += len(item.split())
            elif isinstance(item, dict):
                total += _content_words(item.get("content"))
        return total
    raise _BadRequest("'input' must be a string or an array", "input")


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


def _int_header(headers: dict[str, str], name: str, default: int) -> int:
    raw = headers.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _BadRequest(f"header {name} must be an integer") from None
    if value < 0:
        raise _BadRequest(f"header {name} must not be negative")
    return value


def _ms_header(headers: dict[str, str], name: str, default: float) -> float:
    raw = headers.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _BadRequest(f"header {name} must be a number") from None
    if not value >= 0:  # also rejects NaN
        raise _BadRequest(f"header {name} must not be negative")
    return value


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one request asks of the mock, after its x-mock-* headers."""

    output_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    latency_s: float
    chunk_delay_s: float
    status: int | None
    fail_after_chunks: int | None
    stall_after_chunks: int | None
    omit_usage: bool

    @classmethod
    def parse(cls, headers: dict[str, str], options: MockOptions) -> _Plan:
        status = None
        if "x-mock-status" in headers:
            status = _int_header(headers, "x-mock-status", 0)
            if not 400 <= status <= 599:
                raise _BadRequest("header x-mock-status must be in 400-599")
        fail_after = None
        if "x-mock-fail-after-chunks" in headers:
            fail_after = _int_header(headers, "x-mock-fail-after-chunks", 0)
        stall_after = None
        if "x-mock-stall-after-chunks" in headers:
            stall_after = _int_header(headers, "x-mock-stall-after-chunks", 0)
        omit = headers.get("x-mock-omit-usage", "").strip().lower() in ("1", "true", "yes")
        return cls(
            output_tokens=_int_header(headers, "x-mock-output-tokens", options.output_tokens),
            cached_tokens=_int_header(headers, "x-mock-cached-tokens", 0),
            reasoning_tokens=_int_header(headers, "x-mock-reasoning-tokens", 0),
            latency_s=_ms_header(headers, "x-mock-latency-ms", options.latency_ms) / 1000,
            chunk_delay_s=_ms_header(headers, "x-mock-chunk-delay-ms", options.chunk_delay_ms)
            / 1000,
            status=status,
            fail_after_chunks=fail_after,
            stall_after_chunks=stall_after,
            omit_usage=omit,
        )


@dataclass(frozen=True, slots=True)
class _Tokens:
    prompt: int
    cached: int
    completion: int
    reasoning: int
    capped: bool

    @property
    def visible(self) -> int:
        return self.completion - self.reasoning

    def chat_usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": {"cached_tokens": self.cached},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning},
        }

    def responses_usage(self) -> dict[str, Any]:
        return {
            "input_tokens": self.prompt,
            "input_tokens_details": {"cached_tokens": self.cached},
            "output_tokens": self.completion,
            "output_tokens_details": {"reasoning_tokens": self.reasoning},
            "total_tokens": self.prompt + self.completion,
        }


def _cap(body: dict[str, Any], names: Sequence[str]) -> int | None:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _BadRequest(f"'{name}' must be a positive integer", name)
        return value
    return None


def _tokens(plan: _Plan, prompt: int, cap: int | None) -> _Tokens:
    completion = plan.output_tokens if cap is None else min(cap, plan.output_tokens)
    return _Tokens(
        prompt=prompt,
        cached=min(plan.cached_tokens, prompt),
        completion=completion,
        reasoning=min(plan.reasoning_tokens, completion),
        capped=completion < plan.output_tokens,
    )


class _Mock:
    """Holds the handlers' shared state: options, the request log and the id counter."""

    def __init__(self, options: MockOptions, received: collections.deque[ReceivedRequest]):
        self.options = options
        self.received = received
        self.default_plan = _Plan.parse({}, options)
        self.ids = itertools.count(1)
        created = int(time.time())
        self.models_body = _dumps(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": created, "owned_by": "mock"}
                    for m in options.models
                ],
            }
        )

    async def begin(
        self, request: web.Request, *, json_body: bool = True
    ) -> tuple[_Plan, dict[str, Any]] | web.Response:
        """Log the request, apply its latency and injected status, and parse its JSON body."""
        headers = {k.lower(): v for k, v in request.headers.items()}
        body: dict[str, Any] | None = None
        if json_body and (raw := await request.read()):
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                body = parsed
        self.received.append(ReceivedRequest(request.method, request.path, headers, body))
        plan = self.default_plan
        if any(name.startswith("x-mock-") for name in headers):
            try:
                plan = _Plan.parse(headers, self.options)
            except _BadRequest as exc:
                return _error(400, exc.message)
        if plan.latency_s > 0:
            await asyncio.sleep(plan.latency_s)
        if plan.status is not None:
            return _error(plan.status, f"mock injected error {plan.status}")
        if not json_body:
            return plan, {}
        if body is None:
            return _error(400, "We could not parse the JSON body of your request.")
        if not isinstance(body.get("model"), str) or not body["model"]:
            return _error(400, "you must provide a model parameter", param="model")
        return plan, body

    def next_id(self, prefix: str) -> str:
        return f"{prefix}mock{next(self.ids):012d}"

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        begun = await self.begin(request)
        if isinstance(begun, web.Response):
            return begun
        plan, body = begun
        try:
            prompt = _chat_prompt_tokens(body.get("messages"))
            tokens = _tokens(plan, prompt, _cap(body, ("max_completion_tokens", "max_tokens")))
        except _BadRequest as exc:
            return _error(400, exc.message, param=exc.param)
        finish = "length" if tokens.capped else "stop"
        ident, created, model = self.next_id("chatcmpl-"), int(time.time()), body["model"]
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
                            "content": _text(tokens.visible),
                            "refusal": None,
                        },
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
            }
            if not plan.omit_usage:
                out["usage"] = tokens.chat_usage()
            return web.Response(body=_dumps(out), content_type="application/json")

        sse = _ChunkWriter("chat.completion.chunk", ident, created, model, body, plan)
        end = ',"logprobs":null,"finish_reason":null}'
        role = sse.chunk(
            '{"index":0,"delta":{"role":"assistant","content":"","refusal":null}' + end
        )
        chunks = [
            sse.chunk(f'{{"index":0,"delta":{{"content":{w}}}{end}')
            for w in _visible_words_json(tokens.visible)
        ]
        finish_choice = f'{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"{finish}"}}'
        return await _stream(request, plan, [role], chunks, sse.ending(finish_choice, tokens))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        begun = await self.begin(request)
        if isinstance(begun, web.Response):
            return begun
        plan, body = begun
        try:
            prompt = _input_tokens(body.get("prompt", ""), "prompt")
            tokens = _tokens(plan, prompt, _cap(body, ("max_completion_tokens", "max_tokens")))
        except _BadRequest as exc:
            return _error(400, exc.message, param=exc.param)
        finish = "length" if tokens.capped else "stop"
        ident, created, model = self.next_id("cmpl-"), int(time.time()), body["model"]
        if not body.get("stream"):
            out: dict[str, Any] = {
                "id": ident,
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": _FINGERPRINT,
                "choices": [
                    {
                        "text": _text(tokens.visible),
                        "index": 0,
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
            }
            if not plan.omit_usage:
                out["usage"] = tokens.chat_usage()
            return web.Response(body=_dumps(out), content_type="application/json")

        sse = _ChunkWriter("text_completion", ident, created, model, body, plan)
        chunks = [
            sse.chunk(f'{{"text":{w},"index":0,"logprobs":null,"finish_reason":null}}')
            for w in _visible_words_json(tokens.visible)
        ]
        finish_choice = f'{{"text":"","index":0,"logprobs":null,"finish_reason":"{finish}"}}'
        return await _stream(request, plan, [], chunks, sse.ending(finish_choice, tokens))

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        begun = await self.begin(request)
        if isinstance(begun, web.Response):
            return begun
        plan, body = begun
        value = body.get("input")
        dim = body.get("dimensions") or self.options.embedding_dim
        try:
            if value is None:
                raise _BadRequest("'input' is required", "input")
            prompt = _input_tokens(value, "input")
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
                raise _BadRequest("'dimensions' must be a positive integer", "dimensions")
        except _BadRequest as exc:
            return _error(400, exc.message, param=exc.param)
        items: list[Any]
        if isinstance(value, str) or (value and isinstance(value[0], int)):
            items = [value]
        else:
            items = value
        if not items:
            return _error(400, "'input' must not be empty", param="input")
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
        return web.Response(body=_dumps(out), content_type="application/json")

    async def responses(self, request: web.Request) -> web.StreamResponse:
        begun = await self.begin(request)
        if isinstance(begun, web.Response):
            return begun
        plan, body = begun
        try:
            if "input" not in body:
                raise _BadRequest("'input' is required", "input")
            prompt = _responses_prompt_tokens(body["input"])
            tokens = _tokens(plan, prompt, _cap(body, ("max_output_tokens",)))
        except _BadRequest as exc:
            return _error(400, exc.message, param=exc.param)
        ident, msg_id = self.next_id("resp_"), self.next_id("msg_")
        text = _text(tokens.visible)
        final_part = {"type": "output_text", "text": text, "annotations": []}
        message = {
            "id": msg_id,
            "type": "message",
            "status": "incomplete" if tokens.capped else "completed",
            "role": "assistant",
            "content": [final_part],
        }
        response: dict[str, Any] = {
            "id": ident,
            "object": "response",
            "created_at": int(time.time()),
            "status": "incomplete" if tokens.capped else "completed",
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if tokens.capped else None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": body["model"],
            "output": [message],
            "parallel_tool_calls": True,
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "store": body.get("store", True),
            "temperature": body.get("temperature", 1.0),
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": body.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": None if plan.omit_usage else tokens.responses_usage(),
            "user": None,
            "metadata": body.get("metadata") or {},
        }
        if not body.get("stream"):
            return web.Response(body=_dumps(response), content_type="application/json")

        seq = itertools.count()
        started = {
            **response,
            "status": "in_progress",
            "incomplete_details": None,
            "output": [],
            "usage": None,
        }
        item_ref = {"item_id": msg_id, "output_index": 0, "content_index": 0}
        empty_item = {**message, "status": "in_progress", "content": []}
        empty_part = {"type": "output_text", "text": "", "annotations": []}
        pre = [
            _event("response.created", seq, response=started),
            _event("response.in_progress", seq, response=started),
            _event("response.output_item.added", seq, output_index=0, item=empty_item),
            _event("response.content_part.added", seq, **item_ref, part=empty_part),
        ]
        delta_head = (
            'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
            '"sequence_number":'
        )
        delta_mid = f',"item_id":"{msg_id}","output_index":0,"content_index":0,"delta":'
        chunks = [
            f'{delta_head}{next(seq)}{delta_mid}{w},"logprobs":[]}}\n\n'.encode()
            for w in _visible_words_json(tokens.visible)
        ]
        last = "response.incomplete" if tokens.capped else "response.completed"
        trailer = [
            _event("response.output_text.done", seq, **item_ref, text=text, logprobs=[]),
            _event("response.content_part.done", seq, **item_ref, part=final_part),
            _event("response.output_item.done", seq, output_index=0, item=message),
            _event(last, seq, response=response),
        ]
        return await _stream(request, plan, pre, chunks, trailer)

    async def models(self, request: web.Request) -> web.StreamResponse:
        begun = await self.begin(request, json_body=False)
        if isinstance(begun, web.Response):
            return begun
        return web.Response(body=self.models_body, content_type="application/json")

    async def not_found(self, request: web.Request) -> web.StreamResponse:
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.received.append(ReceivedRequest(request.method, request.path, headers, None))
        message = f"Unknown request URL: {request.method} {request.path}."
        return _error(404, message, code="not_found")


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
        plan: _Plan,
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

    def ending(self, finish_choice_json: str, tokens: _Tokens) -> list[bytes]:
        """The finishing chunk, the usage chunk if asked for, and ``[DONE]``."""
        out = [self.chunk(finish_choice_json)]
        if self.include_usage:
            usage = json.dumps(tokens.chat_usage(), separators=(",", ":"))
            out.append(f'{self.head}[],"usage":{usage}}}\n\n'.encode())
        out.append(b"data: [DONE]\n\n")
        return out


def _visible_words_json(count: int) -> list[str]:
    laps, rest = divmod(count, len(_WORDS_JSON))
    return list(_WORDS_JSON) * laps + list(_WORDS_JSON[:rest])


def _event(kind: str, seq: itertools.count[int], **fields: Any) -> bytes:
    data = json.dumps({"type": kind, "sequence_number": next(seq), **fields}, separators=(",", ":"))
    return f"event: {kind}\ndata: {data}\n\n".encode()


async def _stream(
    request: web.Request,
    plan: _Plan,
    preamble: list[bytes],
    content: list[bytes],
    trailer: list[bytes],
) -> web.StreamResponse:
    """Write an SSE stream one chunk per write, as a real upstream trickles tokens out.

    With ``fail_after_chunks`` the connection is closed after that many content chunks, so the
    client sees a chunked body that never terminates properly; with ``stall_after_chunks`` the
    stream goes silent after that many, until the client leaves.
    """
    exchange = request.get(_EXCHANGE)
    response = web.StreamResponse(headers={"Cache-Control": "no-cache"})
    response.content_type = "text/event-stream"
    await response.prepare(request)
    failing = plan.fail_after_chunks is not None
    stalling = plan.stall_after_chunks is not None
    if failing:
        content = content[: plan.fail_after_chunks]
        trailer = []
    elif stalling:
        content = content[: plan.stall_after_chunks]
        trailer = []
    delay = plan.chunk_delay_s
    first = True
    for is_content, chunk in itertools.chain(
        ((False, c) for c in preamble), ((True, c) for c in content), ((False, c) for c in trailer)
    ):
        if delay > 0 and not first:
            await asyncio.sleep(delay)
        first = False
        await response.write(chunk)
        if exchange is not None:
            exchange.body_bytes += len(chunk) + len(f"{len(chunk):x}") + 4  # chunked framing
            if is_content:
                exchange.content_chunks += 1
                exchange.content_ends.append(exchange.body_bytes)
    if failing:
        if request.transport is not None:
            # close() flushes what was written, then drops the connection mid-body; aiohttp
            # then ignores the ConnectionError from finishing the response.
            request.transport.close()
        return response
    if stalling:
        await asyncio.Event().wait()  # silent until the client leaves (the handler is cancelled)
    await response.write_eof()
    if exchange is not None:
        exchange.complete = True
    return response


@web.middleware
async def _record_exchange(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    exchange = MockExchange(request.path, request.transport, time.monotonic())
    request.app[EXCHANGES].append(exchange)
    request[_EXCHANGE] = exchange
    try:
        response = await handler(request)
    except (asyncio.CancelledError, ConnectionError):
        exchange.peer_gone = True
        raise
    finally:
        exchange.ended = time.monotonic()
    if isinstance(response, web.Response):  # written whole by aiohttp after the handler
        exchange.complete = True
    return response


def build_mock_app(options: MockOptions = MockOptions()) -> web.Application:
    """Build the mock's app; ``app[RECEIVED]`` logs the most recent requests it received and
    ``app[EXCHANGES]`` what it did for them."""
    received: collections.deque[ReceivedRequest] = collections.deque(maxlen=_RECEIVED_MAXLEN)
    mock = _Mock(options, received)
    app = web.Application(middlewares=[_record_exchange])
    app[RECEIVED] = received
    app[EXCHANGES] = collections.deque(maxlen=_RECEIVED_MAXLEN)
    routes: list[tuple[str, str, Callable[[web.Request], Any]]] = [
        ("POST", "/v1/chat/completions", mock.chat_completions),
        ("POST", "/v1/completions", mock.completions),
        ("POST", "/v1/embeddings", mock.embeddings),
        ("POST", "/v1/responses", mock.responses),
        ("GET", "/v1/models", mock.models),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    app.router.add_route("*", "/{tail:.*}", mock.not_found)
    return app


def run_mock(host: str, port: int, options: MockOptions) -> None:
    """Serve the mock until interrupted, on uvloop when installed, without access logs."""
    loop: asyncio.AbstractEventLoop | None = None
    try:
        import uvloop
    except ImportError:
        pass
    else:
        loop = uvloop.new_event_loop()
    web.run_app(build_mock_app(options), host=host, port=port, access_log=None, loop=loop)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m proxy.tools.mock_upstream``: run the mock for demos and load tests."""
    defaults = MockOptions()
    parser = argparse.ArgumentParser(description="Run the mock OpenAI-compatible upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9999)
    parser.add_argument("--latency-ms", type=float, default=defaults.latency_ms)
    parser.add_argument("--output-tokens", type=int, default=defaults.output_tokens)
    parser.add_argument("--chunk-delay-ms", type=float, default=defaults.chunk_delay_ms)
    parser.add_argument("--embedding-dim", type=int, default=defaults.embedding_dim)
    args = parser.parse_args(argv)
    options = MockOptions(
        latency_ms=args.latency_ms,
        output_tokens=args.output_tokens,
        chunk_delay_ms=args.chunk_delay_ms,
        embedding_dim=args.embedding_dim,
    )
    run_mock(args.host, args.port, options)


if __name__ == "__main__":
    main()
