"""The admin API is its own application mounted under the main one: every path still resolves
as when all routes were one router's (the most specific route wins across both apps, a 405
names both apps' methods), and one middleware authenticates by what each handler declares.
The table was recorded against the single-router application before the split."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from conftest import Proxy

from proxy.admin.app import without_admin_auth
from proxy.openapi import Reply, operation

NOT_ALLOWED = "method_not_allowed"
BAD_ORG = "'orgId' must be 1-64 characters"
# (method, path, caller) -> (status, Allow header, error code or None).
TABLE: list[tuple[str, str, str | None, int, str | None, str | None]] = [
    # LLM routes under the admin app's prefixes keep their 405s.
    ("GET", "/api/v1/llm/chat/completions", "admin", 405, "POST", "method_not_allowed"),
    ("GET", "/api/v1/llm/v1/messages", "admin", 405, "POST", None),
    ("GET", "/v1/chat/completions", "admin", 405, "POST", "method_not_allowed"),
    # Prices sit under the gateway's /models/{model:.+}: the more specific path wins; the rest
    # of that path is still the gateway's.
    ("GET", "/api/v1/llm/models/pricing", "admin", 200, None, None),
    ("GET", "/api/v1/llm/models/pricing", "member", 403, None, "forbidden"),
    ("GET", "/api/v1/llm/models/pricing", None, 401, None, "invalid_api_key"),
    ("GET", "/api/v1/llm/models/pricing/currency", "admin", 200, None, None),
    ("GET", "/api/v1/llm/models/pricing/nothing/here", "admin", 404, None, "model_not_found"),
    ("GET", "/api/v1/llm/models/pricing/org/acme/x", "admin", 404, None, "model_not_found"),
    ("GET", "/api/v1/llm/models/gpt-4o-mini", "admin", 200, None, None),
    ("GET", "/api/v1/llm/models", "admin", 200, None, None),
    ("PATCH", "/api/v1/llm/models/pricing", "admin", 405, "DELETE,GET,HEAD,PUT", NOT_ALLOWED),
    ("PUT", "/api/v1/llm/models/pricing/currency", "admin", 405, "GET", "method_not_allowed"),
    ("PUT", "/api/v1/llm/models/pricing/currency", "member", 403, None, "forbidden"),
    ("POST", "/api/v1/llm/budgets", "admin", 405, "GET,HEAD", "method_not_allowed"),
    ("GET", "/api/v1/llm/budgets/quote", "admin", 405, "POST", "method_not_allowed"),
    ("GET", "/api/v1/llm/budgets/org/acme", "member", 403, None, "forbidden"),
    ("GET", "/api/v1/llm/usage/costs", "member", 403, None, "forbidden"),
    ("GET", "/api/v1/llm/usage/nothing", "admin", 404, None, "unknown_url"),
    ("GET", "/api/v1/nothing", "admin", 404, None, "unknown_url"),
    ("GET", "/api/v1/keys/", "admin", 404, None, "unknown_url"),
    ("DELETE", "/api/v1/keys", "admin", 405, "GET,HEAD,POST", "method_not_allowed"),
    ("GET", "/api/v1/keys", None, 401, None, "invalid_api_key"),
    ("GET", "/api/v1/keys", "member", 403, None, "forbidden"),
    ("GET", "/api/v1/me", "member", 200, None, None),
    ("GET", "/api/v1/me", None, 401, None, "invalid_api_key"),
    ("GET", "/api/v1/orgs/acme/limits", "admin", 200, None, None),
    # An org id in the path is checked before the caller's role.
    ("GET", "/api/v1/orgs/bad!id/limits", "member", 400, None, "invalid_request"),
    ("GET", "/api/v1/orgs/bad!id/limits", "admin", 400, None, "invalid_request"),
    ("GET", "/api/v1/orgs/other/limits", "member", 403, None, "forbidden"),
    ("PUT", "/api/v1/orgs/acme/end-user-policy", None, 401, None, "invalid_api_key"),
    ("GET", "/api/v1/webhooks/deliveries", "member", 403, None, "forbidden"),
    ("GET", "/api/v1/webhooks", "admin", 404, None, "unknown_url"),
    # The console and the document are public.
    ("GET", "/ui", None, 200, None, None),
    ("GET", "/ui/", None, 200, None, None),
    ("GET", "/ui/nothing.js", None, 404, None, "unknown_url"),
    ("POST", "/ui", None, 405, "GET,HEAD", "method_not_allowed"),
    ("GET", "/uix", None, 404, None, "unknown_url"),
    ("GET", "/docs/", None, 200, None, None),
    ("GET", "/openapi.json", None, 200, None, None),
    ("POST", "/healthz", None, 405, "GET,HEAD", "method_not_allowed"),
    ("GET", "/", None, 404, None, "unknown_url"),
]


async def test_paths_resolve_as_one_router_did(proxy: Proxy) -> None:
    _, member = await proxy.create_key("acme")
    keys = {"admin": proxy.admin_key, "member": member}
    for method, path, who, status, allow, code in TABLE:
        headers = {"Authorization": f"Bearer {keys[who]}"} if who else {}
        async with proxy.session.request(method, proxy.url + path, headers=headers) as response:
            body: Any = json.loads(await response.read() or b"null") if status >= 400 else None
            seen = (response.status, response.headers.get("Allow"))
            assert seen == (status, allow), (method, path, who, seen)
            if status >= 400:
                error = body["error"]
                assert error.get("code") == code, (method, path, who, error)
                if path.startswith("/api/v1/orgs/bad"):
                    assert error["message"].startswith(BAD_ORG)


async def test_admin_routes_are_served_by_the_admin_app(proxy: Proxy) -> None:
    main_routes = {r.resource.canonical for r in proxy.app.router.routes() if r.resource}
    assert "/api/v1/keys" in main_routes and "/ui" in main_routes  # through the mount
    own = {
        resource.canonical
        for resource in proxy.app.router.resources()
        if not isinstance(resource, web.PrefixedSubAppResource)
    }
    assert not {path for path in own if path.startswith(("/api/v1/keys", "/ui", "/openapi"))}
    assert "/healthz" in own and "/v1/chat/completions" in own


def test_every_admin_route_declares_an_auth_the_middleware_checks() -> None:
    async def bare(request: web.Request) -> web.Response:
        return web.json_response({})

    @operation("Metrics-style", tag="operations", auth="metrics", answers=Reply(200, "x"))
    async def metrics_auth(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/bare", bare)
    app.router.add_get("/metrics-auth", metrics_auth)
    assert without_admin_auth(app) == ["GET /bare", "GET /metrics-auth"]
