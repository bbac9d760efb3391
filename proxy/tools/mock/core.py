"""The state every protocol's handlers share (options, the request logs, the id counter),
the steps every request takes first (log it, apply its controls, check its credential, parse
its JSON), error answers in each protocol's shape, and the streaming writer."""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from aiohttp import web

from proxy.tools.mock import sigv4
from proxy.tools.mock.controls import BadRequest, Plan, Tokens, header_dict
from proxy.tools.mock.records import (
    EXCHANGE,
    MockOptions,
    ReceivedRequest,
    ReportedUsage,
)
from proxy.tools.mock.text import dumps

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Dialect = Literal["openai", "anthropic", "bedrock"]
_ANTHROPIC_ERRORS = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
BEDROCK_ERRORS = {
    400: "ValidationException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    408: "ModelTimeoutException",
    424: "ModelErrorException",
    429: "ThrottlingException",
    500: "InternalServerException",
    503: "ServiceUnavailableException",
}


def error_response(
    status: int,
    message: str,
    code: str | None = None,
    param: str | None = None,
    dialect: Dialect = "openai",
) -> web.Response:
    if dialect == "bedrock":
        kind = code or BEDROCK_ERRORS.get(status, "ValidationException")
        return web.Response(
            status=status,
            body=dumps({"message": message}),
            content_type="application/json",
            headers={"x-amzn-ErrorType": f"{kind}:http://internal.amazon.com/coral/"},
        )
    if dialect == "anthropic":
        default = "api_error" if status >= 500 else "invalid_request_error"
        kind = _ANTHROPIC_ERRORS.get(status, default)
        body = dumps({"type": "error", "error": {"type": kind, "message": message}})
        return web.Response(status=status, body=body, content_type="application/json")
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = dumps({"error": {"message": message, "type": kind, "code": code, "param": param}})
    return web.Response(status=status, body=body, content_type="application/json")


STORED_MAX = 10_000
"""Stored responses the mock keeps (the oldest forgotten first)."""


class Mock:
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
        self.default_plan = Plan.parse({}, options)
        self.ids = itertools.count(1)
        self.stored: dict[str, tuple[dict[str, Any], Any]] = {}
        """Responses stored (``store``), by id: the response and its input."""
        created = int(time.time())
        self.models_body = dumps(
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
    ) -> tuple[Plan, dict[str, Any]] | web.Response:
        """Log the request, apply its latency and injected status, and parse its JSON body."""
        headers = header_dict(request)
        body: dict[str, Any] | None = None
        raw = b""
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
                plan = Plan.parse(headers, self.options)
            except BadRequest as exc:
                return error_response(400, exc.message, dialect=dialect)
        if plan.latency_s > 0:
            await asyncio.sleep(plan.latency_s)
        status = self.options.status if self.options.status is not None else plan.status
        if status is not None:
            return error_response(status, f"mock injected error {status}", dialect=dialect)
        if dialect == "bedrock":
            options = self.options
            wrong = sigv4.problem(
                request,
                headers,
                raw,
                options.aws_access_key_id,
                options.aws_secret_access_key,
                options.bedrock_api_key,
            )
            if wrong is not None:
                code = "InvalidSignatureException" if "signature" in wrong else None
                return error_response(403, wrong, code=code, dialect=dialect)
            return plan, body if body is not None else {}
        refused = self._credential_missing(request, headers, dialect)
        if refused is not None:
            return refused
        if not json_body:
            return plan, {}
        if body is None:
            return error_response(
                400, "We could not parse the JSON body of your request.", dialect=dialect
            )
        if not isinstance(body.get("model"), str) or not body["model"]:
            return error_response(
                400, "you must provide a model parameter", param="model", dialect=dialect
            )
        return plan, body

    def _credential_missing(
        self, request: web.Request, headers: dict[str, str], dialect: Dialect
    ) -> web.Response | None:
        """Anthropic wants ``x-api-key`` and ``anthropic-version``; Azure an ``api-key``."""
        if dialect == "anthropic":
            if not headers.get("x-api-key"):
                return error_response(401, "x-api-key header is required", dialect=dialect)
            if not headers.get("anthropic-version"):
                return error_response(400, "anthropic-version header is required", dialect=dialect)
        elif request.path.startswith("/openai/"):
            if not headers.get("api-key"):
                return error_response(
                    401, "Access denied due to missing subscription key (api-key)."
                )
            if not request.path.startswith("/openai/v1/") and "api-version" not in request.query:
                return error_response(400, "Missing required query parameter 'api-version'.")
        return None

    def report(self, request: web.Request, model: str, tokens: Tokens) -> None:
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

    def store_response(self, response: dict[str, Any], given: Any) -> None:
        """Keeps a stored response for ``openai_stored``: the newest ``STORED_MAX`` only, so
        a long load test cannot grow the mock without bound."""
        if len(self.stored) >= STORED_MAX:
            del self.stored[next(iter(self.stored))]
        self.stored[response["id"]] = (response, given)

    def next_id(self, prefix: str) -> str:
        return f"{prefix}mock{next(self.ids):012d}"

    async def models(self, request: web.Request) -> web.StreamResponse:
        begun = await self.begin(request, json_body=False)
        if isinstance(begun, web.Response):
            return begun
        return web.Response(body=self.models_body, content_type="application/json")

    async def not_found(self, request: web.Request) -> web.StreamResponse:
        headers = header_dict(request)
        self.received.append(ReceivedRequest(request.method, request.path, headers, None))
        message = f"Unknown request URL: {request.method} {request.path}."
        dialect: Dialect = "anthropic" if request.path.startswith("/v1/messages") else "openai"
        return error_response(404, message, code="not_found", dialect=dialect)


async def stream_answer(
    request: web.Request,
    plan: Plan,
    preamble: list[bytes],
    content: list[bytes],
    trailer: list[bytes],
    headers: dict[str, str] | None = None,
    content_type: str = "text/event-stream",
) -> web.StreamResponse:
    """Write an SSE stream one chunk per write, as a real upstream trickles tokens out.

    With ``fail_after_chunks`` the connection is closed after that many content chunks, so the
    client sees a chunked body that never terminates properly; with ``stall_after_chunks`` the
    stream goes silent after that many, until the client leaves.
    """
    exchange = request.get(EXCHANGE)
    response = web.StreamResponse(headers={"Cache-Control": "no-cache", **(headers or {})})
    response.content_type = content_type
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
