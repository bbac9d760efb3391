"""The delivery's body (the event and the budget as the API shows it) and its Standard
Webhooks ``v1`` signature (how a receiver verifies it: the package docstring)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from proxy.admin.budget_shapes import gauge, public
from proxy.ledger.budgets import Spend

_EVENT_FIELDS = (
    "id",
    "type",
    "pct",
    "period_key",
    "spend_snapshot",
    "limit_snapshot",
    "created_at",
    "budget_id",
)


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks ``v1`` signature; the key is the secret's UTF-8 bytes."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    mac = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def payload(
    event: dict[str, Any],
    budget: dict[str, Any],
    org_id: str,
    window: str,
    spend: Spend,
    reset_at: str,
) -> bytes:
    """The body: the event and the budget as the API shows it (never the secret). An end-user
    budget's event names its end user (``target_id``); the spend shown is theirs, also for the
    default for each end user."""
    shown = public(budget, org_id)
    shown["spend"] = gauge(budget, window, spend, reset_at)
    event_view = {name: event.get(name) for name in _EVENT_FIELDS}
    if "target_id" in event:
        event_view["target_id"] = event["target_id"]
    body = {"type": f"budget.{event['type']}", "event": event_view, "budget": shown}
    return json.dumps(body, separators=(",", ":")).encode()
