"""Per-request controls: the ``x-mock-*`` headers (invalid values are a 400) and the token
arithmetic they feed (``completion_tokens = min(output_tokens, cap)``, cached and reasoning
tokens within their bounds)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.tools.mock.records import MockOptions


class BadRequest(Exception):
    """Lets validation deep in a handler end the request with a 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def header_dict(request: web.Request) -> dict[str, str]:
    """Repeated headers are joined, as HTTP allows, so a duplicate (e.g. a client's credential
    forwarded beside the upstream's) is visible rather than silently overwritten."""
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


def _int_header(headers: dict[str, str], name: str, default: int) -> int:
    raw = headers.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"header {name} must be an integer") from None
    if value < 0:
        raise BadRequest(f"header {name} must not be negative")
    return value


def _ms_header(headers: dict[str, str], name: str, default: float) -> float:
    raw = headers.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"header {name} must be a number") from None
    if not value >= 0:  # also rejects NaN
        raise BadRequest(f"header {name} must not be negative")
    return value


@dataclass(frozen=True, slots=True)
class Plan:
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
    def parse(cls, headers: dict[str, str], options: MockOptions) -> Plan:
        status = None
        if "x-mock-status" in headers:
            status = _int_header(headers, "x-mock-status", 0)
            if not 400 <= status <= 599:
                raise BadRequest("header x-mock-status must be in 400-599")
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
class Tokens:
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


def requested_cap(body: dict[str, Any], names: Sequence[str]) -> int | None:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BadRequest(f"'{name}' must be a positive integer", name)
        return value
    return None


def answer_tokens(plan: Plan, prompt: int, cap: int | None) -> Tokens:
    completion = plan.output_tokens if cap is None else min(cap, plan.output_tokens)
    return Tokens(
        prompt=prompt,
        cached=min(plan.cached_tokens, prompt),
        completion=completion,
        reasoning=min(plan.reasoning_tokens, completion),
        capped=completion < plan.output_tokens,
    )
