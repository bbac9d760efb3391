"""One admitted request, from reservation to settlement: what forwarding fills in and the
settle records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.catalog.routes import ModelRoute
from proxy.dialects.base import Usage
from proxy.ledger.api_keys import Identity


@dataclass
class Exchange:
    """One admitted request, from reservation to settlement."""

    identity: Identity
    request_id: str
    endpoint: str
    route: ModelRoute
    prompt_tokens: int
    on_behalf_of: str | None
    usage: Usage | None = None
    status: int = 0
    client_gone: bool = False
    upstream_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    upstream: str = ""
    """The upstream that served (the first of the model's list unless a fallback did)."""
    output_cap: int = 0
    clamped_cap: int | None = None
    """The lowered output cap per choice the upstream gets, when the request was clamped."""
