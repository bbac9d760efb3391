"""The usage reports' query parameters, parsed by hand so that every fault is a 400 naming
its parameter in the words the MKA1 client expects, and the opaque page cursor (shared with
``/api/v1/llm/usage/requests``)."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web

from proxy.errors import bad_request
from proxy.gateway.pipeline import on_behalf_of
from proxy.ledger.keys import valid_id

MAX_SECONDS = 10**11
"""Later than the year 5000: a timestamp this large was sent in milliseconds."""
DIGITS = re.compile(r"^[0-9]{1,20}$")


def values(request: web.Request, name: str) -> list[str]:
    """A param sent once (``name=v``) or repeated (``name=a&name=b``)."""
    return request.query.getall(name, [])


def seconds(request: web.Request, name: str, required: bool) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        if required:
            raise bad_request(f"'{name}' is required (Unix time in seconds).", param=name)
        return None
    if not DIGITS.match(raw):
        raise bad_request(f"'{name}' must be a Unix time in whole seconds.", param=name)
    value = int(raw)
    if value >= MAX_SECONDS:
        raise bad_request(f"'{name}' must be in seconds, not milliseconds.", param=name)
    return value


def group_by(request: web.Request, allowed: Sequence[str], default: list[str]) -> list[str]:
    chosen = values(request, "group_by")
    for name in chosen:
        if name not in allowed:
            raise bad_request(
                f"'group_by' takes {', '.join(allowed)}; got '{name}'.", param="group_by"
            )
    if not chosen:
        return default
    return list(dict.fromkeys(chosen))


def boolean(request: web.Request, name: str) -> bool | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    lowered = raw.strip().lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise bad_request(f"'{name}' must be true or false.", param=name)


def org_ids(request: web.Request, name: str) -> list[str]:
    found = values(request, name)
    for org_id in found:
        if not valid_id(org_id):
            raise bad_request(f"'{name}': '{org_id[:64]}' is not an org id.", param=name)
    return found


def end_users(request: web.Request, given: list[str]) -> frozenset[str] | None:
    """The end-user filter: ``X-On-Behalf-Of`` restricts a read to that end user."""
    acting_for = on_behalf_of(request)
    if acting_for is None:
        return frozenset(given) if given else None
    if given and acting_for not in given:
        return frozenset()
    return frozenset({acting_for})


@dataclass(frozen=True)
class Cursor:
    next_start: int
    end: int


def encode_cursor(cursor: Cursor, digest: str) -> str:
    raw = f"v1.{cursor.next_start}.{cursor.end}.{digest}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str, digest: str) -> Cursor:
    """Opaque to clients, validated here: a cursor from another query (or made up) is a 400."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        version, start, end, given = raw.split(".")
        cursor = Cursor(int(start), int(end))
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise bad_request("'page' is not a cursor this endpoint returned.", param="page") from None
    if version != "v1" or given != digest:
        raise bad_request(
            "'page' belongs to another query: repeat the query it came from.", param="page"
        )
    return cursor
