"""Request bodies: bounded by aiohttp's ``client_max_size`` (413 past it), JSON objects only.

The proxy prices and checks its own reading of a body, and forwards the client's bytes as they
came (no second serialisation of a long prompt). So a body is accepted only when every JSON
parser must read it the same way:

* UTF-8 only (``json.loads`` would also guess UTF-16/32, which an upstream may not);
* no duplicate keys: ``{"max_tokens": 100000, "max_tokens": 1}`` is read as 1 here and could be
  read as 100000 upstream (spending past the reservation), and a duplicate ``model`` could get
  past a key's model allow-list. No SDK ever sends one, so it is refused, not repaired;
* nesting at most ``MAX_DEPTH`` deep: deeper bodies exhaust the recursion of the code that
  walks them (``json`` itself, the tokenizer, the re-encoding of an aliased model).

A body still arriving when its handler reads it holds a connection for as long as its sender
likes (up to ``body_deadline_seconds``): ``BodiesInFlight`` caps how many of those one key may
have at once in a process (``max_bodies_per_key``; past it 429 and the connection is closed),
so one key's slow uploads cannot take every connection. A body that came whole with its head —
nearly every request — skips the count.

Measured on this machine: the duplicate check adds ~1.5 µs to a one-message chat body (2 µs to
parse), ~60 µs to a 60 kB body of 200 messages; the depth walk ~0.6 µs and ~50 µs.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from proxy.dialects.form import boundary_of, parse_form
from proxy.errors import ApiError, bad_request

MAX_DEPTH = 128
_SHOWN_KEY_CHARS = 64


class _Duplicate(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Duplicate(key)
            seen.add(key)
    return obj


def _too_deep(value: Any, limit: int) -> bool:
    """Iterative, so the check itself cannot run out of stack."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        node, depth = pop()
        if depth > limit:
            return True
        for child in node.values() if type(node) is dict else node:
            kind = type(child)
            if kind is dict or kind is list:
                push((child, depth + 1))
    return False


_DECODER = json.JSONDecoder(object_pairs_hook=_unique)
"""One decoder for every body: ``json.loads`` with a hook builds a new one per call."""


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a dict, or an ApiError (400) saying what is wrong with it."""
    try:
        text = raw.decode("utf-8")
        body = _DECODER.decode(text)
    except _Duplicate as exc:
        shown = exc.key[:_SHOWN_KEY_CHARS]
        raise ApiError(
            400,
            f"The JSON body has the key '{shown}' more than once in one object; each key may "
            "appear once.",
            param=shown,
            code="duplicate_key",
        ) from None
    except RecursionError:
        raise _too_deep_error() from None
    except UnicodeDecodeError:
        raise bad_request("The request body must be UTF-8 encoded JSON.") from None
    except ValueError:
        raise bad_request("We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    # Each level of nesting opens a bracket: a body with few brackets cannot be too deep, and
    # counting them (in C) costs a fraction of the walk.
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH and _too_deep(body, MAX_DEPTH):
        raise _too_deep_error()
    return body


def _too_deep_error() -> ApiError:
    return bad_request(f"The JSON body is nested more than {MAX_DEPTH} levels deep.")


class TooManyBodies(ApiError):
    """Answered with the connection closed: its body is unread, and reading it out is the
    hold on the connection the cap exists to end."""

    close_connection = True


class BodiesInFlight:
    """Per key id: bodies still arriving, in this process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._open)

    def held(self, key_id: str) -> int:
        return self._open.get(key_id, 0)

    async def read(self, request: web.Request, key_id: str) -> bytes:
        if request.content.is_eof():
            return await request.read()
        held = self._open.get(key_id, 0)
        if held >= self.limit:
            raise TooManyBodies(
                429,
                f"This key already has {held} request bodies arriving; send the body whole, "
                "or wait for those to finish.",
                type="rate_limit_error",
                code="too_many_bodies_in_flight",
            )
        self._open[key_id] = held + 1
        try:
            return await request.read()
        finally:
            left = self._open[key_id] - 1
            if left:
                self._open[key_id] = left
            else:
                del self._open[key_id]


async def read_json(
    request: web.Request, key_id: str | None = None, bodies: BodiesInFlight | None = None
) -> dict[str, Any]:
    """``key_id`` and ``bodies``: count the read against that key's bodies in flight."""
    if bodies is not None and key_id is not None:
        return parse_json_object(await bodies.read(request, key_id))
    return parse_json_object(await request.read())


async def read_form(
    request: web.Request, key_id: str, bodies: BodiesInFlight
) -> dict[str, Any]:
    """A ``multipart/form-data`` body (``proxy.dialects.form``), counted as ``read_json``'s;
    a Content-Type without a boundary, or a declared length past the limit (an upload is
    large: answered now, not after the client has sent its bytes), is refused unread."""
    content_type = request.headers.get("Content-Type", "")
    if boundary_of(content_type) is None:
        raise bad_request(
            "This endpoint takes multipart/form-data with a boundary in the Content-Type."
        )
    declared = request.content_length
    if declared is not None and declared > request.client_max_size:
        raise web.HTTPRequestEntityTooLarge(
            max_size=request.client_max_size, actual_size=declared
        )
    return parse_form(await bodies.read(request, key_id), content_type)
