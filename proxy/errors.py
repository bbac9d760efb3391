"""Errors in the shape of the route's own API: OpenAI's everywhere (the proxy's own API speaks
it too), another dialect's on that dialect's routes (so each official SDK maps them to its own
exception classes).

One exception type, ``ApiError``, is raised everywhere; the error middleware renders it in the
shape of the dialect that owns the request's path (``proxy.dialects.for_path``), which also
covers errors raised before any handler runs (auth, 413, unknown paths under
``/v1/messages``). This module is below the dialects: it knows a dialect only as an
``ErrorShape``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

M = TypeVar("M", bound=BaseModel)


class ErrorShape(Protocol):
    """What rendering an error needs of a dialect (``proxy.dialects.base.Dialect``)."""

    def error_body(
        self,
        status: int,
        message: str,
        type: str,
        code: str | None,
        param: str | None,
        details: Mapping[str, Any] | None,
    ) -> bytes: ...

    def error_wire(
        self, status: int, type: str, code: str | None
    ) -> tuple[int, Mapping[str, str] | None]: ...


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

    def response(self, dialect: ErrorShape | None = None) -> web.Response:
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

    def body(self, dialect: ErrorShape | None = None) -> Any:
        if dialect is None:
            return json.loads(
                error_body(self.message, self.type, self.code, self.param, self.details)
            )
        return json.loads(
            dialect.error_body(
                self.status, self.message, self.type, self.code, self.param, self.details
            )
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
    """The body of every error outside another dialect's routes (what ``error_body`` writes)."""

    error: OpenAIErrorDetail


def error_body(
    message: str,
    type: str,
    code: str | None,
    param: str | None,
    details: Mapping[str, Any] | None = None,
) -> bytes:
    """OpenAI's shape: the proxy's own, and the default of every path no dialect claims."""
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
    dialect: ErrorShape | None = None,
    details: Mapping[str, Any] | None = None,
) -> web.Response:
    if dialect is None:
        body = error_body(message, type, code, param, details)
    else:
        body = dialect.error_body(status, message, type, code, param, details)
        status, shape_headers = dialect.error_wire(status, type, code)
        if shape_headers:
            headers = {**(headers or {}), **shape_headers}
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


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
