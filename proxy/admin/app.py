"""The admin API as its own application: keys, budgets and quotes, usage, requests, prices,
webhook deliveries, the console and the OpenAPI document, behind one authentication
middleware (``proxy.admin.auth``), mounted under the proxy's main application.

Why not ``add_subapp(prefix, ...)``: the admin paths share their prefixes with the LLM routes
(``/api/v1/llm/models/pricing`` sits under the gateway's ``/api/v1/llm/models/{model:.+}``,
``/api/v1/llm/budgets`` beside ``/api/v1/llm/chat/completions``) and the console lives at
``/ui``, ``/docs`` and ``/openapi.json``, so no one prefix holds them, and a prefixed sub-app
answers 404 or 405 for every path under its prefix, shadowing the main app's routes there.
So the admin app is mounted at each of its leading paths (``/api/v1/keys``, ``/ui``, ...):
the main router indexes them like any route, so an LLM request never looks at them, and a path
the admin router does not serve goes back to the main router. Every path resolves exactly as
it did when all routes were one router's: the most specific route wins, and a 405 names the
methods of both apps.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import partial

from aiohttp import web
from aiohttp.web_urldispatcher import (
    AbstractRoute,
    PrefixedSubAppResource,
    PrefixResource,
    UrlMappingMatchInfo,
)

from proxy.admin import (
    budget_quote,
    budgets_api,
    console,
    key_lifecycle,
    keys_api,
    pricing_api,
    requests_api,
    usage_api,
)
from proxy.admin.auth import AUTH_KINDS, authenticate
from proxy.admin.webhooks import api as webhooks_api
from proxy.gateway.state import GATEWAY, Gateway
from proxy.openapi import declared


def create_admin_app(gateway: Gateway) -> web.Application:
    """The admin API over ``gateway``'s services (shared, not copied: one Redis pool, one key
    cache whose ``forget()`` a revoke reaches)."""
    admin = web.Application(middlewares=[authenticate])
    admin[GATEWAY] = gateway
    keys_api.add_routes(admin)
    key_lifecycle.add_routes(admin)
    budgets_api.add_routes(admin)
    budget_quote.add_routes(admin)
    usage_api.add_routes(admin)
    requests_api.add_routes(admin)
    pricing_api.add_routes(admin)
    webhooks_api.add_routes(admin)
    console.add_routes(admin)
    unguarded = without_admin_auth(admin)
    if unguarded:
        raise RuntimeError(f"admin routes without an admin auth declaration: {unguarded}")
    return admin


def without_admin_auth(app: web.Application) -> list[str]:
    """Routes the middleware could not guard: undeclared, or declared with an auth it does
    not check (``metrics``, ``anthropic``)."""
    found = []
    for route in app.router.routes():
        spec = declared(route.handler)
        if route.method != "HEAD" and (spec is None or spec.auth not in AUTH_KINDS):
            canonical = route.resource.canonical if route.resource else "?"
            found.append(f"{route.method} {canonical}")
    return found


def mount_admin(app: web.Application, admin: web.Application) -> None:
    """Serves ``admin``'s routes from ``app``, at their own paths."""
    admin[console.DOCUMENTED] = app
    first, *others = _roots(r.canonical for r in admin.router.resources())
    # aiohttp's own add_subapp path (signals, pre-freeze, freeze), with our resource.
    app._add_subapp(partial(_AdminRoot, first, admin, lists_routes=True), admin)
    for root in others:
        app.router.register_resource(_AdminRoot(root, admin, lists_routes=False))


def _roots(paths: Iterable[str]) -> list[str]:
    """The fixed leading parts of ``paths``, none under another."""
    fixed = sorted({path.partition("{")[0].rstrip("/") for path in paths})
    kept: list[str] = []
    for path in fixed:
        if not any(path == root or path.startswith(root + "/") for root in kept):
            kept.append(path)
    return kept


class _AdminRoot(PrefixedSubAppResource):
    """One leading path of the admin app in the main router. Unlike aiohttp's prefixed
    sub-app it leaves the admin routes' paths as they are, and falls through: a path the admin
    router does not serve (404), or serves with other methods (405), goes on to the main
    router's less specific routes, with those methods counted. One of the roots lists the
    admin routes (for ``router.routes()`` and the OpenAPI document), the others none."""

    def __init__(self, root: str, app: web.Application, *, lists_routes: bool) -> None:
        PrefixResource.__init__(self, root)
        self._app = app
        self._lists_routes = lists_routes

    def add_prefix(self, prefix: str) -> None:
        raise RuntimeError("the main application is not mounted under another one")

    async def resolve(self, request: web.Request) -> tuple[UrlMappingMatchInfo | None, set[str]]:
        match_info = await self._app.router.resolve(request)
        error = match_info.http_exception
        if error is not None:
            allowed = error.allowed_methods if isinstance(error, web.HTTPMethodNotAllowed) else ()
            return None, set(allowed)
        match_info.add_app(self._app)
        return match_info, set()

    def __len__(self) -> int:
        return len(self._app.router.routes()) if self._lists_routes else 0

    def __iter__(self) -> Iterator[AbstractRoute]:
        return iter(self._app.router.routes() if self._lists_routes else ())
