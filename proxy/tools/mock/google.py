"""The mock upstream's Google side: the Gemini API, Vertex AI (Gemini and Claude) and an OAuth
token endpoint, over the mock's shared state (``Mock``: its options and records); the
``x-mock-*`` controls are read here, in Google's terms.

**Gemini API** (``/v1beta/models/{model}:{method}``, also ``/v1/``) needs ``x-goog-api-key``;
**Vertex** (``/v1/projects/{p}/locations/{l}/publishers/google/models/{model}:{method}``)
needs ``Authorization: Bearer`` with a token this mock issued. Methods: ``generateContent``,
``streamGenerateContent`` (``?alt=sse`` as events, one word a chunk, else one JSON array),
``countTokens``, ``embedContent``, ``batchEmbedContents``. Prompt tokens: per content 2 + the
words of its text parts (``systemInstruction`` counted like a content), + 1. The answer is
``x-mock-output-tokens`` words per candidate (``candidateCount``), capped by
``maxOutputTokens`` less the thinking; ``x-mock-reasoning-tokens`` is ``thoughtsTokenCount``
(inside the cap), ``x-mock-cached-tokens`` ``cachedContentTokenCount`` and
``x-mock-tool-use-tokens`` ``toolUsePromptTokenCount``. Embeddings report
``usageMetadata.promptTokenCount``. ``x-mock-status``, ``x-mock-latency-ms``,
``x-mock-chunk-delay-ms``, ``x-mock-fail-after-chunks`` and ``x-mock-stall-after-chunks`` work
as for the other dialects; errors are in Google's shape.

**Vertex Claude** (``…/publishers/anthropic/…``): ``proxy.tools.mock.vertex_claude``.

**Token endpoint** (``POST /token``, ``/token/ttl/{seconds}``): a JWT-bearer grant answered
with a fresh ``access_token`` (``expires_in`` 3600 or the path's seconds); ``issued`` counts.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from proxy.tools.mock.core import Handler, Mock
from proxy.tools.mock.records import ReceivedRequest, ReportedUsage

WORDS = (" the", " of", " and", " to", " in", " is", " it", " that")
_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
_METHODS = (
    "generateContent",
    "streamGenerateContent",
    "countTokens",
    "embedContent",
    "batchEmbedContents",
)
_VERTEX = "/v1/projects/{project}/locations/{location}/publishers"


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _error(status: int, message: str) -> web.Response:
    error = {"code": status, "message": message, "status": _STATUS.get(status, "UNKNOWN")}
    return web.Response(
        status=status, body=_dumps({"error": error}), content_type="application/json"
    )


def _words(value: Any) -> int:
    return len(value.split()) if isinstance(value, str) else 0


def _content_tokens(content: Any) -> int:
    if not isinstance(content, dict):
        return 0
    parts = content.get("parts")
    parts = parts if isinstance(parts, list) else []
    return 2 + sum(_words(p.get("text")) for p in parts if isinstance(p, dict))


def _prompt(body: dict[str, Any]) -> int:
    contents = body.get("contents")
    total = 1 + sum(_content_tokens(c) for c in contents) if isinstance(contents, list) else 1
    return total + _content_tokens(body.get("systemInstruction"))


def _int(headers: Any, name: str, default: int = 0) -> int:
    try:
        return max(0, int(headers.get(name, default)))
    except ValueError:
        return default


class Google:
    """The handlers of Google's paths; ``issued`` counts the access tokens it gave out."""

    def __init__(self, mock: Mock) -> None:
        self.mock = mock
        self.output_tokens = mock.options.output_tokens
        self.status = mock.options.status
        self.tokens: set[str] = set()
        self.issued = 0

    def routes(self) -> list[tuple[str, str, Handler]]:
        """``status`` (``MockOptions``) fails every Gemini and Vertex request; the token
        endpoint still works."""
        from proxy.tools.mock import vertex_claude  # it builds on this module

        return [
            *(
                ("POST", prefix + "/{model}:{method}", self.gemini)
                for prefix in ("/v1beta/models", "/v1/models", f"{_VERTEX}/google/models")
            ),
            ("POST", _VERTEX + "/anthropic/models/{model}:{method}", vertex_claude.handler(self)),
            ("POST", "/token", self.token),
            ("POST", "/token/ttl/{ttl:\\d+}", self.token),
        ]

    def report(
        self, path: str, model: str, prompt: int, output: int, cached: int, thoughts: int
    ) -> None:
        self.mock.reported.append(ReportedUsage(path, model, prompt, output, cached, thoughts))

    async def begin(self, request: web.Request, vertex: bool) -> dict[str, Any] | web.Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        parsed = body if isinstance(body, dict) else None
        received = ReceivedRequest(request.method, request.path, headers, parsed, {**request.query})
        self.mock.received.append(received)
        latency = _int(headers, "x-mock-latency-ms")
        if latency:
            await asyncio.sleep(latency / 1000)
        if self.status is not None:  # an upstream that must fail (MockOptions.status)
            return _error(self.status, "mock injected error")
        if "x-mock-status" in headers:
            return _error(_int(headers, "x-mock-status", 500), "mock injected error")
        if vertex:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or token not in self.tokens:
                return _error(401, "Request had invalid authentication credentials.")
        elif not headers.get("x-goog-api-key"):
            return _error(401, "Method doesn't allow unregistered callers.")
        if not isinstance(body, dict):
            return _error(400, "Invalid JSON payload received.")
        return body

    async def gemini(self, request: web.Request) -> web.StreamResponse:
        vertex = request.path.startswith("/v1/projects/")
        body = await self.begin(request, vertex)
        if isinstance(body, web.Response):
            return body
        model, method = request.match_info["model"], request.match_info["method"]
        if method not in _METHODS:
            return _error(404, f"Method {method} not found.")
        prompt = _prompt(body)
        if method == "countTokens":
            inner = body.get("generateContentRequest")
            return web.json_response(
                {"totalTokens": _prompt(inner if isinstance(inner, dict) else body)}
            )
        if method in ("embedContent", "batchEmbedContents"):
            requests = body.get("requests") if method == "batchEmbedContents" else [body]
            requests = requests if isinstance(requests, list) else []
            prompt = sum(
                1 + _content_tokens(r.get("content")) for r in requests if isinstance(r, dict)
            )
            self.report(request.path, model, prompt, 0, 0, 0)
            embeddings = [{"values": [0.125 * (i + 1) for i in range(8)]} for _ in requests]
            meta = {"promptTokenCount": prompt, "totalTokenCount": prompt}
            one = method == "embedContent"
            answer = {"embedding": embeddings[0]} if one else {"embeddings": embeddings}
            return web.json_response({**answer, "usageMetadata": meta})
        headers = request.headers
        config = body.get("generationConfig")
        config = config if isinstance(config, dict) else {}
        cap = _field(config, "maxOutputTokens")
        n = _field(config, "candidateCount") or 1
        wanted = _int(headers, "x-mock-output-tokens", self.output_tokens)
        thoughts = _int(headers, "x-mock-reasoning-tokens")
        if cap is not None:
            thoughts = min(thoughts, cap)
            visible = min(wanted, cap - thoughts)
        else:
            visible = wanted
        meta = {
            "promptTokenCount": prompt,
            "candidatesTokenCount": visible * n,
            "totalTokenCount": prompt + (visible + thoughts) * n,
        }
        if thoughts:
            meta["thoughtsTokenCount"] = thoughts * n
        cached = min(_int(headers, "x-mock-cached-tokens"), prompt)
        if cached:
            meta["cachedContentTokenCount"] = cached
        tool = _int(headers, "x-mock-tool-use-tokens")
        if tool:
            meta["toolUsePromptTokenCount"] = tool
        finish = "MAX_TOKENS" if visible < wanted else "STOP"
        words = [WORDS[i % len(WORDS)] for i in range(visible)]
        if method == "generateContent":
            self.report(
                request.path, model, prompt + tool, (visible + thoughts) * n, cached, thoughts * n
            )
            candidates = [_candidate(i, "".join(words), finish) for i in range(n)]
            return web.json_response(
                {"candidates": candidates, "usageMetadata": meta, "modelVersion": model}
            )
        return await self._stream(
            request, model, words, n, finish, meta, (prompt + tool, cached, thoughts * n)
        )

    async def _stream(
        self,
        request: web.Request,
        model: str,
        words: list[str],
        n: int,
        finish: str,
        meta: dict[str, Any],
        counts: tuple[int, int, int],
    ) -> web.StreamResponse:
        sse = request.query.get("alt") == "sse"
        running = {
            "promptTokenCount": meta["promptTokenCount"],
            "totalTokenCount": meta["promptTokenCount"],
        }
        chunks = [
            {
                "candidates": [_candidate(i, word) for i in range(n)],
                "usageMetadata": running,
                "modelVersion": model,
            }
            for word in words
        ]
        chunks.append(
            {
                "candidates": [_candidate(i, "", finish) for i in range(n)],
                "usageMetadata": meta,
                "modelVersion": model,
            }
        )
        fail = _optional(request.headers, "x-mock-fail-after-chunks")
        stall = _optional(request.headers, "x-mock-stall-after-chunks")
        cut = fail if fail is not None else stall
        if cut is None:
            prompt, cached, thoughts = counts
            self.report(
                request.path,
                model,
                prompt,
                meta["candidatesTokenCount"] + thoughts,
                cached,
                thoughts,
            )
        else:
            chunks = chunks[:cut]
        response = web.StreamResponse(headers={"Cache-Control": "no-cache"})
        response.content_type = "text/event-stream" if sse else "application/json"
        await response.prepare(request)
        delay = _int(request.headers, "x-mock-chunk-delay-ms") / 1000
        for index, chunk in enumerate(chunks):
            if delay and index:
                await asyncio.sleep(delay)
            if sse:
                await response.write(b"data: " + _dumps(chunk) + b"\r\n\r\n")
            else:
                await response.write((b"[" if index == 0 else b",\r\n") + _dumps(chunk))
        if fail is not None:
            if request.transport is not None:
                request.transport.close()
            return response
        if stall is not None:
            await asyncio.Event().wait()
        if not sse:
            await response.write(b"]" if chunks else b"[]")
        await response.write_eof()
        return response

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.mock.received.append(ReceivedRequest(request.method, request.path, {}, None))
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer" or not form.get(
            "assertion"
        ):
            return web.json_response({"error": "invalid_grant"}, status=400)
        self.issued += 1
        token = f"ya29.mock-{self.issued}"
        self.tokens.add(token)
        ttl = int(request.match_info.get("ttl", "3600"))
        return web.json_response({"access_token": token, "expires_in": ttl, "token_type": "Bearer"})


def _optional(headers: Any, name: str) -> int | None:
    return _int(headers, name) if name in headers else None


def _field(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _candidate(index: int, text: str, finish: str | None = None) -> dict[str, Any]:
    candidate = {"content": {"parts": [{"text": text}], "role": "model"}, "index": index}
    return candidate if finish is None else {**candidate, "finishReason": finish}


GOOGLE: web.AppKey[Google] = web.AppKey("mock_google", Google)
"""The app's Google side (tests read ``issued``)."""
