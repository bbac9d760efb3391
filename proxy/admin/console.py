"""The operator console (``/ui``), the OpenAPI document (``/openapi.json``) and its viewer
(``/docs``), served by the proxy itself from files shipped in the package.

Nothing here holds data: the console is static HTML, CSS and JavaScript that calls the admin
API with the admin key the operator types in (kept in the tab's session storage, sent as a
Bearer header, never in a URL or a cookie). Pages are served under a strict
Content-Security-Policy — scripts, styles and connections to this origin only, no inline
script or style, no framing — so a name or id that looks like markup can only ever be text,
and the pages work with no network beyond the proxy. ``/docs`` is Swagger UI
(``swagger-ui-dist``, Apache-2.0; its licence files sit beside it) under the same policy.

Only files listed in ``_ASSETS`` are served (no path is ever joined from the request).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web

from proxy.errors import not_found
from proxy.openapi import Reply, operation
from proxy.openapi_document import document

Handler = Callable[[web.Request], Awaitable[web.Response]]
DOCUMENT: web.AppKey[dict[str, dict[str, Any]]] = web.AppKey("openapi_document", dict)
"""Holds the document once built, under ``"doc"``."""
DOCUMENTED = web.AppKey("documented_app", web.Application)
"""The application whose routes the document lists: the main one, which the admin app (where
these pages are served) is mounted under."""

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; manifest-src 'self'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-cache",
}
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
    "": "text/plain; charset=utf-8",
}
_ASSETS = {
    "ui": ("index.html", "console.css", "console.js", "charts.js", "favicon.svg"),
    "docs": (
        "index.html",
        "docs.css",
        "docs.js",
        "swagger-ui-bundle.js",
        "swagger-ui.css",
        "LICENSE",
        "NOTICE",
        "swagger-ui-bundle.js.LICENSE.txt",
    ),
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str


def _load(section: str) -> dict[str, Asset]:
    folder = resources.files("proxy.admin") / "static" / section
    assets = {}
    for name in _ASSETS[section]:
        suffix = name[name.rfind(".") :] if "." in name else ""
        assets[name] = Asset((folder / name).read_bytes(), _TYPES[suffix])
    return assets


def _serve(asset: Asset) -> web.Response:
    response = web.Response(body=asset.body, headers=SECURITY_HEADERS)
    response.headers["Content-Type"] = asset.content_type
    return response


def _pages(section: str, title: str) -> tuple[Handler, Handler]:
    assets = _load(section)

    @operation(
        title,
        tag="console",
        auth="none",
        answers=Reply(200, "The page.", media="text/html", schema={"type": "string"}),
        errors={},
        description=f"Static HTML; the data comes from the API. Served under "
        f"`Content-Security-Policy: {CONTENT_SECURITY_POLICY}`.",
    )
    async def page(request: web.Request) -> web.Response:
        return _serve(assets["index.html"])

    @operation(
        f"{title}: a static asset",
        tag="console",
        auth="none",
        answers=Reply(200, "The file.", media="*/*", schema={}),
        errors={404: "Not one of the page's files."},
    )
    async def asset(request: web.Request) -> web.Response:
        found = assets.get(request.match_info["asset"])
        if found is None:
            raise not_found(f"Unknown endpoint: {request.method} {request.path}", "unknown_url")
        return _serve(found)

    return page, asset


@operation(
    "This document",
    tag="console",
    auth="none",
    answers=Reply(200, "The OpenAPI 3.1 document.", schema={"type": "object"}),
)
async def openapi_json(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of every route this proxy serves, generated from the models
    that validate its requests and describe its answers."""
    cache = request.app[DOCUMENT]
    if "doc" not in cache:  # the router is frozen while serving: built once
        cache["doc"] = document(request.app[DOCUMENTED])
    response = web.json_response(cache["doc"])
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def add_routes(app: web.Application) -> None:
    app[DOCUMENT] = {}
    app.router.add_get("/openapi.json", openapi_json)
    for section, title in (("ui", "Operator console"), ("docs", "API documentation")):
        page, asset = _pages(section, title)
        app.router.add_get(f"/{section}", page)
        app.router.add_get(f"/{section}/", page)
        app.router.add_get(f"/{section}/{{asset}}", asset)
