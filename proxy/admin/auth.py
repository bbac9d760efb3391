"""Who is calling the admin API, resolved once per request by the admin application's
middleware, from what each handler already declares with ``@operation(auth=...)``:

* ``auth="none"``: public (the console's static pages, the OpenAPI document);
* ``auth="key"``: any active key; finer rules (a member reads only its own key) stay in the
  handler, which reads the caller with ``caller_of(request)``;
* ``auth="admin"``: an org or cluster admin key; a member's key is a 403 before the handler
  runs.

The declaration that documents an operation is the one that guards it, so the OpenAPI
document's 401/403 and the checks cannot drift apart. A handler whose path names an org
(``@org_in_path("orgId")``) has that id checked (400) before the role (403), the order the
org endpoints have always answered in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.admin.access import org_id_param
from proxy.errors import forbidden
from proxy.gateway.state import GATEWAY
from proxy.ledger.api_keys import Identity
from proxy.openapi import declared

H = TypeVar("H", bound=Callable[..., Any])

CALLER = web.RequestKey("admin_caller", Identity)
"""The identity of the key that made the request (routes declared ``admin`` or ``key``)."""
PATH_ORG = web.RequestKey("admin_path_org", str)
"""The org id of the path, checked (routes declared with ``@org_in_path``)."""
AUTH_KINDS = ("admin", "key", "none")
"""The declarations the admin application serves; anything else is refused at start-up."""
_ORG_PARAM = "__admin_org_param__"


def caller_of(request: web.Request) -> Identity:
    """The caller the middleware resolved."""
    return request[CALLER]


def path_org(request: web.Request) -> str:
    """The path's org id, valid as an id (not necessarily one the caller may see)."""
    return request[PATH_ORG]


def org_in_path(param: str) -> Callable[[H], H]:
    """The handler's path names an org in ``param``: checked before the caller's role."""

    def mark(handler: H) -> H:
        setattr(handler, _ORG_PARAM, param)
        return handler

    return mark


def require_admin(identity: Identity) -> None:
    if identity.role == "member":
        raise forbidden("This endpoint needs an org_admin or cluster_admin key.")


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Resolves the caller of every declared route before its handler runs (401 for a
    missing, unknown or revoked key; 403 for a member on an admin route)."""
    spec = declared(request.match_info.handler)
    if spec is None or spec.auth == "none":
        return await handler(request)
    identity = await request.app[GATEWAY].auth.identify(request)
    request[CALLER] = identity
    param = getattr(request.match_info.handler, _ORG_PARAM, None)
    if param is not None:
        request[PATH_ORG] = org_id_param(request.match_info[param], param)
    if spec.auth == "admin":
        require_admin(identity)
    return await handler(request)
