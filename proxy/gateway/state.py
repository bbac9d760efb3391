"""The services one proxy process holds, reachable from every handler as ``app[GATEWAY]``."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from proxy.config import Settings
from proxy.gateway.admission import Admission
from proxy.gateway.auth import Authenticator
from proxy.gateway.body import BodiesInFlight
from proxy.gateway.model_routes import ModelTable
from proxy.providers.fallback import CoolDowns
from proxy.providers.upstream import UpstreamClient
from proxy.store.budgets import BudgetStore
from proxy.store.connection import Redis
from proxy.store.keys import KeyStore
from proxy.store.windows import Clock


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
    bodies: BodiesInFlight = field(default_factory=lambda: BodiesInFlight(8))
    """Request bodies still arriving, per key (``server.max_bodies_per_key``)."""


GATEWAY = web.AppKey("gateway", Gateway)
