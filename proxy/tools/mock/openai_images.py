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

from proxy.tools.mock.controls import Plan, Tokens
from proxy.tools.mock.core import Handler, Mock, error_response, stream_answer
from proxy.tools.mock.text import dumps

PNG_1X1 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9aw"
    "AAAABJRU5ErkJggg=="
)
PARTIAL_IMAGE_TOKENS = 100


def _usage(prompt: int, output: int, image_tokens: int = 0) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "image_tokens": image_tokens,
            "text_tokens": prompt - image_tokens,
        },
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
        return [
            ("POST", "/v1/images/generations", self.generations),
            ("POST", "/v1/images/edits", self.edits),
            ("POST", "/v1/images/variations", self.edits),
        ]

    async def edits(self, request: web.Request) -> web.StreamResponse:
        """Edits and variations: a multipart form; each uploaded image is
        ``x-mock-image-input-tokens`` input tokens (default 194)."""
        begun = await self.mock.begin(request, json_body=False)
        if isinstance(begun, web.Response):
            return begun
        plan, _ = begun
        if not request.content_type.startswith("multipart/form-data"):
            return error_response(400, "expected multipart/form-data")
        form = await request.post()
        body: dict[str, Any] = {}
        uploads = 0
        for name, value in form.items():
            if isinstance(value, web.FileField):
                uploads += 1
            elif name in ("n", "partial_images"):
                body[name] = int(value) if value.isdigit() else value
            elif name == "stream":
                body[name] = value == "true"
            else:
                body[name] = value
        if not uploads:
            return error_response(400, "'image' is required", param="image")
        if request.path.endswith("/variations"):
            body.setdefault("prompt", "")
        per_upload = int(request.headers.get("x-mock-image-input-tokens", "194"))
        return await self._answer(request, plan, body, uploads * per_upload)

    async def generations(self, request: web.Request) -> web.StreamResponse:
        begun = await self.mock.begin(request)
        if isinstance(begun, web.Response):
            return begun
        plan, body = begun
        prompt_text = body.get("prompt")
        if not isinstance(prompt_text, str) or not prompt_text:
            return error_response(400, "'prompt' is required", param="prompt")
        return await self._answer(request, plan, body, 0)

    async def _answer(
        self, request: web.Request, plan: Plan, body: dict[str, Any], image_tokens: int
    ) -> web.StreamResponse:
        prompt_text, n = body.get("prompt"), body.get("n", 1)
        if not isinstance(body.get("model"), str):
            return error_response(400, "you must provide a model parameter", param="model")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 10:
            return error_response(400, "'n' must be from 1 to 10", param="n")
        prompt = len(str(prompt_text).split()) + image_tokens
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
                out["usage"] = _usage(prompt, per_image * n, image_tokens)
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
                fields["usage"] = _usage(prompt, per_image, image_tokens)
            completed.append(_event("image_generation.completed", **fields))
        return await stream_answer(request, plan, [], partials, completed)
