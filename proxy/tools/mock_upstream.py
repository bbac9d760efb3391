"""A deterministic fake upstream for tests, demos and load tests: OpenAI's API, Anthropic's
Messages API and Azure OpenAI's paths.

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

**Anthropic** (``POST /v1/messages`` and ``/v1/messages/count_tokens``): requests need
``x-api-key`` (else 401) and ``anthropic-version`` (else 400); ``max_tokens`` caps the output.
Prompt tokens are the words of ``system`` (a string or text blocks) plus, per message, 4 + the
words of its text (string content, ``text`` blocks, and the text of ``tool_result`` blocks),
plus 3. ``x-mock-cached-tokens`` sets cache reads, ``x-mock-cache-write-tokens`` and
``x-mock-cache-write-1h-tokens`` cache writes (5-minute and 1-hour), each carved out of the
prompt tokens in that order; ``input_tokens`` is the rest. With ``tool_choice`` ``any`` or
``tool`` the answer is a ``tool_use`` block (the chosen or first tool) whose input is
``{"text": <the words>}``. Streams follow Anthropic's event sequence (``message_start`` with the
input usage, ``content_block_start``, ``ping``, one ``content_block_delta`` per word,
``content_block_stop``, ``message_delta`` with the output usage, ``message_stop``). Errors are
in Anthropic's shape. Answers carry an upstream account's ``anthropic-ratelimit-*`` and
``anthropic-organization-id`` headers, which the proxy must not pass on.

**Azure** (``/openai/deployments/{deployment}/{chat/completions,completions,embeddings}``
with an ``api-version`` query, ``/openai/responses`` likewise, and ``/openai/v1/…``): the
OpenAI handlers behind Azure's paths, requiring an ``api-key`` header (else 401).

``MockOptions(status=…)`` answers every request with that error status, for upstreams that
must fail (fallback tests).
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
from typing import Any, Literal

from aiohttp import web

from proxy.tools import mock_google

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


_MAX_DIM = 3072


@dataclass(frozen=True)
class MockOptions:
    latency_ms: float = 0.0
    """Delay before the response starts."""
    output_tokens: int = 16
    """Completion tokens generated when the request sets no lower cap."""
    chunk_delay_ms: float = 0.0
    """Delay between streamed chunks."""
    embedding_dim: int = 8
    models: tuple[str, ...] = (
        "gpt-4o-mini",
        "gpt-4o",
        "text-embedding-3-small",
        "claude-sonnet-4-5",
    )
    status: int | None = None
    """Answer every request with this error status (an upstream that must fail)."""

    def __post_init__(self) -> None:
        if self.latency_ms < 0 or self.chunk_delay_ms < 0 or self.output_tokens < 0:
            raise ValueError("mock latency, chunk delay and output tokens must not be negative")
        if self.embedding_dim < 1:
            raise ValueError("mock embedding_dim must be positive")
        if self.status is not None and not 400 <= self.status <= 599:
            raise ValueError("mock status must be in 400-599")


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]
    """Header names are lower-cased; a header sent twice has its values joined with ", "."""
    body: dict[str, Any] | None
    """The parsed JSON body; None when the request had no body or an invalid one."""
    query: dict[str, str] = field(default_factory=dict)


RECEIVED: web.AppKey[collections.deque[ReceivedRequest]] = web.AppKey(
    "mock_upstream_received", collections.deque
)


@dataclass(frozen=True)
class ReportedUsage:
    """The usage one answer carried to its client (for checking a proxy's books)."""

    path: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int


REPORTED: web.AppKey[collections.deque[ReportedUsage]] = web.AppKey(
    "mock_upstream_reported", collections.deque
)
_REPORTED_MAXLEN = 100_000


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


Dialect = Literal["openai", "anthropic"]
_ANTHROPIC_ERRORS = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_ANTHROPIC_ACCOUNT_HEADERS = {
    "anthropic-ratelimit-requests-limit": "4000",
    "anthropic-ratelimit-requests-remaining": "3999",
    "anthropic-ratelimit-requests-reset": "2026-01-01T00:00:00Z",
    "anthropic-organization-id": "org-mock-upstream-account",
}


def _error(
    status: int,
    message: str,
    code: str | None = None,
    param: str | None = None,
    dialect: Dialect = "openai",
) -> web.Response:
    if dialect == "anthropic":
        default = "api_error" if status >= 500 else "invalid_request_error"
        kind = _ANTHROPIC_ERRORS.get(status, default)
        body = _dumps({"type": "error", "error": {"type": kind, "message": message}})
        return web.Response(status=status, body=body, content_type="application/json")
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = _dumps({"error": {"message": message, "type": kind, "code": code, "param": param}})
    return web.Response(status=status, body=body, content_type="application/json")


def _header_dict(request: web.Request) -> dict[str, str]:
    """Repeated headers are joined, as HTTP allows, so a duplicate (e.g. a client's credential
    forwarded beside the upstream's) is visible rather than silently overwritten."""
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


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
    cache_write_tokens: int
    cache_write_1h_tokens: int
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
            cache_write_tokens=_int_header(headers, "x-mock-cache-write-tokens", 0),
            cache_write_1h_tokens=_int_header(headers, "x-mock-cache-write-1h-tokens", 0),
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

    def __init__(
        self,
        options: MockOptions,
        received: collections.deque[ReceivedRequest],
        reported: collections.deque[ReportedUsage],
    ):
        self.options = options
        self.received = received
        self.reported = reported
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
        self, request: web.Request, *, json_body: bool = True, dialect: Dialect = "openai"
    ) -> tuple[_Plan, dict[str, Any]] | web.Response:
        """Log the request, apply its latency and injected status, and parse its JSON body."""
        headers = _header_dict(request)
        body: dict[str, Any] | None = None
        if json_body and (raw := await request.read()):
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                body = parsed
        query = dict(request.query)
        self.received.append(ReceivedRequest(request.method, request.path, headers, body, query))
        plan = self.default_plan
        if any(name.startswith("x-mock-") for name in headers):
            try:
                plan = _Plan.parse(headers, self.options)
            except _BadRequest as exc:
                return _error(400, exc.message, dialect=dialect)
        if plan.latency_s > 0:
            await asyncio.sleep(plan.latency_s)
        status = self.options.status if self.options.status is not None else plan.status
        if status is not None:
            return _error(status, f"mock injected error {status}", dialect=dialect)
        refused = self._credential_missing(request, headers, dialect)
        if refused is not None:
            return refused
        if not json_body:
            return plan, {}
        if body is None:
            return _error(400, "We could not parse the JSON body of your request.", dialect=dialect)
        if not isinstance(body.get("model"), str) or not body["model"]:
            return _error(400, "you must provide a model parameter", param="model", dialect=dialect)
        return plan, body

    def _credential_missing(
        self, request: web.Request, headers: dict[str, str], dialect: Dialect
    ) -> web.Response | None:
        """Anthropic wants ``x-api-key`` and ``anthropic-version``; Azure an ``api-key``."""
        if dialect == "anthropic":
            if not headers.get("x-api-key"):
                return _error(401, "x-api-key header is required", dialect=dialect)
            if not headers.get("anthropic-version"):
                return _error(400, "anthropic-version header is required", dialect=dialect)
        elif request.path.startswith("/openai/"):
            if not headers.get("api-key"):
                return _error(401, "Access denied due to missing subscription key (api-key).")
            if not request.path.startswith("/openai/v1/") and "api-version" not in request.query:
                return _error(400, "Missing required query parameter 'api-version'.")
        return None

    def report(self, request: web.Request, model: str, tokens: _Tokens) -> None:
        """Notes usage that is sent (a buffered answer's, or a stream's that will end)."""
        self.reported.append(
            ReportedUsage(
                request.path,
                model,
                tokens.prompt,
                tokens.completion,
                tokens.cached,
                tokens.reasoning,
            )
        )

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
                self.report(request, model, tokens)
            return web.Response(body=_dumps(out), content_type="application/json")

        sse = _ChunkWriter("chat.completion.chunk", ident, created, model, body, plan)
        if sse.include_usage and plan.fail_after_chunks is None:
            self.report(request, model, tokens)
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
                self.report(request, model, tokens)
            return web.Response(body=_dumps(out), content_type="application/json")

        sse = _ChunkWriter("text_completion", ident, created, model, body, plan)
        if sse.include_usage and plan.fail_after_chunks is None:
            self.report(request, model, tokens)
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
            if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= _MAX_DIM:
                # As OpenAI does: the embedding models stop at 3072 dimensions.
                raise _BadRequest(
                    f"'dimensions' must be a positive integer no greater than {_MAX_DIM}",
                    "dimensions",
                )
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
            self.report(request, body["model"], _Tokens(prompt, 0, 0, 0, False))
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
        streamed = bool(body.get("stream"))
        if not plan.omit_usage and (not streamed or plan.fail_after_chunks is None):
            self.report(request, body["model"], tokens)
        if not streamed:
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

    async def messages(self, request: web.Request) -> web.StreamResponse:
        begun = await self.begin(request, dialect="anthropic")
        if isinstance(begun, web.Response):
            return begun
        plan, body = begun
        try:
            prompt = _anthropic_prompt_tokens(body)
            cap = _cap(body, ("max_tokens",))
            if cap is None:
                raise _BadRequest("max_tokens: Field required", "max_tokens")
            tokens = _tokens(plan, prompt, cap)
        except _BadRequest as exc:
            return _error(400, exc.message, dialect="anthropic")
        usage = _anthropic_usage(plan, tokens)
        tool = _chosen_tool(body)
        stop = "tool_use" if tool else ("max_tokens" if tokens.capped else "end_turn")
        ident, model = self.next_id("msg_"), body["model"]
        headers = {"request-id": self.next_id("req_"), **_ANTHROPIC_ACCOUNT_HEADERS}
        text = _text(tokens.visible)
        if tool:
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": self.next_id("toolu_"),
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
                body=_dumps(message), content_type="application/json", headers=headers
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
                    *(w.strip('"') for w in _visible_words_json(tokens.visible)),
                    '"}',
                )
            ]
        else:
            opening = {"type": "text", "text": ""}
            head = (
                b"event: content_block_delta\ndata: "
                b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":'
            )
            deltas = [head + w.encode() + b"}}\n\n" for w in _visible_words_json(tokens.visible)]
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
        return await _stream(request, plan, pre, deltas, trailer, headers)

    async def count_tokens(self, request: web.Request) -> web.StreamResponse:
        begun = await self.begin(request, dialect="anthropic")
        if isinstance(begun, web.Response):
            return begun
        _plan, body = begun
        try:
            prompt = _anthropic_prompt_tokens(body)
        except _BadRequest as exc:
            return _error(400, exc.message, dialect="anthropic")
        return web.Response(body=_dumps({"input_tokens": prompt}), content_type="application/json")

    async def models(self, request: web.Request) -> web.StreamResponse:
        begun = await self.begin(request, json_body=False)
        if isinstance(begun, web.Response):
            return begun
        return web.Response(body=self.models_body, content_type="application/json")

    async def not_found(self, request: web.Request) -> web.StreamResponse:
        headers = _header_dict(request)
        self.received.append(ReceivedRequest(request.method, request.path, headers, None))
        message = f"Unknown request URL: {request.method} {request.path}."
        dialect: Dialect = "anthropic" if request.path.startswith("/v1/messages") else "openai"
        return _error(404, message, code="not_found", dialect=dialect)


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
            words += _word_count(block.get("text"))
        elif block.get("type") == "tool_result":
            words += _anthropic_text_words(block.get("content"))
    return words


