"""The usage Anthropic's Messages API reports (buffered in the body; streamed in
``message_start`` and ``message_delta``), and upper bounds of it when a stream is cut short.

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

from proxy.dialects.base import Usage, event_data
from proxy.providers.upstream import split_events


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


def _usage(counts: TokenCounts, reported: bool = True) -> Usage:
    return Usage(
        input_tokens=counts.total_input,
        output_tokens=counts.output,
        cached_tokens=counts.cache_read,
        cache_write_tokens=counts.cache_write - counts.cache_write_1h,
        cache_write_1h_tokens=counts.cache_write_1h,
        reported=reported,
    )


def buffered_usage(prompt_tokens: int, output_cap: int, data: bytes) -> Usage:
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = None
    counts = usage_of_message(parsed)
    if counts is not None:
        return _usage(counts)
    # No usage reported: the input bound, and the answer's text in bytes (both upper bounds).
    generated = 0
    content = parsed.get("content") if isinstance(parsed, dict) else None
    for block in content if isinstance(content, list) else ():
        if isinstance(block, dict):
            text = block.get("text") or block.get("thinking")
            if isinstance(text, str):
                generated += len(text.encode("utf-8", "surrogatepass"))
            elif "input" in block:
                generated += len(json.dumps(block["input"]).encode())
    return Usage(prompt_tokens, min(generated, output_cap), reported=False)


def stream_usage(prompt_tokens: int, output_cap: int, tracker: StreamUsage) -> Usage:
    """The upstream's own counts once its final ``message_delta`` arrived; before that, upper
    bounds of what it may bill: the input bound until ``message_start`` reported the input,
    and the bytes of the deltas relayed (at most ``max_tokens``) for the output."""
    if tracker.finished:
        return _usage(tracker.counts)
    counts = tracker.counts
    output = max(counts.output, min(tracker.generated_bytes, output_cap))
    if tracker.started:
        usage = _usage(counts, reported=False)
        usage.output_tokens = output
        return usage
    return Usage(prompt_tokens, output, reported=False)


class StreamMeter:
    """A Messages stream passes byte for byte; its usage events are followed as they pass."""

    __slots__ = ("_output_cap", "_prompt_tokens", "_tracker")

    def __init__(self, prompt_tokens: int, output_cap: int) -> None:
        self._prompt_tokens = prompt_tokens
        self._output_cap = output_cap
        self._tracker = StreamUsage()

    def relay(self, block: bytes) -> bytes:
        self._tracker.observe(split_events(block))
        return block

    def usage(self) -> Usage:
        return stream_usage(self._prompt_tokens, self._output_cap, self._tracker)
