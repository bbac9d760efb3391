"""Anthropic's Messages API as an upstream: its paths, its credential headers, and the usage it
reports (buffered in the body; streamed in ``message_start`` and ``message_delta``).

Usage fields (Messages API): ``input_tokens`` are the input tokens *not* read from or written to
the prompt cache; ``cache_read_input_tokens`` and ``cache_creation_input_tokens`` are the
others, the latter split by lifetime in ``cache_creation.ephemeral_5m_input_tokens`` /
``ephemeral_1h_input_tokens`` when the upstream reports it; ``output_tokens`` (thinking
included) is cumulative in every ``message_delta`` of a stream.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.config import UpstreamConfig

ENDPOINTS = ("messages", "messages/count_tokens")
"""Paths under ``/v1/`` of the proxy and of the upstream."""


def url(upstream: UpstreamConfig, endpoint: str) -> str:
    """``base_url`` is the API's origin (``https://api.anthropic.com``), as Anthropic's SDKs take
    it; the version segment belongs to the path."""
    return f"{upstream.base_url}/v1/{endpoint}"


def credential_headers(
    upstream: UpstreamConfig, client_headers: Mapping[str, str]
) -> list[tuple[str, str]]:
    """The upstream's own key as ``x-api-key``, and the client's ``anthropic-version`` (the
    protocol version its SDK was built for) or the configured default. The client's own
    ``x-api-key`` / ``Authorization`` never get here: they are the proxy key."""
    headers = [("anthropic-version", client_headers.get("anthropic-version") or "")]
    if not headers[0][1]:
        headers[0] = ("anthropic-version", upstream.anthropic_version)
    credential = upstream.credential()
    if credential:
        headers.append(("x-api-key", credential))
    return headers


def _int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


@dataclass(slots=True)
class TokenCounts:
    """One request's usage as Anthropic reports it; ``input`` excludes cache reads/writes."""

    input: int = 0
    cache_read: int = 0
    cache_write: int = 0
    """All cache writes, whatever their lifetime (``cache_creation_input_tokens``)."""
    cache_write_1h: int = 0
    """The part of ``cache_write`` written with a 1-hour lifetime."""
    output: int = 0

    def update(self, usage: Mapping[str, Any]) -> None:
        """Takes every count present; absent or null ones keep their value (a stream's
        ``message_delta`` may carry only ``output_tokens``)."""
        for name, attr in (
            ("input_tokens", "input"),
            ("cache_read_input_tokens", "cache_read"),
            ("cache_creation_input_tokens", "cache_write"),
            ("output_tokens", "output"),
        ):
            value = _int(usage.get(name))
            if value is not None:
                setattr(self, attr, value)
        creation = usage.get("cache_creation")
        if isinstance(creation, Mapping):
            one_hour = _int(creation.get("ephemeral_1h_input_tokens"))
            if one_hour is not None:
                self.cache_write_1h = min(one_hour, self.cache_write)

    @property
    def total_input(self) -> int:
        return self.input + self.cache_read + self.cache_write


def usage_of_message(data: Any) -> TokenCounts | None:
    """The usage of a buffered Messages answer, or None when it reports none."""
    if not isinstance(data, dict) or not isinstance(data.get("usage"), dict):
        return None
    counts = TokenCounts()
    counts.update(data["usage"])
    return counts


def event_data(event: bytes) -> bytes | None:
    """The ``data:`` payload of one SSE event (multi-line data joined), or None."""
    if b"data:" not in event:
        return None
    parts = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(parts) if parts else None


class StreamUsage:
    """Follows a Messages stream for its usage without changing a byte of it.

    Only events that mention ``usage`` are decoded (``message_start`` and ``message_delta``);
    the text of content deltas is measured in UTF-8 bytes so that a stream cut short before
    its final ``message_delta`` is still charged an upper bound of what was generated.
    """

    def __init__(self) -> None:
        self.counts = TokenCounts()
        self.started = False
        """``message_start`` seen: the input counts are the upstream's."""
        self.finished = False
        """``message_delta`` seen: the output count is the upstream's final one."""
        self.generated_bytes = 0

    def observe(self, events: list[bytes]) -> None:
        for event in events:
            if b'"usage"' in event:
                self._usage_event(event)
            elif b"content_block_delta" in event:
                self._delta_event(event)

    def _usage_event(self, event: bytes) -> None:
        parsed = _json(event_data(event))
        if parsed is None:
            return
        kind = parsed.get("type")
        if kind == "message_start" and isinstance(parsed.get("message"), dict):
            usage = parsed["message"].get("usage")
            if isinstance(usage, dict):
                self.counts.update(usage)
                self.started = True
        elif kind == "message_delta" and isinstance(parsed.get("usage"), dict):
            self.counts.update(parsed["usage"])
            self.finished = True

    def _delta_event(self, event: bytes) -> None:
        parsed = _json(event_data(event))
        delta = parsed.get("delta") if parsed is not None else None
        if not isinstance(delta, dict):
            return
        for name in ("text", "partial_json", "thinking"):
            value = delta.get(name)
            if isinstance(value, str):
                self.generated_bytes += len(value.encode("utf-8", "surrogatepass"))


def _json(payload: bytes | None) -> dict[str, Any] | None:
    if not payload:
        return None
    try:
        parsed = json.loads(payload)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


BROKEN_STREAM_EVENT = (
    b'event: error\ndata: {"type":"error","error":{"type":"api_error","message":"The upstream '
    b'stream broke off before it ended; the answer is incomplete."}}\n\n'
)
"""Ends a stream the upstream broke off: the ``anthropic`` SDKs raise on an ``error`` event, so
a truncated answer is never taken for a complete one."""
