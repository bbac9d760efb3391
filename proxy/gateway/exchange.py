"""One admitted request, from reservation to settlement: what forwarding fills in and the
settle records."""

from __future__ import annotations

from dataclasses import dataclass

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
    upstream: str = ""
    """The upstream that served (the first of the model's list unless a fallback did)."""
    output_cap: int = 0
    upstream_endpoint: str = ""
    """What the upstream is asked for (``Dialect.upstream_endpoint``)."""
    clamped_cap: int | None = None
    """The lowered output cap per choice the upstream gets, when the request was clamped."""
    cost_nano: int = 0
    """What settle charged (the usage priced)."""
    upstream_error: str | None = None
    """``timeout``, ``connect``, ``broken_body``, ``broken_stream``: how the upstream failed."""
    fallback_from: str | None = None
    """The upstreams tried before the one that served, comma-separated."""
    answered: bool = False
    """The whole answer was written to the client (a client closing after it is no 499)."""
