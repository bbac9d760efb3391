"""OpenAI's usage, as reported in a buffered answer or a stream, else counted with tiktoken
over the generated text — so a client that hangs up mid-stream still pays for what was
generated.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from proxy.catalog.routes import ModelRoute
from proxy.catalog.tokenizer import count_text
from proxy.dialects.base import Usage, event_data
from proxy.providers.upstream import split_events


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def usage_from_body(endpoint: str, data: Any) -> Usage | None:
    """Reads OpenAI's usage shapes: chat/completions/embeddings, and the Responses API's."""
    if not isinstance(data, dict):
        return None
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None
    if "input_tokens" in usage or endpoint == "responses":
        details_in = usage.get("input_tokens_details") or {}
        details_out = usage.get("output_tokens_details") or {}
        stored = data.get("id") if endpoint == "responses" and data.get("store") else None
        return Usage(
            stored_id=stored if isinstance(stored, str) else None,
            input_tokens=_int(usage.get("input_tokens")),
            output_tokens=_int(usage.get("output_tokens")),
            cached_tokens=_int(
                details_in.get("cached_tokens") if isinstance(details_in, dict) else 0
            ),
            reasoning_tokens=_int(
                details_out.get("reasoning_tokens") if isinstance(details_out, dict) else 0
            ),
        )
    details_in = usage.get("prompt_tokens_details") or {}
    details_out = usage.get("completion_tokens_details") or {}
    return Usage(
        input_tokens=_int(usage.get("prompt_tokens")),
        output_tokens=_int(usage.get("completion_tokens")),
        cached_tokens=_int(details_in.get("cached_tokens") if isinstance(details_in, dict) else 0),
        reasoning_tokens=_int(
            details_out.get("reasoning_tokens") if isinstance(details_out, dict) else 0
        ),
    )


def buffered_usage(endpoint: str, route: ModelRoute, prompt_tokens: int, data: bytes) -> Usage:
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = None
    usage = usage_from_body(endpoint, parsed)
    if usage is not None:
        return usage
    text = _text_of_body(endpoint, parsed)
    output = count_text(route.encoding, text) if text else 0
    return Usage(prompt_tokens, output, reported=False)


def _text_of_body(endpoint: str, data: Any) -> str:
    """Generated text of a buffered answer, for upstreams that report no usage."""
    if not isinstance(data, dict):
        return ""
    parts: list[str] = []
    if endpoint == "responses":
        for item in data.get("output") or ():
            for content in (item.get("content") or ()) if isinstance(item, dict) else ():
                if isinstance(content, dict) and isinstance(content.get("text"), str):
                    parts.append(content["text"])
        return "".join(parts)
    for choice in data.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if isinstance(choice.get("text"), str):
            parts.append(choice["text"])
        message = choice.get("message")
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            parts.append(message["content"])
    return "".join(parts)


class StreamMeter:
    """Follows a stream for the usage the upstream reports, and keeps that chunk from a client
    that did not ask for it.

    Blocks that do not mention usage pass untouched (one substring test each); only a block
    that does is split into events and its usage event decoded. The raw blocks are kept and
    decoded at the end only if no usage ever came, to count the streamed text instead.
    """

    def __init__(
        self,
        endpoint: str,
        route: ModelRoute,
        prompt_tokens: int,
        strip_usage: bool = False,
    ) -> None:
        self.endpoint = endpoint
        self.route = route
        self.prompt_tokens = prompt_tokens
        self.strip_usage = strip_usage
        self.reported: Usage | None = None
        self._raw: list[bytes] = []

    def relay(self, block: bytes) -> bytes:
        """The part of ``block`` the client receives."""
        self._raw.append(block)
        at = _find_usage(block, 0)
        if at < 0:
            return block
        kept: list[bytes] = []
        start = 0
        while at >= 0:
            first, after = _event_around(block, at, start)
            if self._usage_only(block[first:after]):
                kept.append(block[start:first])
                start = after
            at = _find_usage(block, after)
        kept.append(block[start:])
        return b"".join(kept)

    def _usage_only(self, event: bytes) -> bool:
        if b'"usage":{' not in event and b'"usage": {' not in event:
            return False
        payload = event_data(event)
        try:
            parsed = json.loads(payload) if payload else None
        except ValueError:
            return False
        if not isinstance(parsed, dict):
            return False
        if self.endpoint == "responses":
            found = usage_from_body("responses", parsed.get("response"))
        else:
            found = usage_from_body(self.endpoint, parsed)
        if found is None:
            return False
        self.reported = found
        return self.strip_usage and parsed.get("choices") == []

    def usage(self) -> Usage:
        if self.reported is not None:
            return self.reported
        # Each delta on its own, as the upstream generated it: joined, " hel" + "lo" is one
        # token, and the charge would fall below the chunks the client received.
        encoding = self.route.encoding
        output = sum(count_text(encoding, text) for text in self._texts() if text)
        return Usage(input_tokens=self.prompt_tokens, output_tokens=output, reported=False)

    def _texts(self) -> Iterator[str]:
        for block in self._raw:
            for event in split_events(block):
                payload = event_data(event)
                if not payload or payload == b"[DONE]":
                    continue
                try:
                    parsed = json.loads(payload)
                except ValueError:
                    continue
                if isinstance(parsed, dict):
                    yield from _event_texts(self.endpoint, parsed)


def _find_usage(block: bytes, start: int) -> int:
    """Where a usage object (not ``"usage":null``) is mentioned, or -1."""
    tight = block.find(b'"usage":{', start)
    spaced = block.find(b'"usage": {', start)
    if tight < 0 or (0 <= spaced < tight):
        return spaced
    return tight


def _event_around(block: bytes, at: int, floor: int) -> tuple[int, int]:
    """Bounds of the SSE event containing offset ``at`` (not reaching back before ``floor``)."""
    lf, crlf = block.rfind(b"\n\n", floor, at), block.rfind(b"\r\n\r\n", floor, at)
    first = max(lf + 2 if lf >= 0 else floor, crlf + 4 if crlf >= 0 else floor)
    lf, crlf = block.find(b"\n\n", at), block.find(b"\r\n\r\n", at)
    ends = [end for end in (lf + 2 if lf >= 0 else -1, crlf + 4 if crlf >= 0 else -1) if end > 0]
    return first, min(ends) if ends else len(block)


def _event_texts(endpoint: str, event: dict[str, Any]) -> Iterator[str]:
    if endpoint == "responses":
        if event.get("type") in (
            "response.output_text.delta",
            "response.function_call_arguments.delta",
        ) and isinstance(event.get("delta"), str):
            yield event["delta"]
        return
    choices = event.get("choices")
    if not isinstance(choices, list):
        return
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if endpoint == "completions":
            if isinstance(choice.get("text"), str):
                yield choice["text"]
            continue
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            continue
        if isinstance(delta.get("content"), str):
            yield delta["content"]
        for call in delta.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                for part in (function.get("name"), function.get("arguments")):
                    if isinstance(part, str):
                        yield part
