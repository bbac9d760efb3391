"""OpenAI's stored responses, read back by the org that created them: ``GET`` and ``DELETE
/v1/responses/{id}``, ``POST …/cancel``, ``GET …/input_items``.

When a ``POST /v1/responses`` the upstream stored (``store``) is settled, the proxy notes the
response's id in the creating org's own key space (``rsp:<id>`` -> the upstream that stored
it, kept ``KEPT_SECONDS``, as long as OpenAI keeps it). A read names the id only: it is looked
up in the caller's org, so another org's id, like an unknown one, answers 404 and is never
forwarded. These reads cost nothing upstream and are relayed, not metered; what a response
cost was charged when it was created.
"""

from __future__ import annotations

import logging
import re

from aiohttp import web
from redis.exceptions import RedisError

from proxy.errors import ApiError, store_unavailable
from proxy.gateway.state import GATEWAY, Gateway
from proxy.ledger.keys import org_key
from proxy.providers.redact import REDACTOR
from proxy.providers.upstream import client_headers, upstream_broken

log = logging.getLogger(__name__)
KEPT_SECONDS = 30 * 86400
_ID = re.compile(r"[A-Za-z0-9_-]{1,200}")
ROUTES: tuple[tuple[str, str], ...] = (
    ("GET", ""),
    ("DELETE", ""),
    ("POST", "/cancel"),
    ("GET", "/input_items"),
)
"""(method, path after ``responses/{response_id}``) of the routes served here."""


async def note_stored(gw: Gateway, org_id: str, response_id: str, upstream: str) -> None:
    """Best effort: a response whose note is lost reads as 404 to its org (never to another)."""
    if not _ID.fullmatch(response_id) or not upstream:
        return
    try:
        key = org_key(org_id, "response", response_id)
        await gw.redis.set(key, upstream, px=KEPT_SECONDS * 1000)
    except (RedisError, OSError):
        log.warning("could not note stored response %s of org %s", response_id, org_id)


def _not_found(response_id: str) -> ApiError:
    return ApiError(
        404,
        f"No response with id '{response_id[:200]}' was found for this organization.",
        code="response_not_found",
        param="response_id",
    )


async def relay_stored(request: web.Request, method: str, tail: str) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    identity = await gw.auth.identify(request)
    response_id = request.match_info["response_id"]
    if not _ID.fullmatch(response_id):
        raise _not_found(response_id)
    key = org_key(identity.org_id, "response", response_id)
    try:
        upstream_name = await gw.redis.get(key)
    except (RedisError, OSError):
        raise store_unavailable() from None
    if upstream_name is None:
        raise _not_found(response_id)
    upstream = next((u for u in gw.settings.upstreams if u.name == upstream_name), None)
    if upstream is None or upstream.kind != "openai":  # gone from the configuration since
        raise _not_found(response_id)
    path = f"responses/{response_id}{tail}"
    if request.query_string:
        path += "?" + request.query_string
    answer = await gw.upstream.send(upstream, path, b"", request.headers, method=method)
    try:
        body = b"".join([chunk async for chunk in answer.iter_chunks()])
    except Exception as exc:
        raise upstream_broken(upstream) from exc
    finally:
        answer.release()
    if method == "DELETE" and answer.status == 200:
        try:
            await gw.redis.delete(key)
        except (RedisError, OSError):
            log.warning("could not forget deleted response %s", response_id)
    headers = REDACTOR.headers(client_headers(answer.headers))
    return web.Response(status=answer.status, body=REDACTOR.data(body), headers=headers)
