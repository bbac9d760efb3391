"""OpenAI's ``/v1/images/generations`` as the mock speaks it (``gpt-image-1``'s shape): every
image a 1x1 PNG, usage in tokens — the prompt's words as input, ``x-mock-output-tokens`` per
image as output (plus 100 per partial image of a stream, as OpenAI bills them).
``x-mock-omit-usage`` answers without usage, as a model priced per image does. With
``stream: true``: ``image_generation.partial_image`` events, then one
``image_generation.completed`` per image carrying that image's usage."""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from proxy.tools.mock.controls import Tokens
from proxy.tools.mock.core import Handler, Mock, error_response, stream_answer
from proxy.tools.mock.text import dumps

PNG_1X1 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
PARTIAL_IMAGE_TOKENS = 100


def _usage(prompt: int, output: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"image_tokens": 0, "text_tokens": prompt},
        "output_tokens": output,
        "total_tokens": prompt + output,
    }


def _event(kind: str, **fields: Any) -> bytes:
    data = json.dumps({"type": kind, **fields}, separators=(",", ":"))
    return f"event: {kind}\ndata: {data}\n\n".encode()


class Images:
    def __init__(self, mock: Mock) -> None:
        self.mock = mock

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [("POST", "/v1/images/generations", self.generations)]

    async def generations(self, request: web.Request) -> web.StreamResponse:
        begun = await self.mock.begin(request)
        if isinstance(begun, web.Response):
            return begun
        plan, body = begun
        prompt_text, n = body.get("prompt"), body.get("n", 1)
        if not isinstance(prompt_text, str) or not prompt_text:
            return error_response(400, "'prompt' is required", param="prompt")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 10:
            return error_response(400, "'n' must be from 1 to 10", param="n")
        prompt = len(prompt_text.split())
        partial = body.get("partial_images", 0) if body.get("stream") else 0
        partial = partial if isinstance(partial, int) and 0 <= partial <= 3 else 0
        per_image = plan.output_tokens + partial * PARTIAL_IMAGE_TOKENS
        shape = {
            "size": body.get("size", "1024x1024"),
            "quality": body.get("quality", "high"),
            "background": "opaque",
            "output_format": "png",
        }
        model, created = body["model"], int(time.time())
        if not plan.omit_usage:
            self.mock.report(request, model, Tokens(prompt, 0, per_image * n, 0, False))
        if not body.get("stream"):
            out: dict[str, Any] = {
                "created": created,
                "data": [{"b64_json": PNG_1X1} for _ in range(n)],
                **shape,
            }
            if not plan.omit_usage:
                out["usage"] = _usage(prompt, per_image * n)
            return web.Response(body=dumps(out), content_type="application/json")
        partials = [
            _event(
                "image_generation.partial_image",
                b64_json=PNG_1X1,
                created_at=created,
                partial_image_index=index,
                **shape,
            )
            for _ in range(n)
            for index in range(partial)
        ]
        completed = []
        for _ in range(n):
            fields: dict[str, Any] = {"b64_json": PNG_1X1, "created_at": created, **shape}
            if not plan.omit_usage:
                fields["usage"] = _usage(prompt, per_image)
            completed.append(_event("image_generation.completed", **fields))
        return await stream_answer(request, plan, [], partials, completed)