def _anthropic_prompt_tokens(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("messages: at least one message is required", "messages")
    words = _anthropic_text_words(body.get("system"))
    for message in messages:
        if isinstance(message, dict):
            words += 4 + _anthropic_text_words(message.get("content"))
    return words + 3


def _anthropic_usage(plan: _Plan, tokens: _Tokens) -> dict[str, Any]:
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


def _event(kind: str, seq: itertools.count[int], **fields: Any) -> bytes:
    data = json.dumps({"type": kind, "sequence_number": next(seq), **fields}, separators=(",", ":"))
    return f"event: {kind}\ndata: {data}\n\n".encode()


async def _stream(
    request: web.Request,
    plan: _Plan,
    preamble: list[bytes],
    content: list[bytes],
    trailer: list[bytes],
    headers: dict[str, str] | None = None,
) -> web.StreamResponse:
    """Write an SSE stream one chunk per write, as a real upstream trickles tokens out.

    With ``fail_after_chunks`` the connection is closed after that many content chunks, so the
    client sees a chunked body that never terminates properly; with ``stall_after_chunks`` the
    stream goes silent after that many, until the client leaves.
    """
    exchange = request.get(_EXCHANGE)
    response = web.StreamResponse(headers={"Cache-Control": "no-cache", **(headers or {})})
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
    """Build the mock's app; ``app[RECEIVED]`` logs the most recent requests it received,
    ``app[REPORTED]`` the usage its answers carried and ``app[EXCHANGES]`` what it did for
    them."""
    received: collections.deque[ReceivedRequest] = collections.deque(maxlen=_RECEIVED_MAXLEN)
    reported: collections.deque[ReportedUsage] = collections.deque(maxlen=_REPORTED_MAXLEN)
    mock = _Mock(options, received, reported)
    app = web.Application(middlewares=[_record_exchange])
    app[RECEIVED] = received
    app[REPORTED] = reported
    app[EXCHANGES] = collections.deque(maxlen=_RECEIVED_MAXLEN)
    routes: list[tuple[str, str, Callable[[web.Request], Any]]] = [
        ("POST", "/v1/chat/completions", mock.chat_completions),
        ("POST", "/v1/completions", mock.completions),
        ("POST", "/v1/embeddings", mock.embeddings),
        ("POST", "/v1/responses", mock.responses),
        ("GET", "/v1/models", mock.models),
        ("POST", "/v1/messages", mock.messages),
        ("POST", "/v1/messages/count_tokens", mock.count_tokens),
        # Azure OpenAI: dated API versions, and the v1 routes.
        ("POST", "/openai/deployments/{deployment}/chat/completions", mock.chat_completions),
        ("POST", "/openai/deployments/{deployment}/completions", mock.completions),
        ("POST", "/openai/deployments/{deployment}/embeddings", mock.embeddings),
        ("POST", "/openai/responses", mock.responses),
        ("POST", "/openai/v1/chat/completions", mock.chat_completions),
        ("POST", "/openai/v1/completions", mock.completions),
        ("POST", "/openai/v1/embeddings", mock.embeddings),
        ("POST", "/openai/v1/responses", mock.responses),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    mock_google.add_routes(app, options.output_tokens, options.status, lambda *r: received.append(ReceivedRequest(*r)), lambda *u: reported.append(ReportedUsage(*u)))  # noqa: E501
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
