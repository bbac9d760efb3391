"""What a request may cost before it runs (the reservation) and what it did cost (usage).

Reservation = prompt tokens (tiktoken) + the request's output cap (times ``n`` choices). Actual
usage comes from the upstream's ``usage`` when reported, else from tiktoken over the text that
was streamed — so a client that hangs up mid-stream still pays for what was generated.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from proxy.errors import bad_request
from proxy.gateway.model_routes import ModelRoute
from proxy.gateway.pricing import Price, cost_nano
from proxy.gateway.tokenizer import count_text
from proxy.providers.upstream import split_events

ENDPOINTS = ("chat/completions", "completions", "embeddings", "responses")
_CAP_FIELDS = {
    "chat/completions": ("max_completion_tokens", "max_tokens"),
    "completions": ("max_tokens",),
    "responses": ("max_output_tokens",),
    "embeddings": (),
}


@dataclass(slots=True)
class Usage:
    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    reported: bool = True
    """False when counted by the proxy because the upstream reported nothing."""
    cache_write_tokens: int = 0
    """Anthropic: input written to the prompt cache with the 5-minute lifetime."""
    cache_write_1h_tokens: int = 0
    """Anthropic: input written to the prompt cache with a 1-hour lifetime."""

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def cost_nano(self, price: Price) -> int:
        return cost_nano(
            price,
            self.input_tokens,
            self.output_tokens,
            self.cached_tokens,
            self.cache_write_tokens,
            self.cache_write_1h_tokens,
        )


MAX_OUTPUT_CAP = 1_000_000_000
"""No model generates a billion tokens in one answer; a larger cap only overflows the books."""
MAX_CHOICES = 128
"""OpenAI's own maximum for ``n``."""
MAX_EXACT = 2**53 - 1
"""Reservations are checked in Lua, whose numbers are doubles: exact only up to here."""


def _positive_int(body: dict[str, Any], name: str, maximum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise bad_request(
            f"'{name}' must be a positive integer no greater than {maximum}.", param=name
        )
    return value


@dataclass(slots=True)
class OutputCap:
    tokens: int
    """Worst-case output tokens, all choices included."""
    param: str | None
    """The request parameter that set it (None: the model's configured maximum)."""
    choices: int = 1


def output_cap(endpoint: str, body: dict[str, Any], route: ModelRoute) -> OutputCap:
    """Worst-case output tokens: the request's own cap, else the model's configured maximum.

    A cap above the configured maximum is reserved as asked, not clamped: the upstream, not
    our configuration, decides what it generates, and a reservation must never be smaller."""
    if endpoint == "embeddings":
        return OutputCap(0, None)
    cap = None
    param = None
    for name in _CAP_FIELDS[endpoint]:
        value = _positive_int(body, name, MAX_OUTPUT_CAP)
        if value is not None and cap is None:
            cap, param = value, name
    choices = 1
    if endpoint in ("chat/completions", "completions"):
        n = _positive_int(body, "n", MAX_CHOICES) or 1
        best_of = _positive_int(body, "best_of", MAX_CHOICES) if endpoint == "completions" else 1
        choices = max(n, best_of or 1)
        if param is None and choices > 1:
            param = "best_of" if (best_of or 1) > n else "n"
    limit = route.max_output_tokens if cap is None else cap
    return OutputCap(limit * choices, param, choices)


def clamped_body(endpoint: str, body: dict[str, Any], cap: int) -> dict[str, Any]:
    """The request with its output cap per choice lowered to ``cap``: every cap parameter it
    set, or the endpoint's own one when it set none (chat: ``max_completion_tokens``, which
    OpenAI's reasoning models require)."""
    names = _CAP_FIELDS[endpoint]
    given = [name for name in names if body.get(name) is not None]
    return {**body, **{name: cap for name in given or names[:1]}}


def check_reservation(tokens: int, cost_nano: int, param: str | None) -> None:
    """A worst case no ledger could record exactly is refused up front (400), before anything
    is reserved: it could never be paid for anyway."""
    if tokens > MAX_EXACT or cost_nano > MAX_EXACT:
        raise bad_request(
            f"This request's worst case ({tokens} tokens, {cost_nano} nano-units) is too large "
            "to account for; lower the output cap or the number of choices.",
            param=param or "max_tokens",
            code="reservation_too_large",
        )


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
        return Usage(
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


class StreamMeter:
    """Follows a stream for the usage the upstream reports, and keeps that chunk from a client
    that did not ask for it.

    Blocks that do not mention usage pass untouched (one substring test each); only a block
    that does is split into events and its usage event decoded. The raw blocks are kept and
    decoded at the end only if no usage ever came, to count the streamed text instead.
    """

    def __init__(
        self, endpoint: str, route: ModelRoute, prompt_tokens: int, strip_usage: bool = False
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
        text = "".join(self._texts())
        output = count_text(self.route.encoding, text) if text else 0
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


def event_data(event: bytes) -> bytes | None:
    """The ``data:`` payload of one SSE event (multi-line data joined), or None."""
    if b"data:" not in event:
        return None
    parts = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(parts) if parts else None


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
