"""OpenAI-shaped errors: every failure a client sees, on any endpoint, has this one shape."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


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
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        return error_response(
            self.status,
            self.message,
            type=self.type,
            code=self.code,
            param=self.param,
            headers=self.headers,
        )


def error_body(message: str, type: str, code: str | None, param: str | None) -> bytes:
    error = {"message": message, "type": type, "code": code, "param": param}
    return json.dumps({"error": error}, separators=(",", ":")).encode()


def error_response(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        body=error_body(message, type, code, param),
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


def store_unavailable() -> ApiError:
    return ApiError(
        503,
        "The limit store (Redis) is unavailable; the request was not forwarded.",
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
