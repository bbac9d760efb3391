"""Fallbacks: a model served by a list of upstreams, the next tried when one fails before the
client has seen a byte.

A failure here is one that leaves nothing to charge and nothing sent twice: no connection
could be made (nothing left the proxy), or the upstream answered 429 or 5xx (it refused the
work). Timeouts and connections that broke after the request was written are not retried: the
upstream may have done — and billed — the work. The caller reserves once for all attempts and
settles once with the usage of the upstream that served, so a request is never charged twice.

A failing upstream cools down for its ``cooldown_seconds``: it is tried after the others until
then (per process; an upstream is never skipped outright, so a request is not refused while
some upstream might still answer).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from proxy.config import UpstreamConfig
from proxy.errors import ApiError
from proxy.providers.http import Response, UpstreamConnectError
from proxy.providers.upstream import UpstreamClient


@dataclass(frozen=True, slots=True)
class Candidate:
    """One upstream that can serve a model, with what it needs to do so."""

    upstream: UpstreamConfig
    model: str
    """The model name the body carries for this upstream (Azure: the deployment)."""
    deployment: str = ""
    """Azure: the deployment in the path of dated API versions."""
    weight: float | None = None


def missing_credential(upstream: UpstreamConfig) -> ApiError:
    return ApiError(
        503,
        f"The upstream '{upstream.name}' has no credential: the environment variable "
        f"{upstream.api_key_env} is not set in the proxy's environment.",
        type="api_error",
        code="upstream_credential_missing",
    )


def _retryable(status: int) -> bool:
    return status == 429 or status >= 500


@dataclass
class CoolDowns:
    """When each upstream that failed may lead the order again (monotonic clock)."""

    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    _until: dict[str, float] = field(default_factory=dict)

    def failed(self, upstream: UpstreamConfig) -> None:
        if upstream.cooldown_seconds > 0:
            self._until[upstream.name] = self.clock() + upstream.cooldown_seconds

    def cooling(self, name: str) -> bool:
        until = self._until.get(name)
        if until is None:
            return False
        if until <= self.clock():
            del self._until[name]
            return False
        return True

    def order(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        """Config order, or a weighted random order when weights are given (an unweighted
        entry weighs 1); upstreams cooling down go last, in that same order."""
        ordered = list(candidates)
        if len(ordered) > 1 and any(c.weight is not None for c in ordered):
            # Weighted sampling without replacement (Efraimidis-Spirakis): key u^(1/w).
            keys = {id(c): self.rng.random() ** (1.0 / (c.weight or 1.0)) for c in ordered}
            ordered.sort(key=lambda c: keys[id(c)], reverse=True)
        if len(ordered) > 1:
            ordered.sort(key=lambda c: self.cooling(c.upstream.name))  # stable: keeps order
        return ordered


@dataclass(slots=True)
class Served:
    response: Response
    candidate: Candidate
    skipped: list[str]
    """``name:why`` of every upstream tried before, for the access log."""


async def send(
    client: UpstreamClient,
    cooldowns: CoolDowns,
    candidates: Sequence[Candidate],
    endpoint: str,
    body_for: Callable[[Candidate], bytes],
    headers: Mapping[str, str],
    content_type: str = "application/json",
) -> Served:
    """The first answer worth relaying: one that is not a connect failure, 429 or 5xx — or
    whatever the last upstream answered. Raises the last upstream's ``ApiError`` when it could
    not be reached either."""
    order = cooldowns.order(candidates)
    skipped: list[str] = []
    for index, candidate in enumerate(order):
        last = index == len(order) - 1
        upstream = candidate.upstream
        if upstream.api_key_env and upstream.kind != "bedrock" and not upstream.credential():
            # Sent without a credential, the provider's 401 would read as the client's key
            # being wrong: refused here, naming the variable (never its value).
            if last:
                raise missing_credential(upstream)
            skipped.append(f"{upstream.name}:no_credential")
            continue
        try:
            response = await client.send(
                upstream,
                endpoint,
                body_for(candidate),
                headers,
                candidate.deployment,
                content_type,
            )
        except ApiError as exc:
            if not isinstance(exc.__cause__, UpstreamConnectError):
                raise
            cooldowns.failed(upstream)
            if last:
                raise
            skipped.append(f"{upstream.name}:connect")
            continue
        if _retryable(response.status):
            cooldowns.failed(upstream)
            if not last:
                response.release()
                skipped.append(f"{upstream.name}:{response.status}")
                continue
        return Served(response, candidate, skipped)
    raise AssertionError("a model has at least one upstream")  # pragma: no cover
