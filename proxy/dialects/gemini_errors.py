"""Google's error shape (``google.rpc.Status`` as JSON), for the Gemini dialect: what
``google-genai`` reads to raise its ``ClientError`` / ``ServerError`` with ``code``, ``status``
and ``message``, and the chunk that ends a broken stream."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

from proxy.dialects.base import StreamEnds

# google.rpc.Code names by HTTP status, as Google's APIs map them.
_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    409: "ABORTED",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def status_name(status: int) -> str:
    return _STATUS.get(status, "INTERNAL" if status >= 500 else "FAILED_PRECONDITION")


class _ErrorShape(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)


class GoogleErrorDetail(_ErrorShape):
    code: int
    message: str
    status: str
    details: list[dict[str, Any]]


class GoogleError(_ErrorShape):
    """The body of errors on the Gemini routes, as Google's APIs write them."""

    error: GoogleErrorDetail


def _stream_error(code: int, message: str) -> bytes:
    error = {"code": code, "message": message, "status": status_name(code)}
    return b"data: " + json.dumps({"error": error}).encode() + b"\r\n\r\n"


STREAM_ENDS = StreamEnds(
    broken=_stream_error(
        502, "The upstream stream broke off before it ended; the answer is incomplete."
    ),
    timeout=_stream_error(504, "The upstream did not finish in time; the answer is incomplete."),
)
"""A chunk ``google-genai`` raises on (an ``error`` object), never a normal end."""


def _array_error(code: int, message: str) -> bytes:
    error = {"code": code, "message": message, "status": status_name(code)}
    return b",\r\n" + json.dumps({"error": error}).encode() + b"\r\n]"


ARRAY_ENDS = StreamEnds(
    broken=_array_error(
        502, "The upstream stream broke off before it ended; the answer is incomplete."
    ),
    timeout=_array_error(504, "The upstream did not finish in time; the answer is incomplete."),
)
"""The streamed JSON array's ends: a last element with an ``error`` object, and the array
closed, so a client parsing the whole array sees the error (a stream broken before its first
element leaves ``[,`` — no valid array, never a complete one)."""


def error_body(
    status: int,
    message: str,
    type: str,
    code: str | None,
    param: str | None,
    details: Mapping[str, Any] | None,
) -> bytes:
    """Google's shape: ``code``, ``message``, ``status``, and ``details`` with a
    ``google.rpc.ErrorInfo`` (the proxy's code as ``reason``, the field at fault and
    the refusing budget's name and window in ``metadata``) and, for a refusal, the
    proxy's own account of it (``error.budget`` elsewhere)."""
    metadata = {"type": type}
    if param:
        metadata["param"] = param
    extra = dict(details or {})
    for name, value in extra.items():
        if isinstance(value, Mapping):
            for key, item in value.items():
                if isinstance(item, str | int | float) and not isinstance(item, bool):
                    metadata[f"{name}.{key}"] = str(item)
    info: list[dict[str, Any]] = [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": (code or type).upper(),
            "domain": "llm-proxy",
            "metadata": metadata,
        }
    ]
    if extra:
        info.append({"@type": "type.googleapis.com/llm_proxy.Refusal", **extra})
    error = {"code": status, "message": message, "status": status_name(status)}
    error["details"] = info
    return json.dumps({"error": error}, separators=(",", ":")).encode()
