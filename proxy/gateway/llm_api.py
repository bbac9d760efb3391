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
from proxy.errors import ApiError
from proxy.gateway import pipeline
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
    if endpoint in docs.streamed:
        media = dialect.stream_framing.content_type
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


def add_routes(app: web.Application) -> None:
    for dialect in DIALECTS:
        for prefix in dialect.prefixes:
            for endpoint in dialect.endpoints:
                path = f"{prefix}/{dialect.route_path(endpoint)}"
                app.router.add_post(path, llm_handler(dialect, endpoint))
            if dialect is OPENAI:  # the catalogue is served in OpenAI's shape, beside its routes
                app.router.add_get(f"{prefix}/models", list_models)
                app.router.add_get(prefix + "/models/{model:.+}", retrieve_model)
