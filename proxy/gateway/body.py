"""Request bodies: bounded by aiohttp's ``client_max_size`` (413 past it), JSON objects only."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from proxy.errors import bad_request


async def read_json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise bad_request("We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body
