"""What a Bedrock answer cost: Converse's ``usage`` (in the body, or the stream's ``metadata``
event), an Anthropic body's own usage for InvokeModel (streamed chunks carry base64 Anthropic
events), else the ``x-amzn-bedrock-*-token-count`` headers or a stream's
``amazon-bedrock-invocationMetrics``; and upper bounds when a stream is cut short.

Converse's ``inputTokens`` leave out the cache reads and writes, reported beside them
(``cacheReadInputTokens``, ``cacheWriteInputTokens``): the input billed is their sum, as for
Anthropic's own API. A stream that breaks off before its usage is charged as the other
dialects charge it: the prompt's bound and the bytes of text relayed (at most the cap).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from proxy.dialects import anthropic_usage, eventstream
from proxy.dialects.base import Usage

_HEADER = "x-amzn-bedrock-{}-token-count"
_METRICS = "amazon-bedrock-invocationMetrics"


def _int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return 0


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:  # UnicodeDecodeError included
        return None


def converse_usage(usage: Mapping[str, Any]) -> Usage:
    read = _int(usage.get("cacheReadInputTokens"))
    write = _int(usage.get("cacheWriteInputTokens"))
    return Usage(
        input_tokens=_int(usage.get("inputTokens")) + read + write,
        output_tokens=_int(usage.get("outputTokens")),
        cached_tokens=read,
        cache_write_tokens=write,
    )


def metrics_usage(metrics: Mapping[str, Any]) -> Usage:
    """``amazon-bedrock-invocationMetrics`` of an InvokeModel stream's last chunk."""
    read = _int(metrics.get("cacheReadInputTokenCount"))
    write = _int(metrics.get("cacheWriteInputTokenCount"))
    return Usage(
        input_tokens=_int(metrics.get("inputTokenCount")) + read + write,
        output_tokens=_int(metrics.get("outputTokenCount")),
        cached_tokens=read,
        cache_write_tokens=write,
    )


def _header_usage(headers: Mapping[str, str]) -> Usage | None:
    counts = []
    for part in ("input", "output", "cache-read-input", "cache-write-input"):
        raw = headers.get(_HEADER.format(part), "")
        counts.append(int(raw) if raw.isdigit() and len(raw) < 16 else None)
    if counts[0] is None or counts[1] is None:
        return None
    read, write = counts[2] or 0, counts[3] or 0
    return Usage(counts[0] + read + write, counts[1], cached_tokens=read, cache_write_tokens=write)


def buffered_usage(
    endpoint: str, prompt_tokens: int, output_cap: int, data: bytes, headers: Mapping[str, str]
) -> Usage:
    parsed = _json(data)
    if endpoint.startswith("converse"):
        if isinstance(parsed, dict) and isinstance(parsed.get("usage"), dict):
            return converse_usage(parsed["usage"])
    elif isinstance(parsed, dict) and parsed.get("type") == "message":
        return anthropic_usage.buffered_usage(prompt_tokens, output_cap, data)
    found = _header_usage(headers)
    if found is not None:
        return found
    # Nothing reported: the prompt's bound, and the answer's bytes (at most the cap).
    return Usage(prompt_tokens, min(len(data), output_cap), reported=False)


def _delta_bytes(payload: Any) -> int:
    """Text a ``contentBlockDelta`` carries (text, a tool's input, reasoning), in bytes."""
    delta = payload.get("delta") if isinstance(payload, dict) else None
    if not isinstance(delta, dict):
        return 0
    texts = [delta.get("text")]
    if isinstance(delta.get("toolUse"), dict):
        texts.append(delta["toolUse"].get("input"))
    if isinstance(delta.get("reasoningContent"), dict):
        texts.append(delta["reasoningContent"].get("text"))
    return sum(len(t.encode("utf-8", "surrogatepass")) for t in texts if isinstance(t, str))


class StreamMeter:
    """Follows a ConverseStream or InvokeModelWithResponseStream answer frame by frame; the
    frames pass unchanged. A corrupt frame ends the following (its bytes count as output)."""

    __slots__ = ("_anthropic", "_cap", "_generated", "_prompt", "_reported")

    def __init__(self, prompt_tokens: int, output_cap: int) -> None:
        self._prompt = prompt_tokens
        self._cap = output_cap
        self._generated = 0
        self._reported: Usage | None = None
        self._anthropic: anthropic_usage.StreamUsage | None = None

    def relay(self, block: bytes) -> bytes:
        for frame in eventstream.frames(block):
            if frame is None:
                self._generated += len(block)
                break
            headers, payload = frame
            if headers.get(":message-type") == "event":
                self._event(headers.get(":event-type"), payload)
        return block

    def _event(self, kind: str | None, payload: bytes) -> None:
        if kind == "contentBlockDelta":
            parsed = _json(payload)
            self._generated += _delta_bytes(parsed) if parsed is not None else len(payload)
        elif kind == "metadata":
            parsed = _json(payload)
            if isinstance(parsed, dict) and isinstance(parsed.get("usage"), dict):
                self._reported = converse_usage(parsed["usage"])
        elif kind == "chunk":
            self._chunk(payload)

    def _chunk(self, payload: bytes) -> None:
        parsed = _json(payload)
        raw = parsed.get("bytes") if isinstance(parsed, dict) else None
        try:
            decoded = base64.b64decode(raw, validate=True) if isinstance(raw, str) else b""
        except (binascii.Error, ValueError):
            decoded = b""
        if not decoded:
            self._generated += len(payload)
            return
        inner = _json(decoded)
        if isinstance(inner, dict) and isinstance(inner.get(_METRICS), dict):
            self._reported = metrics_usage(inner[_METRICS])
        if isinstance(inner, dict) and isinstance(inner.get("type"), str):  # Anthropic's events
            if self._anthropic is None:
                self._anthropic = anthropic_usage.StreamUsage()
            self._anthropic.observe([b"data: " + decoded + b"\n\n"])
        elif not (isinstance(inner, dict) and _METRICS in inner):
            self._generated += len(decoded)  # another family's text: its bytes bound it

    def usage(self) -> Usage:
        """Anthropic's own final counts, else the invocation metrics or Converse's usage,
        else the Anthropic rule for a stream cut short, else the bounds."""
        tracker = self._anthropic
        if tracker is not None and (tracker.finished or self._reported is None):
            return anthropic_usage.stream_usage(self._prompt, self._cap, tracker)
        if self._reported is not None:
            return self._reported
        return Usage(self._prompt, min(self._generated, self._cap), reported=False)
