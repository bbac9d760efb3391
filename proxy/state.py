"""The services one proxy process holds, reachable from every handler as ``app[GATEWAY]``."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from proxy.admission import Admission
from proxy.auth import Authenticator
from proxy.budgets import BudgetStore
from proxy.config import Settings
from proxy.keys import KeyStore
from proxy.routes import ModelRoute
from proxy.store import Redis
from proxy.upstream import UpstreamClient
from proxy.windows import Clock


@dataclass
class Gateway:
    settings: Settings
    redis: Redis
    keys: KeyStore
    budgets: BudgetStore
    auth: Authenticator
    admission: Admission
    upstream: UpstreamClient
    routes: dict[str, ModelRoute]
    clock: Clock


GATEWAY = web.AppKey("gateway", Gateway)
