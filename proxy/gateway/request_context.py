"""Per-request values the middlewares and the handlers share."""

from __future__ import annotations

import itertools
import secrets
from typing import Any

from aiohttp import web

OUTCOME = web.RequestKey("outcome", dict[str, Any])
"""What the LLM handler learned (key, model, decision, tokens, cost, timings), for logs/metrics."""

REQUEST_ID = web.RequestKey("request_id", str)
"""The id returned as ``x-request-id``: the caller's own when it sent a sane one."""

_PROCESS = secrets.token_hex(5)
_COUNTER = itertools.count(1)


def new_request_id() -> str:
    """Unique across processes (random per-process prefix) and cheap (no syscall)."""
    return f"req_{_PROCESS}{next(_COUNTER):08x}"
