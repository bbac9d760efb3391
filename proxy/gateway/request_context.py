"""Per-request values the middlewares and the handlers share."""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass

from aiohttp import web

from proxy.gateway.exchange import Exchange


@dataclass(slots=True)  # per request: not frozen (a frozen __init__ costs several times more)
class Outcome:
    """What the request path learned about one LLM request, for its access-log line and its
    metrics: filled in as the request goes, read once by the request-log middleware. What an
    admitted request did upstream and what it cost is its ``exchange`` (the record settle
    wrote), not a copy of it."""

    endpoint: str
    decision: str = "auth"
    key_id: str | None = None
    org_id: str | None = None
    on_behalf_of: str | None = None
    model: str | None = None
    model_label: str = ""
    """The bounded name metrics take (``ModelRoute.counted_as``): never one a client invented."""
    request_id: str | None = None
    """The accounting id (the lease's and the usage record's), not the echoed ``x-request-id``."""
    clamped_max_tokens: int | None = None
    exchange: Exchange | None = None
    """The admitted request, once it was admitted."""


OUTCOME = web.RequestKey("outcome", Outcome)

REQUEST_ID = web.RequestKey("request_id", str)
"""The id returned as ``x-request-id``: the caller's own when it sent a sane one."""

_PROCESS = secrets.token_hex(5)
_COUNTER = itertools.count(1)


def new_request_id() -> str:
    """Unique across processes (random per-process prefix) and cheap (no syscall)."""
    return f"req_{_PROCESS}{next(_COUNTER):08x}"
