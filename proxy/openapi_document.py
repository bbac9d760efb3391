"""Builds the OpenAPI 3.1 document from the routes an application serves and what their
handlers declare with ``proxy.openapi.operation`` (the module docstring there says how)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from importlib import metadata
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from proxy.dialects import DIALECTS, for_path
from proxy.errors import OpenAIError
from proxy.openapi import PATH_PARAMETERS, Auth, Operation, declared, is_list

OPENAPI_VERSION = "3.1.0"
TITLE = "llm-proxy"

_SECURITY: dict[Auth, list[dict[str, list[str]]]] = {
    "admin": [{"bearerAuth": []}],
    "key": [{"bearerAuth": []}],
    "anthropic": [{"bearerAuth": []}, {"anthropicKey": []}],
    "gemini": [{"bearerAuth": []}, {"googApiKey": []}, {"googKeyQuery": []}],
    "metrics": [{}, {"metricsToken": []}],
    "none": [],
}
_COMMON_ERRORS = {
    500: "An internal proxy error (a defect; the log has the traceback).",
    503: "Unavailable: the limit store (Redis) cannot be reached, or this process is at its "
    "connection cap. Nothing was forwarded or charged.",
}
_PARAMETER = re.compile(r"{([^}:]+)(?::[^}]*)?}")


class _Schemas:
    """Collects models and turns them into ``components.schemas`` in one pydantic pass (so a
    model used twice is one component, and one used as input and output gets two names only
    when its two schemas differ)."""

    def __init__(self) -> None:
        self._wanted: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {}
        self.refs: dict[tuple[Any, JsonSchemaMode], dict[str, Any]] = {}
        self.components: dict[str, Any] = {}

    def want(self, model: type[BaseModel], mode: JsonSchemaMode) -> None:
        self._wanted[(model, mode)] = None

    def build(self) -> None:
        refs, top = models_json_schema(
            list(self._wanted), ref_template="#/components/schemas/{model}"
        )
        self.refs = dict(refs)
        self.components = dict(top.get("$defs", {}))

    def ref(self, model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
        return dict(self.refs[(model, mode)])


def _query_parameters(model: type[BaseModel], components: dict[str, Any]) -> list[dict[str, Any]]:
    """One parameter per field; what a field's schema refers to (an Enum, a model) joins the
    components."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in schema.get("$defs", {}).items():
        components.setdefault(name, definition)
    properties = schema.get("properties", {})
    required = set(schema.get("required", []))
    parameters = []
    for name, info in model.model_fields.items():
        key = info.alias or name
        prop = dict(properties[key])
        description = prop.pop("description", None) or info.description
        prop.pop("title", None)
        parameter: dict[str, Any] = {
            "name": key,
            "in": "query",
            "required": key in required,
            "schema": prop,
        }
        if description:
            parameter["description"] = description
        if is_list(info.annotation):
            parameter["style"], parameter["explode"] = "form", True
        parameters.append(parameter)
    return parameters


def _path_parameters(path: str) -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": PATH_PARAMETERS.get(name, {"type": "string", "minLength": 1}),
        }
        for name in _PARAMETER.findall(path)
    ]


def _operation_id(method: str, path: str) -> str:
    words = re.findall(r"[A-Za-z0-9]+", path) + (["slash"] if path.endswith("/") else [])
    return method.lower() + "".join(word[:1].upper() + word[1:] for word in words)


def _description(spec: Operation, handler: Any) -> str | None:
    if spec.description is not None:
        return spec.description
    doc = getattr(handler, "__doc__", None)
    if not doc:
        return None
    return " ".join(doc.split())


def _errors(spec: Operation, path: str, has_body: bool) -> dict[int, str]:
    errors: dict[int, str] = {}
    if any("pattern" in PATH_PARAMETERS.get(name, {}) for name in _PARAMETER.findall(path)):
        errors[400] = "A path parameter breaks its pattern: the message names it (`param`)."
    if has_body:
        errors.setdefault(400, "Invalid input: the message names the field (`param`).")
        errors[408] = "The request body stopped arriving."
        errors[413] = "The request body is larger than `server.max_body_bytes`."
    if spec.query is not None:
        errors.setdefault(400, "Invalid query: the message names the parameter (`param`).")
    if spec.auth in ("admin", "key", "anthropic", "gemini"):
        errors[401] = "The key is missing, unknown or revoked."
    if spec.auth == "admin":
        errors[403] = "The key is not an org or cluster admin key, or may not do this."
    errors.update(spec.errors)
    for status, text in _COMMON_ERRORS.items():
        errors.setdefault(status, text)
    return dict(sorted(errors.items()))


