"""The services one proxy process holds, reachable from every handler as ``app[GATEWAY]``."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from proxy.catalog.routes import ModelTable
from proxy.config import Settings
from proxy.gateway.auth import Authenticator
from proxy.gateway.body import BodiesInFlight
from proxy.gateway.detached import DetachedSettles
from proxy.ledger.admission import Admission
from proxy.ledger.api_keys import KeyStore
from proxy.ledger.budgets import BudgetStore
from proxy.ledger.windows import Clock
from proxy.providers.fallback import CoolDowns
from proxy.providers.upstream import UpstreamClient
from proxy.store.client import Redis


@dataclass
class Gateway:
    settings: Settings
    redis: Redis
    keys: KeyStore
    budgets: BudgetStore
    auth: Authenticator
    admission: Admission
    upstream: UpstreamClient
    routes: ModelTable
    clock: Clock
    cooldowns: CoolDowns = field(default_factory=CoolDowns)
    """Upstreams that failed recently, tried last in a model's fallback list."""
    bodies: BodiesInFlight = field(default_factory=lambda: BodiesInFlight(64))
    """Request bodies still arriving, per key (``server.max_bodies_per_key``)."""
    settles: DetachedSettles = field(default_factory=DetachedSettles)
    """Settles whose request was cancelled (its client left) while they ran."""


GATEWAY = web.AppKey("gateway", Gateway)
