"""OpenAI's ``/v1/moderations`` as the mock speaks it. OpenAI's answer carries no usage, so
the proxy counts the input itself; the mock reports the same count (tiktoken's
``o200k_base``, the proxy's default encoding) so books can be checked exactly.
``x-mock-moderation-usage: true`` adds a ``usage`` block (as an upstream that reports it),
``x-mock-flagged: true`` flags every input."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.catalog.tokenizer import count_text, get_encoding
from proxy.tools.mock.controls import Tokens
from proxy.tools.mock.core import Handler, Mock, error_response
from proxy.tools.mock.text import dumps

_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)


def _texts(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        return None
    texts: list[str] = []
    for item in value:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            texts.append(item["text"])
        elif not (isinstance(item, dict) and item.get("type") == "image_url"):
            return None
    return texts


class Moderations:
    def __init__(self, mock: Mock) -> None:
        self.mock = mock
        self.encoding = get_encoding("o200k_base")

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [("POST", "/v1/moderations", self.moderations)]

    async def moderations(self, request: web.Request) -> web.StreamResponse:
        begun = await self.mock.begin(request)
        if isinstance(begun, web.Response):
            return begun
        _plan, body = begun
        texts = _texts(body.get("input"))
        if texts is None:
            return error_response(400, "'input' must be a string or an array", param="input")
        flagged = request.headers.get("x-mock-flagged") == "true"
        prompt = sum(count_text(self.encoding, text) for text in texts)
        result = {
            "flagged": flagged,
            "categories": {name: flagged for name in _CATEGORIES},
            "category_scores": {name: 0.9 if flagged else 0.001 for name in _CATEGORIES},
            "category_applied_input_types": {name: ["text"] for name in _CATEGORIES},
        }
        out: dict[str, Any] = {
            "id": self.mock.next_id("modr-"),
            "model": body["model"],
            "results": [result for _ in texts] or [result],
        }
        if request.headers.get("x-mock-moderation-usage") == "true":
            out["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt}
        self.mock.report(request, body["model"], Tokens(prompt, 0, 0, 0, False))
        return web.Response(body=dumps(out), content_type="application/json")
