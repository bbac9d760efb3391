"""What a run counted: per-key usage as the upstream reported it (buffered bodies and the
usage-bearing chunks of streams), statuses, rejections by ``error.code`` and latencies."""

from __future__ import annotations

import json
import re
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

_USAGE_NULL = re.compile(rb'"usage"\s*:\s*null')


@dataclass
class KeyUsage:
    """What the upstream reported for one key's successful requests."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_nano: int = 0
    cache_write_tokens: int = 0
    """Anthropic: prompt tokens written to the cache (5-minute and 1-hour)."""

    def add(self, other: KeyUsage) -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cached_tokens += other.cached_tokens
        self.cost_nano += other.cost_nano
        self.cache_write_tokens += other.cache_write_tokens

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Tally:
    """Raw results; latencies in seconds, kept compactly (a long run has many)."""

    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    transport_errors: Counter[str] = field(default_factory=Counter)
    latency_all: array[float] = field(default_factory=lambda: array("d"))
    latency_buffered: array[float] = field(default_factory=lambda: array("d"))
    latency_streamed: array[float] = field(default_factory=lambda: array("d"))
    first_byte_streamed: array[float] = field(default_factory=lambda: array("d"))
    usage_missing: int = 0
    per_key: list[KeyUsage] = field(default_factory=list)
    elapsed: float = 0.0
    interrupted: bool = False
    late_starts: int = 0
    """Fixed rate only: requests sent more than ``LATE_START_S`` after their scheduled time."""
    last_send: float = 0.0
    """Fixed rate only: when the last request went out, in seconds since the start."""


def error_code(status: int, data: bytes) -> str:
    try:
        error = json.loads(data).get("error")
        # Anthropic's errors carry no code: their type (rate_limit_error, …) stands in.
        code = (error.get("code") or error.get("type")) if isinstance(error, dict) else None
    except (ValueError, AttributeError):
        code = None
    return code if isinstance(code, str) and code else f"http_{status}"


def usage_of_stream(data: bytes) -> dict[str, Any] | None:
    """The last chunk that carries usage; only such chunks are parsed."""
    for line in reversed(data.splitlines()):
        if not line.startswith(b"data:") or b'"usage"' not in line or _USAGE_NULL.search(line):
            continue
        try:
            usage = json.loads(line[5:]).get("usage")
        except (ValueError, AttributeError):
            continue
        if isinstance(usage, dict):
            return usage
    return None


def anthropic_usage_of_stream(data: bytes) -> dict[str, Any] | None:
    """``message_start``'s usage (input and cache counts) updated by every ``message_delta``
    (the output, cumulative); None when the stream never reported its final usage."""
    usage: dict[str, Any] = {}
    final = False
    for line in data.splitlines():
        if not line.startswith(b"data:") or b'"usage"' not in line:
            continue
        try:
            event = json.loads(line[5:])
        except ValueError:
            continue
        if event.get("type") == "message_start":
            usage.update((event.get("message") or {}).get("usage") or {})
        elif event.get("type") == "message_delta" and isinstance(event.get("usage"), dict):
            usage.update({k: v for k, v in event["usage"].items() if v is not None})
            final = True
    return usage if final else None


def usage_of_body(data: bytes) -> dict[str, Any] | None:
    try:
        usage = json.loads(data).get("usage")
    except (ValueError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None


def count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
