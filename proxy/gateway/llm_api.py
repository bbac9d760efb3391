"""The LLM endpoints of every dialect (``proxy.dialects.DIALECTS``), each served by the one
request path (``proxy.gateway.pipeline.handle``), and the model catalogue
(``GET /v1/models``) in OpenAI's shape.
"""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from proxy.catalog.routes import UnpricedModel
from proxy.dialects import DIALECTS, OPENAI, Dialect
from proxy.dialects.openai_routes import UNMETERED, unmetered_refusal
from proxy.errors import ApiError
from proxy.gateway import gemini_models, pipeline, stored
from proxy.gateway.state import GATEWAY
from proxy.openapi import SSE_EVENT, Reply, operation


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)

    object: Literal["list"] = "list"
    data: list[ModelCard]


def llm_handler(dialect: Dialect, endpoint: str) -> Any:
    """The handler of one endpoint of a dialect, declared for the OpenAPI document."""
    docs = dialect.docs
    answers = [Reply(200, "The upstream's answer.", schema={"type": "object"})]
    media = dialect.stream_framing(endpoint).content_type
    if endpoint in docs.streamed and media == "application/json":  # Gemini's streamed array
        answers[0] = Reply(
            200, "The upstream's answer, relayed element by element.", schema={"type": "array"}
        )
    elif endpoint in docs.streamed:
        answers.append(
            Reply(
                200,
                "With `stream: true`: the upstream's events, relayed as they arrive."
                if media == "text/event-stream"
                else "The upstream's event stream, relayed as it arrives.",
                media=media,
                schema=SSE_EVENT,
            )
        )

    @operation(
        f"{docs.title} {endpoint}",
        tag=docs.tag,
        auth=docs.auth,
        body_schema=docs.body_schema,
        answers=tuple(answers),
        errors=docs.errors,
        relayed=True,
        description=docs.descriptions[endpoint],
    )
    async def handler(request: web.Request) -> web.StreamResponse:
        return await pipeline.handle(request, endpoint, dialect)

    handler.__name__ = docs.handler_prefix + endpoint.replace("/", "_").replace("-", "_")
    return handler


@operation(
    "List models",
    tag="llm",
    auth="key",
    answers=Reply(
        200,
        "The configured models and aliases this key may use, patterns (`claude-*`) by the "
        "concrete names the price database knows.",
        ModelList,
    ),
)
async def list_models(request: web.Request) -> web.Response:
    if gemini_models.asked_by_google(request):  # google-genai lists under /v1 too
        return await gemini_models.list_models(request)
    gw = request.app[GATEWAY]
    identity = await gw.auth.identify(request)
    names = [
        (name, owner)
        for name, entry, owner in gw.routes.catalogue()
        if identity.may_use(name) or identity.may_use(entry)
    ]
    if "anthropic-version" in request.headers:  # an Anthropic SDK's models.list(): its shape
        cards = [
            {"type": "model", "id": name, "display_name": name, "created_at": _EPOCH}
            for name, _ in names
        ]
        first, last = (cards[0]["id"], cards[-1]["id"]) if cards else (None, None)
        return web.json_response(
            {"data": cards, "has_more": False, "first_id": first, "last_id": last}
        )
    data = [{"id": n, "object": "model", "created": 0, "owned_by": owner} for n, owner in names]
    return web.json_response({"object": "list", "data": data})


_EPOCH = "1970-01-01T00:00:00Z"


@operation(
    "Retrieve a model",
    tag="llm",
    auth="key",
    answers=Reply(200, "The model.", ModelCard),
    errors={404: "No such model, or one this key may not use (`model_not_found`)."},
)
async def retrieve_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{model}`` (the SDKs' ``models.retrieve``): one model this key may use."""
    if gemini_models.asked_by_google(request):
        return await gemini_models.get_model(request)
    gw = request.app[GATEWAY]
    identity = await gw.auth.identify(request)
    name = request.match_info["model"]
    try:
        route = gw.routes.get(name)
    except UnpricedModel:
        route = None
    if route is None or not any(
        identity.may_use(allowed) for allowed in (name, route.name, route.entry)
    ):
        raise ApiError(
            404,
            f"The model '{name[:200]}' does not exist or you do not have access to it.",
            code="model_not_found",
            param="model",
        )
    return web.json_response(route.listing(name))


def unmetered_handler(method: str, path: str) -> Any:
    """A route of OpenAI's API the proxy cannot meter yet: refused (after the key is checked)
    in OpenAI's shape, never forwarded and never a 404 that sends the client elsewhere."""

    @operation(
        f"OpenAI {method} {path.partition('{')[0]}… (refused: not metered yet)",
        tag="llm",
        auth="key",
        answers=(),
        errors={403: "Always: the route is not metered by this proxy (`route_not_metered`)."},
        description="Refused without reading the body, so nothing reaches the upstream "
        "outside the budgets.",
    )
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.app[GATEWAY].auth.identify(request)
        raise unmetered_refusal(method, request.path[:200])

    name = path.partition("{")[0].replace("/", "_")
    handler.__name__ = f"unmetered_{method.lower()}_{name}"
    return handler


def stored_handler(method: str, tail: str) -> Any:
    """A stored response, read back by its own org (``proxy.gateway.stored``)."""

    @operation(
        f"OpenAI {method} responses/{{response_id}}{tail}",
        tag="llm",
        auth="key",
        answers=Reply(200, "The upstream's answer.", schema={"type": "object"}),
        errors={404: "No response of that id was created by this key's org."},
        relayed=True,
        description="Relayed to the upstream that stored the response, for the org that "
        "created it only; free (the response was charged when it was created).",
    )
    async def handler(request: web.Request) -> web.StreamResponse:
        return await stored.relay_stored(request, method, tail)

    handler.__name__ = f"stored_response_{method.lower()}{tail.replace('/', '_')}"
    return handler


def add_routes(app: web.Application) -> None:
    for dialect in DIALECTS:
        handlers = {endpoint: llm_handler(dialect, endpoint) for endpoint in dialect.endpoints}
        for path, endpoint in dialect.routes():
            app.router.add_post(path, handlers[endpoint])
    for prefix in OPENAI.prefixes:  # the catalogue in OpenAI's shape, beside its routes
        app.router.add_get(f"{prefix}/models", list_models)
        app.router.add_get(prefix + "/models/{model:.+}", retrieve_model)
        for method, tail in stored.ROUTES:
            path = prefix + "/responses/{response_id}" + tail
            app.router.add_route(method, path, stored_handler(method, tail))
        for method, path in UNMETERED:
            app.router.add_route(method, f"{prefix}/{path}", unmetered_handler(method, path))
    gemini_models.add_routes(app)
