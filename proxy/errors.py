"""Errors in the shape of the route's own API: OpenAI's everywhere, Anthropic's on the Messages
routes (so each official SDK maps them to its own exception classes).

One exception type, ``ApiError``, is raised everywhere; the error middleware renders it in the
dialect of the request's path, which also covers errors raised before any handler runs (auth,
413, unknown paths under ``/v1/messages``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

M = TypeVar("M", bound=BaseModel)

Dialect = Literal["openai", "anthropic"]
_ANTHROPIC_PREFIXES = ("/v1/messages", "/api/v1/llm/messages", "/api/v1/llm/v1/messages")
# Anthropic's documented error types by status; any other 4xx is an invalid_request_error and
# any other 5xx an api_error.
_ANTHROPIC_TYPES = {
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def dialect_of(path: str) -> Dialect:
    """Anthropic's Messages routes (and anything under them) answer in Anthropic's shape."""
    return "anthropic" if path.startswith(_ANTHROPIC_PREFIXES) else "openai"


def anthropic_error_type(status: int) -> str:
    return _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


class ApiError(Exception):
    """Raised anywhere in a handler; the error middleware renders it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        self.details = dict(details or {})
        """Extra members of the error object, for programs (e.g. the budget that refused)."""

    def response(self, dialect: Dialect = "openai") -> web.Response:
        return error_response(
            self.status,
            self.message,
            type=self.type,
            code=self.code,
            param=self.param,
            headers=self.headers,
            dialect=dialect,
            details=self.details,
        )

    def body(self, dialect: Dialect = "openai") -> Any:
        type_ = anthropic_error_type(self.status) if dialect == "anthropic" else self.type
        return json.loads(
            error_body(self.message, type_, self.code, self.param, dialect, self.details)
        )


class _ErrorShape(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)


class OpenAIErrorDetail(_ErrorShape):
    message: str
    type: str = Field(description="`invalid_request_error`, `authentication_error`, "
                      "`permission_error`, `rate_limit_error`, `server_error`, ...")  # fmt: skip
    code: str | None
    param: str | None = Field(description="The body field or query parameter at fault.")


class OpenAIError(_ErrorShape):
    """The body of every error outside the Messages routes (what ``error_body`` writes)."""

    error: OpenAIErrorDetail


class AnthropicErrorDetail(_ErrorShape):
    type: str
    message: str


class AnthropicError(_ErrorShape):
    """The body of errors on the Messages routes, as Anthropic's API writes them."""

    type: Literal["error"] = "error"
    error: AnthropicErrorDetail


def error_body(
    message: str,
    type: str,
    code: str | None,
    param: str | None,
    dialect: Dialect = "openai",
    details: Mapping[str, Any] | None = None,
) -> bytes:
    """Anthropic's shape has no code or param: its ``error.type`` follows the status."""
    if dialect == "anthropic":
        error = {"type": type, "message": message, **(details or {})}
        return json.dumps({"type": "error", "error": error}, separators=(",", ":")).encode()
    openai_error = {"message": message, "type": type, "code": code, "param": param}
    openai_error.update(details or {})
    return json.dumps({"error": openai_error}, separators=(",", ":")).encode()


def error_response(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
    dialect: Dialect = "openai",
    details: Mapping[str, Any] | None = None,
) -> web.Response:
    if dialect == "anthropic":
        type = anthropic_error_type(status)
    return web.Response(
        status=status,
        body=error_body(message, type, code, param, dialect, details),
        content_type="application/json",
        headers=headers,
    )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code or "invalid_request")


def not_found(message: str = "Not found", code: str = "not_found") -> ApiError:
    return ApiError(404, message, code=code)


def forbidden(message: str = "This key is not allowed to do that") -> ApiError:
    return ApiError(403, message, type="permission_error", code="forbidden")


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, type="authentication_error", code="invalid_api_key")


def store_unavailable(reason: str | None = None) -> ApiError:
    """``reason`` replaces "is unavailable" when more is known (e.g. no replica in sync)."""
    return ApiError(
        503,
        f"The limit store (Redis) {reason or 'is unavailable'}; the request was not forwarded.",
        type="server_error",
        code="store_unavailable",
    )


def invalid_input(exc: ValidationError) -> ApiError:
    """A pydantic failure as a 400 naming the first offending field."""
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "Unknown field"
    where = f"'{param}': " if param else ""
    return ApiError(
        400, f"Invalid request body: {where}{message}.", param=param, code="invalid_value"
    )


def parse_body(model: type[M], data: object) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_input(exc) from None
