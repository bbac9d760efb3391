"""OpenAI's stored responses as the mock keeps them: ``GET`` and ``DELETE
/v1/responses/{id}``, ``POST …/cancel`` (only a background response can be cancelled: 400
otherwise, as OpenAI answers) and ``GET …/input_items``. No usage: reading is free."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.tools.mock.core import Handler, Mock, error_response
from proxy.tools.mock.text import dumps


class Stored:
    def __init__(self, mock: Mock) -> None:
        self.mock = mock

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("GET", "/v1/responses/{id}", self.retrieve),
            ("DELETE", "/v1/responses/{id}", self.delete),
            ("POST", "/v1/responses/{id}/cancel", self.cancel),
            ("GET", "/v1/responses/{id}/input_items", self.input_items),
        ]

    async def _found(self, request: web.Request) -> tuple[dict[str, Any], Any] | web.Response:
        begun = await self.mock.begin(request, json_body=False)
        if isinstance(begun, web.Response):
            return begun
        ident = request.match_info["id"]
        found = self.mock.stored.get(ident)
        if found is None:
            message = f"Response with id '{ident}' not found."
            return error_response(404, message, param="response_id")
        return found

    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        found = await self._found(request)
        if isinstance(found, web.Response):
            return found
        return web.Response(body=dumps(found[0]), content_type="application/json")

    async def delete(self, request: web.Request) -> web.StreamResponse:
        found = await self._found(request)
        if isinstance(found, web.Response):
            return found
        ident = found[0]["id"]
        del self.mock.stored[ident]
        out = {"id": ident, "object": "response.deleted", "deleted": True}
        return web.Response(body=dumps(out), content_type="application/json")

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        found = await self._found(request)
        if isinstance(found, web.Response):
            return found
        return error_response(400, "Only background responses can be cancelled.")

    async def input_items(self, request: web.Request) -> web.StreamResponse:
        found = await self._found(request)
        if isinstance(found, web.Response):
            return found
        given = found[1]
        items: list[Any] = given if isinstance(given, list) else [given]
        data = [
            {
                "id": f"msg_in{index}",
                "type": "message",
                "role": "user",
                "status": "completed",
                "content": [{"type": "input_text", "text": item}]
                if isinstance(item, str)
                else item.get("content", []),
            }
            for index, item in enumerate(items)
        ]
        out = {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": False,
        }
        return web.Response(body=dumps(out), content_type="application/json")
