"""OpenAI's images (``/v1/images/generations``, ``edits`` and ``variations``), metered by
tokens. Edits and variations upload their images as ``multipart/form-data``: each image
uploaded is reserved as input at the cap per image (the reported usage settles it).

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

from proxy.catalog.pricing import reserve_cost_nano
from proxy.catalog.routes import ModelRoute
from proxy.catalog.tokenizer import count_text
from proxy.dialects import openai_usage
from proxy.dialects.base import Reservation, Usage, event_data
from proxy.dialects.form import FormFile
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
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 4:
        value = int(value)  # a form's fields are text
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad_request(f"'{name}' must be an integer from {low} to {high}.", param=name)
    return value


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if isinstance(value, str) and value in ("true", "false"):  # a form's fields are text
        return value == "true"
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be a boolean.", param=name)
    return value


def _input_images(body: dict[str, Any]) -> int:
    """The images an edit or variation uploads (``image``, ``image[]``, ``mask``)."""
    count = 0
    for name in ("image", "image[]", "mask"):
        value = body.get(name)
        items = value if isinstance(value, list) else [value]
        count += sum(1 for item in items if isinstance(item, FormFile))
    if count == 0:
        raise bad_request("Upload the image to edit as the 'image' file.", param="image")
    return count


def reserve(endpoint: str, body: dict[str, Any], route: ModelRoute) -> Reservation:
    """The worst case of an image request: its prompt, each uploaded image (an edit's input,
    bounded like an image generated) and every image generated at the cap."""
    prompt = body.get("prompt")
    if endpoint != "images/variations" and (not isinstance(prompt, str) or not prompt):
        raise bad_request("'prompt' must be a non-empty string.", param="prompt")
    stream = _flag(body, "stream")
    images = _count(body, "n", 1, MAX_IMAGES, 1)
    partial = _count(body, "partial_images", 0, MAX_PARTIAL_IMAGES, 0) if stream else 0
    per_image = route.max_output_tokens + partial * PARTIAL_IMAGE_TOKENS
    prompt_tokens = count_text(route.encoding, prompt) if isinstance(prompt, str) else 0
    if endpoint != "images/generations":
        prompt_tokens += _input_images(body) * route.max_output_tokens
    output = images * per_image
    cost = reserve_cost_nano(route.price, prompt_tokens, output)
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
