"""The OpenAPI 3.1 document (``GET /openapi.json``), generated from what each handler declares.

A handler is declared once, beside its code, with ``@operation(...)``: a summary, who may call
it, the pydantic models of its query, body and answers, and the errors it can give. The
document (``proxy.openapi_document``) is built by walking the application's router, so it
lists exactly the routes that are served (a route without a declaration is an error, caught by
``undeclared``), and its schemas are the JSON schemas of the very models the handlers validate
with and answer in: nothing is written twice. Adding an endpoint means decorating its handler
and routing it::

    class CostsQuery(BaseModel):
        start_time: int
        end_time: int
        group_by: list[GroupBy] = []  # a list field takes repeated names: group_by=a&group_by=b

    @operation(
        "Get cost by model",
        tag="usage",
        auth="admin",
        query=CostsQuery,
        answers=Reply(200, "One aggregate over the range.", UsageCostsResponse),
        errors={404: "No such org, or another org than the caller's."},
        operation_id="getCostsUsage",
    )
    async def costs(request: web.Request) -> web.Response:
        query = parse_query(CostsQuery, request.query)  # a 400 naming the parameter
        ...

Errors are OpenAI-shaped everywhere but on the Messages routes (Anthropic's shape), as
``proxy.errors`` renders them; each operation gets the statuses its auth, body and store use
imply (401, 400/408/413, 503, 500) besides the ones it declares.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args, get_origin

from aiohttp import web
from multidict import MultiMapping
from pydantic import BaseModel, ValidationError

from proxy.errors import bad_request

H = TypeVar("H", bound=Callable[..., Any])
M = TypeVar("M", bound=BaseModel)

Auth = Literal["admin", "key", "anthropic", "gemini", "metrics", "none"]
"""``admin``: a bearer key of an org or cluster admin (members get 403); ``key``: any bearer
key; ``anthropic``: a key as ``x-api-key`` or bearer; ``metrics``: the metrics token, or none
from loopback; ``none``: public. On the admin application the declaration is also the guard:
its middleware (``proxy.admin.auth``) authenticates ``admin`` and ``key`` routes by it."""

ATTRIBUTE = "__openapi_operation__"
ORG_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
PATH_PARAMETERS: dict[str, dict[str, Any]] = {
    "orgId": {"type": "string", "pattern": ORG_ID_PATTERN},
    "model": {"type": "string", "minLength": 1},
}
"""Path parameters with more to say than "a non-empty string" (the default)."""

SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "description": "One server-sent event of the stream (before OpenAPI 3.2 and its "
    "`itemSchema`, the schema of a `text/event-stream` answer describes each event).",
    "required": ["data"],
    "properties": {
        "event": {"type": "string"},
        "data": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}


@dataclass(frozen=True)
class Reply:
    """One documented response: a model's JSON, or a raw schema for another media type."""

    status: int | Literal["default"]
    description: str
    model: type[BaseModel] | None = None
    media: str = "application/json"
    schema: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Operation:
    summary: str
    tag: str
    auth: Auth
    answers: tuple[Reply, ...]
    body: type[BaseModel] | None = None
    body_schema: Mapping[str, Any] | None = None
    """For bodies the proxy relays rather than models (the LLM routes)."""
    query: type[BaseModel] | None = None
    errors: Mapping[int, str] = field(default_factory=dict)
    operation_id: str | None = None
    description: str | None = None
    """Defaults to the handler's docstring."""
    extensions: Mapping[str, Any] = field(default_factory=dict)
    relayed: bool = False
    """The upstream's answer is relayed: its errors too, with their own status and body."""


def operation(
    summary: str,
    *,
    tag: str,
    auth: Auth,
    answers: tuple[Reply, ...] | Reply,
    body: type[BaseModel] | None = None,
    body_schema: Mapping[str, Any] | None = None,
    query: type[BaseModel] | None = None,
    errors: Mapping[int, str] | None = None,
    operation_id: str | None = None,
    description: str | None = None,
    extensions: Mapping[str, Any] | None = None,
    relayed: bool = False,
) -> Callable[[H], H]:
    """Declares the handler it decorates; the handler itself is returned unchanged."""
    spec = Operation(
        summary=summary,
        tag=tag,
        auth=auth,
        answers=answers if isinstance(answers, tuple) else (answers,),
        body=body,
        body_schema=body_schema,
        query=query,
        errors=dict(errors or {}),
        operation_id=operation_id,
        description=description,
        extensions=dict(extensions or {}),
        relayed=relayed,
    )

    def declare(handler: H) -> H:
        setattr(handler, ATTRIBUTE, spec)
        return handler

    return declare


def declared(handler: Any) -> Operation | None:
    spec = getattr(handler, ATTRIBUTE, None)
    return spec if isinstance(spec, Operation) else None


def undeclared(app: web.Application) -> list[str]:
    """Routes served without a declaration (what the tests require to be empty)."""
    return [
        f"{route.method} {route.resource.canonical}"
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None and declared(route.handler) is None
    ]


# --- query parameters ----------------------------------------------------------------------


def is_list(annotation: Any) -> bool:
    if get_origin(annotation) is list:
        return True
    return any(is_list(arg) for arg in get_args(annotation))


def parse_query(model: type[M], query: MultiMapping[str]) -> M:
    """The request's query as ``model``: list fields take every value of a repeated name
    (``group_by=model&group_by=api_key_id``), other fields the first; unknown names are
    ignored. A 400 names the first bad parameter."""
    data: dict[str, object] = {}
    for name, info in model.model_fields.items():
        values = query.getall(info.alias or name, [])
        if values:
            data[name] = list(values) if is_list(info.annotation) else values[0]
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        if first["type"] == "value_error":  # a validator's own words: "'org_id' must be ..."
            message = f"'{param}' {first['ctx']['error']}."
        else:
            message = f"Invalid query parameter '{param}': {first['msg']}."
        raise bad_request(message, param=param) from None
