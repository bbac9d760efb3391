"""One process's delivery loop: claims due outbox entries (``webhook_outbox.lua``) and
delivers them, so an LLM request never waits on a receiver. Why an event is neither lost nor
sent twice at once: the package docstring."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import random
import secrets
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from redis.exceptions import RedisError
from yarl import URL

from proxy.admin.webhooks.signing import payload, sign
from proxy.admin.webhooks.target import IPNetwork, TargetRefused, host_header, resolve_target
from proxy.config import WebhookConfig
from proxy.gateway import metrics
from proxy.gateway.state import GATEWAY, Gateway
from proxy.ledger.keys import ORGS_KEY, org_key, org_prefix
from proxy.ledger.scripts import OUTBOX
from proxy.ledger.windows import rfc3339
from proxy.store.client import Redis
from proxy.store.secret_box import SecretUnavailable

log = logging.getLogger(__name__)

USER_AGENT = "llm-budget-proxy-webhooks/0.1"
RESPONSE_READ_CAP = 4096
ERROR_MAX_CHARS = 300
SHUTDOWN_GRACE_SECONDS = 2.0


def backoff_seconds(attempts: int, config: WebhookConfig) -> float:
    """Exponential from ``retry_base_seconds``, capped, with jitter in its upper half so
    receivers that fail together are not retried together."""
    ceiling = min(config.retry_max_seconds, config.retry_base_seconds * 2 ** min(attempts - 1, 60))
    return float(ceiling / 2 + random.uniform(0, ceiling / 2))


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:ERROR_MAX_CHARS]


@dataclass(frozen=True)
class Claim:
    org_id: str
    event_id: str
    token: str
    event_raw: str
    budget_raw: str
    attempts: int
    created_ms: int


class Deliverer:
    """One process's delivery loop: claims due outbox entries and delivers them, at most
    ``concurrency`` at a time."""

    def __init__(self, gw: Gateway) -> None:
        self._gw = gw
        self._config = gw.settings.webhooks
        self._redis: Redis = gw.redis
        self._allowed: list[IPNetwork] = [
            ipaddress.ip_network(cidr, strict=False) for cidr in self._config.allow_private_targets
        ]
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._inflight: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=self._config.concurrency, force_close=True, use_dns_cache=False
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            auto_decompress=False,
        )
        self._loop_task = asyncio.create_task(self._run(), name="webhook-delivery")

    async def stop(self) -> None:
        """Stop claiming; let attempts in flight finish briefly, then hand back the rest.

        A flag, not only ``cancel()``, ends the loop: on Python 3.11 redis-py's
        ``asyncio.wait_for`` can swallow a cancellation that lands as a command completes.
        """
        self._stopping = True
        grace = min(SHUTDOWN_GRACE_SECONDS, self._config.total_timeout_seconds)
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.wait([self._loop_task], timeout=grace)
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=grace)
        for task in self._inflight:
            task.cancel()
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=grace)
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        failing = False
        while not self._stopping:
            try:
                await self.poll_once()
                failing = False
            except (RedisError, OSError) as exc:
                if not failing:
                    log.warning("webhook outbox unreachable (%s); retrying", exc)
                failing = True
            except Exception:
                log.exception("webhook delivery loop error")
            await asyncio.sleep(self._config.poll_seconds)

    async def poll_once(self) -> int:
        """Claims what is due, up to the free delivery slots; returns how many were claimed."""
        free = self._config.concurrency - len(self._inflight)
        if free <= 0 or self._stopping:
            return 0
        orgs = list(await self._redis.smembers(ORGS_KEY))
        if not orgs:
            return 0
        random.shuffle(orgs)  # no org's backlog always goes first
        now_ms = int(self._gw.clock() * 1000)
        pipe = self._redis.pipeline(transaction=False)
        for org_id in orgs:
            pipe.zrangebyscore(org_key(org_id, "outbox"), "-inf", now_ms, start=0, num=free)
        due: list[tuple[str, list[str]]] = [
            (org_id, ids) for org_id, ids in zip(orgs, await pipe.execute(), strict=True) if ids
        ]
        claimed = 0
        for position in range(free):  # round-robin over the orgs with due entries
            for org_id, ids in due:
                if position < len(ids) and claimed < free and not self._stopping:
                    claim = await self._claim(org_id, ids[position])
                    if claim is not None:
                        claimed += 1
                        task = asyncio.create_task(self._deliver(claim))
                        self._inflight.add(task)
                        task.add_done_callback(self._inflight.discard)
        return claimed

    async def _claim(self, org_id: str, event_id: str) -> Claim | None:
        now_ms = int(self._gw.clock() * 1000)
        token = secrets.token_hex(8)
        until = now_ms + int(self._config.claim_timeout_seconds * 1000)
        got = await OUTBOX(
            self._redis,
            [org_prefix(org_id)],
            ["claim", event_id, now_ms, until, self.worker, token],
        )
        if not got:
            return None
        event_raw, budget_raw, attempts, created_ms = got
        return Claim(org_id, event_id, token, event_raw, budget_raw, int(attempts), int(created_ms))

    async def _deliver(self, claim: Claim) -> None:
        try:
            try:
                error, permanent = await self._attempt(claim)
            except Exception as exc:  # a bug here, not the receiver's: retry, visibly
                log.exception("webhook %s: delivery error", claim.event_id)
                error, permanent = f"internal error: {_short(exc)}", False
            if error is None:
                metrics.WEBHOOKS.labels("delivered").inc()
                await self._ack(claim)
            else:
                metrics.WEBHOOKS.labels("refused" if permanent else "failed").inc()
                await self._fail(claim, error, permanent)
        except asyncio.CancelledError:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._call(claim, "release", claim.token)
            raise
        except (RedisError, OSError) as exc:
            # The outcome could not be recorded; the claim expires and the entry is retried.
            log.warning("webhook %s: could not record the outcome: %s", claim.event_id, exc)

    async def _attempt(self, claim: Claim) -> tuple[str | None, bool]:
        """One HTTP attempt; returns (error or None, whether the failure is permanent)."""
        try:
            event = json.loads(claim.event_raw)
            budget = json.loads(claim.budget_raw)
            url = URL(budget["alert_webhook_url"])
        except (ValueError, KeyError, TypeError) as exc:
            return f"unreadable outbox record: {_short(exc)}", True
        try:
            async with asyncio.timeout(self._config.total_timeout_seconds):
                status = await self._send(claim, url, event, budget)
        except TargetRefused as exc:
            return str(exc)[:ERROR_MAX_CHARS], True
        except SecretUnavailable as exc:
            # Never sent unsigned; retried, as the key may yet be restored.
            log.warning("webhook %s: its secret cannot be opened: %s", claim.event_id, exc)
            return f"webhook secret cannot be opened: {exc}"[:ERROR_MAX_CHARS], False
        except TimeoutError:
            return f"timed out after {self._config.total_timeout_seconds:g} s", False
        except socket.gaierror as exc:
            return f"DNS lookup failed: {_short(exc)}", False
        except (aiohttp.ClientError, OSError, RedisError) as exc:
            return _short(exc), False
        except (KeyError, TypeError, ValueError) as exc:
            return f"unreadable outbox record: {_short(exc)}", True
        if 200 <= status < 300:
            return None, False
        if 300 <= status < 400:
            return f"HTTP {status}: redirects are not followed", False
        return f"HTTP {status}", False

    async def _send(
        self, claim: Claim, url: URL, event: dict[str, Any], budget: dict[str, Any]
    ) -> int:
        assert self._session is not None
        address = await resolve_target(url, self._allowed)
        now = self._gw.clock()
        windows = self._gw.admission.windows(now)
        window = windows.of(budget["period"])
        scope, scope_id = budget["scope"], budget["scope_id"]
        if scope == "external_user_default":
            scope, scope_id = "external_user", event.get("target_id") or ""
        spend = await self._gw.budgets.spend(claim.org_id, scope, scope_id, window)
        reset_at = rfc3339(windows.end(budget["period"]))
        body = payload(event, budget, claim.org_id, window, spend, reset_at)
        timestamp = int(now)
        headers = {
            "Host": host_header(url),
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "webhook-id": claim.event_id,
            "webhook-timestamp": str(timestamp),
        }
        secret = self._gw.budgets.webhook_secret(budget)
        if secret:
            headers["webhook-signature"] = sign(secret, claim.event_id, timestamp, body)
        async with self._session.post(
            url.with_host(str(address)).with_fragment(None),
            data=body,
            headers=headers,
            allow_redirects=False,
            server_hostname=url.raw_host if url.scheme == "https" else None,
            timeout=aiohttp.ClientTimeout(sock_connect=self._config.connect_timeout_seconds),
        ) as response:
            await response.content.read(RESPONSE_READ_CAP)  # drained a little, then dropped
            return response.status

    async def _ack(self, claim: Claim) -> None:
        keep = int(self._config.record_ttl_hours * 3600)
        await self._call(claim, "ack", keep)

    async def _fail(self, claim: Claim, error: str, permanent: bool) -> None:
        now_ms = int(self._gw.clock() * 1000)
        retry_at = now_ms + int(backoff_seconds(claim.attempts, self._config) * 1000)
        deadline = claim.created_ms + int(self._config.max_attempt_hours * 3600 * 1000)
        give_up = permanent or retry_at > deadline
        if give_up and not permanent:
            error = (
                f"{error} (gave up after {claim.attempts} attempts in "
                f"{self._config.max_attempt_hours:g} h)"
            )
        keep = int(self._config.record_ttl_hours * 3600)
        outcome = await self._call(claim, "fail", claim.token, error, retry_at, int(give_up), keep)
        log.info(
            "webhook %s attempt %d failed (%s): %s", claim.event_id, claim.attempts, outcome, error
        )

    async def _call(self, claim: Claim, op: str, *args: Any) -> Any:
        now_ms = int(self._gw.clock() * 1000)
        return await OUTBOX(
            self._redis, [org_prefix(claim.org_id)], [op, claim.event_id, now_ms, *args]
        )


async def delivery_ctx(app: web.Application) -> AsyncIterator[None]:
    """Runs this process's delivery loop for the application's lifetime."""
    deliverer = Deliverer(app[GATEWAY])
    await deliverer.start()
    yield
    await deliverer.stop()
