"""Budget-alert webhooks: signed deliveries that are never lost and never sent twice at once.

The request path only *records*: when settle (or a budget PUT) crosses a threshold of a budget
with a webhook URL, ``ledger/lua/events.lua`` writes the delivery record and its per-org outbox
entry in the same atomic step as the event. Every proxy process runs one background loop
(``delivery_ctx``) that delivers from the outbox, so an LLM request never waits on a receiver.

Redis keys (all under the org's hash tag, so this works on Redis Cluster):

* ``bp:{o:<org>}:outbox`` — ZSET event id → when the entry may next be claimed (ms).
* ``bp:{o:<org>}:wh:<event id>`` — HASH: event, budget (raw JSON, with its webhook secret
  sealed when ``PROXY_SECRET_KEY`` is set, see ``proxy.store.secret_box``), status
  (``pending`` | ``delivered`` | ``failed``), attempts, created_ms, last_error,
  last_attempt_ms, delivered_ms, and the current claim (claim_token, claimed_by,
  claimed_until). Finished records expire after ``record_ttl_hours``.
* ``bp:{o:<org>}:whlog`` — ZSET event id → created_ms: what ``GET /api/v1/webhooks/deliveries``
  lists besides the outbox.

Why it neither loses nor doubles an event: a claim (``webhook_outbox.lua``) atomically takes a
due entry, counts the attempt and moves its score to ``now + claim_timeout_seconds``; no other
process can claim it before then, and ``claim_timeout_seconds`` exceeds the bound on one whole
attempt (``total_timeout_seconds``), so attempts never overlap. A process killed mid-attempt
leaves the entry to be claimed again once its claim expires. Success removes the entry;
failure puts it back at a jittered exponential back-off, until ``max_attempt_hours`` after the
event, when it is marked failed. Delivery is at-least-once: a receiver that answered 2xx
while the sender died before recording it gets the event again, under the same id.

Safety: only http(s); the host is resolved here and the connection goes to the address that
was checked (no DNS-rebinding window). Loopback, private, link-local, multicast, reserved,
unspecified and cloud-metadata addresses are refused — a permanent failure — unless inside
``webhooks.allow_private_targets``; so are IPv6 addresses that embed a refused IPv4 address
(IPv4-mapped and -compatible, 6to4, Teredo, NAT64) and deprecated site-local ones (fec0::/10).
Redirects are not followed (a 3xx is a failed attempt), proxies from the environment are
ignored, and at most 4 KiB of the answer is read.

Verifying a delivery (receiver side, Standard Webhooks; the key is the UTF-8 bytes of the
budget's ``webhook_secret``)::

    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + raw_body
    expected = base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest())
    ok = any(
        hmac.compare_digest(sig.partition(",")[2].encode(), expected)
        for sig in headers["webhook-signature"].split()
        if sig.startswith("v1,")
    )
    # also: reject timestamps more than ~5 minutes from now, and deduplicate on webhook-id

or, with the ``standardwebhooks`` package (it takes the key base64-encoded)::

    Webhook(base64.b64encode(secret.encode()).decode()).verify(raw_body, headers)

A budget without a secret gets unsigned deliveries (no ``webhook-signature`` header).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import random
import secrets
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeAlias

import aiohttp
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError
from yarl import URL

from proxy.admin.access import OrgId, require_admin
from proxy.admin.schemas import DeliveryStatus, WebhookDeliveryList
from proxy.config import WebhookConfig
from proxy.errors import not_found
from proxy.gateway import metrics
from proxy.gateway.state import GATEWAY, Gateway
from proxy.ledger.budgets import Spend, gauge, public
from proxy.ledger.keys import ORGS_KEY, org_prefix
from proxy.ledger.scripts import OUTBOX
from proxy.ledger.windows import iso_millis, rfc3339
from proxy.openapi import Reply, operation, parse_query
from proxy.store.client import Redis
from proxy.store.secret_box import SecretUnavailable

log = logging.getLogger(__name__)

USER_AGENT = "llm-budget-proxy-webhooks/0.1"
RESPONSE_READ_CAP = 4096
ERROR_MAX_CHARS = 300
SHUTDOWN_GRACE_SECONDS = 2.0
_LIST_DEFAULT, _LIST_MAX = 100, 1000
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

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


class TargetRefused(Exception):
    """A target that must never be contacted: retrying cannot help, so the delivery fails."""


# --- signing and payload -------------------------------------------------------------------


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


def backoff_seconds(attempts: int, config: WebhookConfig) -> float:
    """Exponential from ``retry_base_seconds``, capped, with jitter in its upper half so
    receivers that fail together are not retried together."""
    ceiling = min(config.retry_max_seconds, config.retry_base_seconds * 2 ** min(attempts - 1, 60))
    return float(ceiling / 2 + random.uniform(0, ceiling / 2))


# --- target checks -------------------------------------------------------------------------


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address reaches or stands for: 6to4 (2002::/16), Teredo
    (2001::/32: server and client), NAT64 (64:ff9b::/96) and IPv4-compatible (::/96)."""
    found: list[ipaddress.IPv4Address] = []
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    if address in NAT64_PREFIX or (address in IPV4_COMPATIBLE and int(address) > 1):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def _refusal(address: IPAddress) -> str | None:
    """Why this address is not a public unicast one; None when it is."""
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if isinstance(address, ipaddress.IPv6Address):
        if address.is_site_local:
            return "a site-local address (fec0::/10, deprecated)"
        for inner in _embedded_ipv4(address):
            why = _refusal(inner)
            if why is not None:
                return f"an IPv6 address embedding {inner}, {why}"
    checks = (
        ("loopback", address.is_loopback),
        ("unspecified", address.is_unspecified),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("non-public", not address.is_global),
    )
    return next((f"a {name} address" for name, hit in checks if hit), None)