def document(app: web.Application, server_url: str | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route ``app`` serves."""
    schemas = _Schemas()
    found: list[tuple[str, str, Operation, Any]] = []
    for route in app.router.routes():
        spec = declared(route.handler)
        if route.method == "HEAD" or route.resource is None or spec is None:
            continue
        found.append((route.method, route.resource.canonical, spec, route.handler))
        if spec.body is not None:
            schemas.want(spec.body, "validation")
        for answer in spec.answers:
            if answer.model is not None:
                schemas.want(answer.model, "serialization")
    schemas.want(OpenAIError, "serialization")
    for dialect in DIALECTS:
        schemas.want(dialect.error_model, "serialization")
    schemas.build()

    paths: dict[str, dict[str, Any]] = {}
    tags: dict[str, None] = {}
    for method, path, spec, handler in found:
        tags[spec.tag] = None
        op: dict[str, Any] = {
            "operationId": spec.operation_id or _operation_id(method, path),
            "summary": spec.summary,
            "tags": [spec.tag],
        }
        description = _description(spec, handler)
        if description:
            op["description"] = description
        op["security"] = _SECURITY[spec.auth]
        parameters = _path_parameters(path)
        if spec.query is not None:
            parameters += _query_parameters(spec.query, schemas.components)
        if parameters:
            op["parameters"] = parameters
        has_body = spec.body is not None or spec.body_schema is not None
        if spec.body is not None:
            body_schema: Mapping[str, Any] = schemas.ref(spec.body, "validation")
        else:
            body_schema = spec.body_schema or {}
        if has_body:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": dict(body_schema)}},
            }
        responses: dict[str, Any] = {}
        for answer in spec.answers:
            if answer.model is not None:
                schema: Mapping[str, Any] = schemas.ref(answer.model, "serialization")
            else:
                schema = answer.schema or {}
            entry = responses.setdefault(
                str(answer.status), {"description": answer.description, "content": {}}
            )
            entry["content"][answer.media] = {"schema": dict(schema)}
        error_model = for_path(path).error_model
        error_ref = schemas.ref(error_model, "serialization")
        if spec.relayed:  # the proxy's shape, or whatever JSON the upstream answered
            error_ref = {"anyOf": [error_ref, {"type": "object"}]}
        for status, text in _errors(spec, path, has_body).items():
            if str(status) not in responses:
                responses[str(status)] = {
                    "description": text,
                    "content": {"application/json": {"schema": error_ref}},
                }
        if spec.relayed:
            responses["default"] = {
                "description": "The upstream's own error, relayed with its status and body.",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        op["responses"] = responses
        op.update(spec.extensions)
        paths.setdefault(path, {})[method.lower()] = op

    doc: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": TITLE,
            "version": _version(),
            "summary": "A rate-limiting, budget-enforcing reverse proxy for LLM upstreams.",
            "description": _INFO,
        },
        "servers": [{"url": server_url or "/"}],
        "tags": [{"name": name, "description": _TAGS.get(name, "")} for name in _tag_order(tags)],
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(schemas.components.items())),
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A key the proxy issued (`sk-bp-…`), or the bootstrap "
                    "admin key. Admin endpoints need an org_admin or cluster_admin key.",
                },
                "anthropicKey": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "x-api-key",
                    "description": "The same key, as Anthropic clients send it (Messages "
                    "routes only).",
                },
                "googApiKey": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "x-goog-api-key",
                    "description": "The same key, as `google-genai` sends it (Gemini routes).",
                },
                "googKeyQuery": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "key",
                    "description": "The same key as `?key=` (Gemini routes; never logged).",
                },
                "metricsToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The value of `[metrics] token_env`, when set; without "
                    "it `/metrics` answers loopback callers only.",
                },
            },
        },
    }
    return doc


def _tag_order(tags: Iterable[str]) -> list[str]:
    known = list(_TAGS)
    return sorted(tags, key=lambda name: known.index(name) if name in known else len(known))


def _version() -> str:
    try:
        return metadata.version("llm-budget-proxy")
    except metadata.PackageNotFoundError:
        return "0.0.0"


_INFO = (
    "Clients keep their OpenAI or Anthropic SDK and point its base URL at the proxy; "
    "operators manage keys, limits and budgets through the admin API. Every error is JSON: "
    "OpenAI's shape `{error: {message, type, code, param}}`, and Anthropic's "
    "`{type: 'error', error: {type, message}}` on the Messages routes. Ids of another org "
    "are answered 404, like ids that do not exist."
)
_TAGS = {
    "keys": "API keys and org limits.",
    "budgets": "Budgets (the MKA1 budget contract), their live spend and threshold events.",
    "usage": "Spend and usage reports.",
    "webhooks": "Budget-alert webhook deliveries.",
    "llm": "OpenAI-compatible LLM routes, metered and admitted. Bodies are relayed to the "
    "upstream; answers and upstream errors come back as the upstream gave them.",
    "anthropic": "Anthropic's Messages API, metered and admitted the same way.",
    "gemini": "Google's Gemini API (and Vertex AI's paths for it), metered and admitted the "
    "same way.",
    "operations": "Health, readiness and metrics.",
    "console": "The operator console, this document and its viewer.",
}
