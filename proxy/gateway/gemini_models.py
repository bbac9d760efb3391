"""The model table in Google's shape: ``GET /v1beta/models`` and ``/v1beta/models/{model}``
(``google-genai``'s ``models.list`` and ``models.get``), from the proxy's own table — the
models of the Gemini dialect this key may use, never the upstream's catalogue."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.catalog.routes import ModelRoute, UnpricedModel
from proxy.dialects import GEMINI
from proxy.errors import ApiError
from proxy.gateway.state import GATEWAY
from proxy.openapi import Reply, operation

_METHODS = {
    "chat": ["generateContent", "streamGenerateContent", "countTokens"],
    "embedding": ["embedContent", "batchEmbedContents"],
}


def asked_by_google(request: web.Request) -> bool:
    """A catalogue request from a Google client (``/v1/models`` is also OpenAI's): its key
    comes the Gemini way."""
    return "x-goog-api-key" in request.headers or "key" in request.query


def _card(name: str, route: ModelRoute) -> dict[str, Any]:
    return {
        "name": f"models/{name}",
        "baseModelId": name,
        "version": "proxy",
        "displayName": name,
        "inputTokenLimit": route.context_window,
        "outputTokenLimit": route.max_output_tokens,
        "supportedGenerationMethods": _METHODS.get(route.kind, []),
    }


_LIST_SCHEMA = {
    "type": "object",
    "properties": {"models": {"type": "array", "items": {"type": "object"}}},
}


@operation(
    "Gemini: list models",
    tag="gemini",
    auth="gemini",
    answers=Reply(200, "The Gemini models this key may use.", schema=_LIST_SCHEMA),
)
async def list_models(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    identity = await gw.auth.identify_key(GEMINI.api_key(request))
    models = [
        _card(name, route)
        for name, route in gw.routes.items()
        if route.dialect == GEMINI.name
        and any(identity.may_use(n) for n in (name, route.name, route.entry))
    ]
    return web.json_response({"models": models})


@operation(
    "Gemini: get a model",
    tag="gemini",
    auth="gemini",
    answers=Reply(200, "The model.", schema={"type": "object"}),
    errors={404: "No such model, or one this key may not use."},
)
async def get_model(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    identity = await gw.auth.identify_key(GEMINI.api_key(request))
    name = request.match_info["model"].removeprefix("models/")
    try:
        route = gw.routes.get(name)
    except UnpricedModel:
        route = None
    if (
        route is None
        or route.dialect != GEMINI.name
        or not any(identity.may_use(n) for n in (name, route.name, route.entry))
    ):
        raise ApiError(404, f"Model 'models/{name[:200]}' was not found.", code="not_found")
    return web.json_response(_card(name, route))


def add_routes(app: web.Application) -> None:
    for base in ("", "/api/v1/llm"):
        app.router.add_get(f"{base}/v1beta/models", list_models)
        app.router.add_get(base + "/v1beta/models/{model:[^:]+}", get_model)