def _normal(address: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 (``::ffff:127.0.0.1``) is judged as the IPv4 address it reaches."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


async def resolve_target(url: URL, allowed: list[IPNetwork]) -> IPAddress:
    """The address to connect to: the first one the host resolves to that may be contacted.

    Raises TargetRefused (permanent) for bad schemes and forbidden addresses; OSError for a
    failed lookup (transient).
    """
    if url.scheme not in ("http", "https") or not url.raw_host:
        raise TargetRefused("refused target: only http and https URLs with a host are delivered")
    host = url.raw_host
    try:
        candidates: list[IPAddress] = [ipaddress.ip_address(host)]
    except ValueError:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, url.port, type=socket.SOCK_STREAM)
        candidates = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    reasons: list[str] = []
    for candidate in candidates:
        address = _normal(candidate)
        why = None if any(address in net for net in allowed) else _refusal(address)
        if why is None:
            return address
        reasons.append(f"{address} is {why}")
    raise TargetRefused(
        f"refused target {host}: {reasons[0] if reasons else 'no address'}"
        " (allow it with webhooks.allow_private_targets)"
    )


def _host_header(url: URL) -> str:
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"
    return host if url.is_default_port() else f"{host}:{url.port}"


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:ERROR_MAX_CHARS]


# --- delivery ------------------------------------------------------------------------------


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
            pipe.zrangebyscore(org_prefix(org_id) + "outbox", "-inf", now_ms, start=0, num=free)
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
            "Host": _host_header(url),
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


# --- visibility ----------------------------------------------------------------------------

_RECORD_FIELDS = (
    "event",
    "budget",
    "status",
    "attempts",
    "last_error",
    "created_ms",
    "last_attempt_ms",
    "delivered_ms",
)


def _ms_iso(value: str | None) -> str | None:
    return iso_millis(int(value) / 1000) if value else None


def _delivery_view(
    org_id: str, event_id: str, fields: list[str | None], due_ms: float | None
) -> dict[str, Any] | None:
    record = dict(zip(_RECORD_FIELDS, fields, strict=True))
    if record["event"] is None or record["budget"] is None:
        return None
    event = json.loads(record["event"])
    budget = json.loads(record["budget"])
    status = record["status"] or "pending"
    return {
        "object": "webhook_delivery",
        "event_id": event_id,
        "org_id": org_id,
        "budget_id": event.get("budget_id"),
        "type": f"budget.{event.get('type')}",
        "url": budget.get("alert_webhook_url"),
        "status": status,
        "attempts": int(record["attempts"] or 0),
        "last_error": record["last_error"],
        "created_at": _ms_iso(record["created_ms"]),
        "last_attempt_at": _ms_iso(record["last_attempt_ms"]),
        "next_attempt_at": _ms_iso(str(int(due_ms))) if status == "pending" and due_ms else None,
        "delivered_at": _ms_iso(record["delivered_ms"]),
        "_created_ms": int(record["created_ms"] or 0),
    }


async def org_deliveries(redis: Redis, org_id: str, limit: int) -> list[dict[str, Any]]:
    """The org's newest delivery records: finished or attempted ones, and queued ones."""
    prefix = org_prefix(org_id)
    pipe = redis.pipeline(transaction=False)
    pipe.zrevrange(prefix + "whlog", 0, limit - 1)
    pipe.zrange(prefix + "outbox", 0, limit - 1)
    logged, queued = await pipe.execute()
    ids = list(dict.fromkeys([*logged, *queued]))
    pipe = redis.pipeline(transaction=False)
    for event_id in ids:
        pipe.hmget(prefix + "wh:" + event_id, *_RECORD_FIELDS)
        pipe.zscore(prefix + "outbox", event_id)
    replies = await pipe.execute()
    views = [
        _delivery_view(org_id, event_id, replies[2 * i], replies[2 * i + 1])
        for i, event_id in enumerate(ids)
    ]
    return [v for v in views if v is not None]


class DeliveriesQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    status: DeliveryStatus | None = None
    limit: int = Field(_LIST_DEFAULT, ge=1, le=_LIST_MAX, description="Newest first.")
    org_id: OrgId | None = Field(None, description="Only this org's (cluster admins).")


@operation(
    "List webhook deliveries",
    tag="webhooks",
    auth="admin",
    query=DeliveriesQuery,
    answers=Reply(200, "Deliveries with status, attempts and last error.", WebhookDeliveryList),
    errors={404: "No such org, or another org than the caller's."},
)
async def list_deliveries(request: web.Request) -> web.Response:
    """Cluster admins: every org, or ``?org_id=``; org admins: their org; others: 403."""
    gw = request.app[GATEWAY]
    caller = await gw.auth.identify(request)
    require_admin(caller)
    query = parse_query(DeliveriesQuery, request.query)
    status, limit, wanted = query.status, query.limit, query.org_id
    if wanted is not None:
        if caller.role != "cluster_admin" and wanted != caller.org_id:
            raise not_found(f"No org '{wanted}'.")
    if caller.role == "cluster_admin":
        orgs = [wanted] if wanted is not None else await gw.keys.orgs()
    else:
        orgs = [caller.org_id]
    data: list[dict[str, Any]] = []
    for org_id in orgs:
        data.extend(await org_deliveries(gw.redis, org_id, limit))
    if status is not None:
        data = [d for d in data if d["status"] == status]
    data.sort(key=lambda d: (d["_created_ms"], d["event_id"]), reverse=True)
    for d in data:
        del d["_created_ms"]
    return web.json_response({"object": "list", "data": data[:limit]})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/webhooks/deliveries", list_deliveries)
