"""OpenAI's image generation (``/v1/images/generations``), metered by tokens.

The image models OpenAI serves today (``gpt-image-1`` and its siblings) report ``usage`` in
tokens, so a request reserves its prompt (counted) plus ``n`` x the model's output cap per
image (``max_output_tokens``: the most tokens one image of the largest size and highest
quality costs, 6240 for ``gpt-image-1``), and settles from the reported usage. An answer
without usage (a model priced per image, ``dall-e-3``) is settled at the cap of each image
returned: configure such a model with ``max_output_tokens = 1`` and its highest per-image
price as the ``output`` price per 1M, and an image costs exactly that. Streamed generations
(``partial_images``) settle from the ``image_generation.completed`` event's usage.
"""

from __future__ import annotations

import json
from typing import Any

from proxy.catalog.pricing import cost_nano
from proxy.catalog.routes import ModelRoute
from proxy.catalog.tokenizer import count_text
from proxy.dialects import openai_usage
from proxy.dialects.base import Reservation, Usage, event_data
from proxy.errors import bad_request
from proxy.providers.upstream import split_events

MAX_IMAGES = 10
"""OpenAI's own maximum for ``n``."""
MAX_PARTIAL_IMAGES = 3
PARTIAL_IMAGE_TOKENS = 100
"""OpenAI bills each partial image of a stream as 100 output tokens more."""


def _count(body: dict[str, Any], name: str, low: int, high: int, default: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad_request(f"'{name}' must be an integer from {low} to {high}.", param=name)
    return value


def reserve(body: dict[str, Any], route: ModelRoute) -> Reservation:
    """The worst case of an image request: its prompt plus every image at the cap."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise bad_request("'prompt' must be a non-empty string.", param="prompt")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean.", param="stream")
    images = _count(body, "n", 1, MAX_IMAGES, 1)
    partial = _count(body, "partial_images", 0, MAX_PARTIAL_IMAGES, 0) if stream else 0
    per_image = route.max_output_tokens + partial * PARTIAL_IMAGE_TOKENS
    prompt_tokens = count_text(route.encoding, prompt)
    output = images * per_image
    cost = cost_nano(route.price, prompt_tokens, output)
    return Reservation(prompt_tokens, output, cost, stream, "n" if images > 1 else None, images)


def buffered_usage(route: ModelRoute, prompt_tokens: int, output_cap: int, data: bytes) -> Usage:
    """As reported; else each image returned at the cap per image (never more than reserved)."""
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = None
    usage = openai_usage.usage_from_body("images", parsed)
    if usage is not None:
        return usage
    images = parsed.get("data") if isinstance(parsed, dict) else None
    returned = len(images) if isinstance(images, list) else 0
    output = min(output_cap, returned * route.max_output_tokens)
    return Usage(prompt_tokens, output if returned else output_cap, reported=False)


class StreamMeter:
    """The completed events' usage (one per image, summed); a stream that reported none is
    charged its whole reservation: images are not counted from what was relayed."""

    def __init__(self, prompt_tokens: int, output_cap: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.output_cap = output_cap
        self._seen: list[Usage] = []

    def relay(self, block: bytes) -> bytes:
        if b'"usage"' not in block:
            return block
        for event in split_events(block):
            payload = event_data(event) if b'"usage"' in event else None
            try:
                parsed = json.loads(payload) if payload else None
            except ValueError:
                continue
            usage = openai_usage.usage_from_body("images", parsed)
            if usage is not None:
                self._seen.append(usage)
        return block

    def usage(self) -> Usage:
        if not self._seen:
            return Usage(self.prompt_tokens, self.output_cap, reported=False)
        total = Usage(0, 0)
        for usage in self._seen:
            total.input_tokens = max(total.input_tokens, usage.input_tokens)
            total.output_tokens += usage.output_tokens
            total.cached_tokens = max(total.cached_tokens, usage.cached_tokens)
        return total
