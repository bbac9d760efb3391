"""The usage Gemini reports (``usageMetadata``), buffered and streamed, and upper bounds of it
when a stream is cut short.

``usageMetadata`` (Gemini API and Vertex AI alike): ``promptTokenCount`` is the whole prompt,
``cachedContentTokenCount`` the part of it read from a cache (billed at the cached rate);
``toolUsePromptTokenCount`` the prompt of tool use (code execution, search results) the model
read, billed as input; ``candidatesTokenCount`` the answer and ``thoughtsTokenCount`` the
thinking, both billed as output. In a stream every chunk carries the counts so far, and the
last one carries the final counts.
"""

from __future__ import annotations

import json
from typing import Any

from proxy.dialects import json_array
from proxy.dialects.base import Usage, event_data
from proxy.providers.upstream import split_events


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def usage_of(meta: dict[str, Any]) -> Usage:
    thoughts = _int(meta.get("thoughtsTokenCount"))
    prompt = _int(meta.get("promptTokenCount")) + _int(meta.get("toolUsePromptTokenCount"))
    return Usage(
        input_tokens=prompt,
        output_tokens=_int(meta.get("candidatesTokenCount")) + thoughts,
        cached_tokens=min(_int(meta.get("cachedContentTokenCount")), prompt),
        reasoning_tokens=thoughts,
    )


def _meta(data: Any) -> dict[str, Any] | None:
    if isinstance(data, dict):
        meta = data.get("usageMetadata")
        if isinstance(meta, dict):
            return meta
    return None


def _text_bytes(data: Any) -> int:
    """UTF-8 bytes of the text (and thought text) in a chunk's candidates: what it generated,
    at most one token a byte."""
    total = 0
    candidates = data.get("candidates") if isinstance(data, dict) else None
    for candidate in candidates if isinstance(candidates, list) else ():
        content = candidate.get("content") if isinstance(candidate, dict) else None
        parts = content.get("parts") if isinstance(content, dict) else None
        for part in parts if isinstance(parts, list) else ():
            if not isinstance(part, dict):
                continue
            text = part.get("text")
            if isinstance(text, str):
                total += len(text.encode("utf-8", "surrogatepass"))
            elif "functionCall" in part:
                total += len(json.dumps(part["functionCall"]).encode())
    return total


def _finished(data: Any) -> bool:
    candidates = data.get("candidates") if isinstance(data, dict) else None
    if not isinstance(candidates, list) or not candidates:
        return False
    return all(isinstance(c, dict) and c.get("finishReason") for c in candidates)


def buffered_usage(endpoint: str, prompt_tokens: int, output_cap: int, data: bytes) -> Usage:
    """A whole answer: one object, or (``streamGenerateContent`` without ``alt=sse``) Google's
    JSON array of chunks, whose last usage counts."""
    if endpoint == "countTokens":
        return Usage(0, 0)  # relayed, never charged
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = None
    chunks = parsed if isinstance(parsed, list) else [parsed]
    meta = None
    generated = 0
    for chunk in chunks:
        meta = _meta(chunk) or meta
        generated += _text_bytes(chunk)
    if meta is not None and (endpoint != "streamGenerateContent" or _finished(chunks[-1])):
        usage = usage_of(meta)
        if endpoint in ("embedContent", "batchEmbedContents"):
            usage.output_tokens = 0
        return usage
    if meta is not None:  # an array that ended before its last chunk: as a cut stream
        usage = usage_of(meta)
        usage.output_tokens = max(usage.output_tokens, min(generated, output_cap))
        usage.reported = False
        return usage
    # No usage reported: the input bound, and the answer's text in bytes (both upper bounds).
    return Usage(prompt_tokens, min(generated, output_cap), reported=False)


class StreamMeter:
    """A stream passes byte for byte — ``alt=sse`` events, or the JSON array's elements as
    each completes (told apart by the first byte: ``[``); each chunk's cumulative usage is
    noted, and the text it carries measured, so a stream cut short is charged an upper bound."""

    __slots__ = ("_array", "_finished", "_generated", "_meta", "_output_cap", "_prompt_tokens")

    def __init__(self, prompt_tokens: int, output_cap: int) -> None:
        self._prompt_tokens = prompt_tokens
        self._output_cap = output_cap
        self._meta: dict[str, Any] | None = None
        self._generated = 0
        self._finished = False
        self._array: bool | None = None

    def relay(self, block: bytes) -> bytes:
        if self._array is None:
            start = block.lstrip()
            if not start:
                return block
            self._array = start.startswith(b"[")
        for chunk in json_array.elements(block) if self._array else self._events(block):
            self._meta = _meta(chunk) or self._meta
            self._generated += _text_bytes(chunk)
            self._finished = self._finished or _finished(chunk)
        return block

    @staticmethod
    def _events(block: bytes) -> list[Any]:
        chunks = []
        for event in split_events(block):
            payload = event_data(event)
            if not payload:
                continue
            try:
                chunks.append(json.loads(payload))
            except ValueError:
                continue
        return chunks

    def usage(self) -> Usage:
        if self._meta is None:
            return Usage(
                self._prompt_tokens, min(self._generated, self._output_cap), reported=False
            )
        usage = usage_of(self._meta)
        if not self._finished:
            usage.output_tokens = max(usage.output_tokens, min(self._generated, self._output_cap))
            usage.reported = False
        return usage
