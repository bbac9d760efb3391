"""Budget-alert webhooks as a receiver sees them: signed, complete, once per threshold, retried
until delivered, taken over when a proxy dies, never sent to internal addresses, and never in
the way of LLM requests.

Every receiver is a real HTTP server on 127.0.0.1 (allowed through ``allow_private_targets``
where a test wants deliveries to arrive).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import inspect
import ipaddress
import json
import logging
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import ADMIN_KEY, FakeClock, Proxy, start_proxy_process, write_config
from helpers import sdk_chat, user_messages
from standardwebhooks import Webhook, WebhookVerificationError
from yarl import URL

from proxy.admin.webhooks.target import TargetRefused, resolve_target
from proxy.store.embedded_redis import free_port
from proxy.store.secret_box import SecretBox, SecretKeyError, SecretUnavailable

FAST: dict[str, Any] = {
    "allow_private_targets": ["127.0.0.0/8"],
    "poll_seconds": 0.02,
    "retry_base_seconds": 0.05,
    "retry_max_seconds": 0.2,
    "connect_timeout_seconds": 1.0,
    "total_timeout_seconds": 3.0,
    "claim_timeout_seconds": 5.0,
}
SECRET = "s3cret-ключ-🔑"  # raw UTF-8, not base64: the key is its UTF-8 bytes
HI = user_messages("hi")
CHAT = {"model": "gpt-4o-mini", "messages": HI, "max_tokens": 16}


async def chat(client: openai.AsyncOpenAI) -> int:
    """One small chat request (the body of ``CHAT``); returns the tokens it used."""
    answer = await sdk_chat(client, "gpt-4o-mini", HI, max_tokens=16)
    assert answer.usage is not None
    return answer.usage.total_tokens


class TickingClock(FakeClock):
    """Wall time plus whatever the test advances, so back-offs elapse on their own."""

    def __init__(self) -> None:
        super().__init__(0.0)

    def __call__(self) -> float:
        return time.time() + self.now


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int | None = None


Respond = Callable[[Hit, int], Awaitable[web.Response]]


async def ok(hit: Hit, n: int) -> web.Response:
    return web.Response(text="ok")


@dataclass
class Receiver:
    """A webhook receiver that records every request; ``respond`` decides each answer."""

    respond: Respond = ok
    hits: list[Hit] = field(default_factory=list)
    server: TestServer | None = None

    async def start(self, port: int | None = None) -> Receiver:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.server = TestServer(app, host="127.0.0.1", port=port or free_port())
        await self.server.start_server()
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/hook"))

    async def _handle(self, request: web.Request) -> web.Response:
        hit = Hit(request.path, dict(request.headers), await request.read())
        self.hits.append(hit)
        response = await self.respond(hit, len(self.hits))
        hit.answered = response.status
        return response


@pytest.fixture
async def receivers() -> AsyncIterator[list[Receiver]]:
    started: list[Receiver] = []
    yield started
    for receiver in started:
        if receiver.server is not None:
            await receiver.server.close()


async def receiver(
    started: list[Receiver], respond: Respond = ok, port: int | None = None
) -> Receiver:
    result = await Receiver(respond).start(port)
    started.append(result)
    return result


async def wait_for(check: Callable[[], Any], what: str, within: float = 10.0) -> Any:
    """Polls ``check`` (plain or async) until it gives something truthy; fails at the deadline."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def deliveries(proxy: Proxy, key: str | None = None, **query: str) -> list[dict[str, Any]]:
    path = "/api/v1/webhooks/deliveries"
    if query:
        path += "?" + "&".join(f"{k}={v}" for k, v in query.items())
    status, body = await proxy.admin("GET", path, key=key)
    assert status == 200, body
    return list(body["data"])


async def delivery_of(proxy: Proxy, event_id: str) -> dict[str, Any]:
    found = [d for d in await deliveries(proxy) if d["event_id"] == event_id]
    assert len(found) == 1, found
    return found[0]


async def settled(proxy: Proxy, event_id: str, status: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        record = await delivery_of(proxy, event_id)
        return record if record["status"] == status else None

    result: dict[str, Any] = await wait_for(check, f"{event_id} {status}")
    return result


async def key_with_spend(proxy: Proxy, org: str = "acme") -> tuple[str, str]:
    """A key that has made one LLM request, so thresholds can be crossed on a budget PUT."""
    key_id, plaintext = await proxy.create_key(org=org)
    await chat(proxy.openai(plaintext))
    return key_id, plaintext


def budget_body(url: str | None, secret: str | None = None, owner: str = "org") -> dict[str, Any]:
    """A budget whose 10 % alert line (10 tokens) is behind any key that made a request."""
    return {
        "period": "daily",
        "limit_kind": "tokens",
        "limit": 100,
        "thresholds": [{"pct": 10, "action": "alert"}],
        "owner": owner,
        "webhook_url": url,
        "webhook_secret": secret,
    }


async def alert_now(
    proxy: Proxy,
    key_id: str,
    url: str,
    secret: str | None = None,
    owner: str = "org",
    scope_path: str | None = None,
) -> dict[str, Any]:
    """PUTs an alerting budget that is already past its threshold; returns the BudgetEvent."""
    path = scope_path or f"/api/v1/llm/budgets/apikey/{key_id}"
    status, body = await proxy.admin("PUT", path, budget_body(url, secret, owner))
    assert status == 200, body
    status, events = await proxy.admin("GET", path + "/events")
    assert status == 200, events
    mine = [e for e in events["data"] if e["budget_id"] == body["id"]]
    assert len(mine) == 1, events
    return dict(mine[0])


def independent_signature(secret: str, hit: Hit) -> str:
    signed = f"{hit.headers['webhook-id']}.{hit.headers['webhook-timestamp']}.".encode() + hit.body
    return base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()


async def test_delivery_is_signed_complete_and_never_carries_the_secret(
    start_proxy: Callable[..., Awaitable[Proxy]], receivers: list[Receiver]
) -> None:
    proxy = await start_proxy(webhooks=FAST)
    target = await receiver(receivers)
    key_id, _ = await key_with_spend(proxy)
    signed_event = await alert_now(proxy, key_id, target.url, SECRET, owner="org")
    unsigned_event = await alert_now(proxy, key_id, target.url, None, owner="cluster")

    record = await settled(proxy, signed_event["id"], "delivered")
    await settled(proxy, unsigned_event["id"], "delivered")
    assert record["attempts"] == 1 and record["delivered_at"] and record["url"] == target.url
    by_id = {hit.headers["webhook-id"]: hit for hit in target.hits}
    assert len(target.hits) == 2 and set(by_id) == {signed_event["id"], unsigned_event["id"]}

    hit = by_id[signed_event["id"]]
    verified = Webhook(base64.b64encode(SECRET.encode()).decode()).verify(hit.body, hit.headers)
    versions = dict(sig.split(",", 1) for sig in hit.headers["webhook-signature"].split())
    assert versions["v1"] == independent_signature(SECRET, hit)
    with pytest.raises(WebhookVerificationError):
        Webhook(base64.b64encode(b"another secret").decode()).verify(hit.body, hit.headers)
    with pytest.raises(WebhookVerificationError):
        tampered = hit.body.replace(b'"pct":10', b'"pct":11')
        Webhook(base64.b64encode(SECRET.encode()).decode()).verify(tampered, hit.headers)
    assert abs(int(hit.headers["webhook-timestamp"]) - time.time()) < 60
    assert hit.headers["Content-Type"] == "application/json"
    assert hit.headers["User-Agent"].startswith("llm-budget-proxy")

    assert verified["type"] == "budget.threshold_alert"
    assert verified["event"] == signed_event
    _, budgets = await proxy.admin("GET", f"/api/v1/llm/budgets/apikey/{key_id}")
    shown = next(b for b in budgets["data"] if b["id"] == signed_event["budget_id"])
    assert verified["budget"] == shown  # the Budget shape, with the spend gauge
    everything = hit.body + json.dumps(hit.headers).encode()
    assert SECRET.encode() not in everything and b"webhook_secret" not in everything

    unsigned = by_id[unsigned_event["id"]]
    assert "webhook-signature" not in unsigned.headers
    assert json.loads(unsigned.body)["budget"]["owner"] == "cluster"


async def test_one_delivery_per_threshold_with_200_concurrent_requests_on_four_proxies(
    start_proxy: Callable[..., Awaitable[Proxy]], receivers: list[Receiver], redis_url: str
) -> None:
    # Four proxies on one Redis: four delivery loops race for every outbox entry. They share
    # this test's event loop with the clients, which a burst of 200 keeps busy: Redis's
    # timeouts are widened so a slow machine cannot turn that into 503s.
    slow_ok = {"socket_timeout": 10, "hot_path_timeout": 20}
    proxies = [await start_proxy(webhooks=FAST, redis=slow_ok) for _ in range(4)]
    first = proxies[0]
    target = await receiver(receivers)
    _, probe = await first.create_key(org="probe")
    per_request = await chat(first.openai(probe))

    key_id, plaintext = await first.create_key(org="acme")
    status, budget = await first.admin(
        "PUT",
        f"/api/v1/llm/budgets/apikey/{key_id}",
        {
            "period": "daily",
            "limit_kind": "tokens",
            "limit": 20 * per_request,
            "thresholds": [{"pct": 50, "action": "alert"}, {"pct": 100, "action": "block"}],
            "webhook_url": target.url,
            "webhook_secret": SECRET,
        },
    )
    assert status == 200, budget
    clients = [proxy.openai(plaintext) for proxy in proxies]

    async def one(n: int) -> int:
        try:
            await chat(clients[n % len(clients)])
            return 200
        except openai.APIStatusError as exc:  # 429 once the budget is spent
            return exc.status_code

    for _ in range(10):  # a burst of 200 at once, again until the block line is reached
        outcomes = await asyncio.gather(*(one(n) for n in range(200)))
        assert set(outcomes) <= {200, 429}, [o for o in outcomes if o not in (200, 429)]
        _, budgets = await first.admin("GET", f"/api/v1/llm/budgets/apikey/{key_id}")
        if budgets["data"][0]["spend"]["status"] == "blocked":
            break
    else:
        raise AssertionError("the budget never reached its block line")

    _, events = await first.admin("GET", f"/api/v1/llm/budgets/apikey/{key_id}/events")
    assert sorted((e["type"], e["pct"]) for e in events["data"]) == [
        ("blocked", 100),
        ("threshold_alert", 50),
    ]
    for event in events["data"]:
        await settled(first, event["id"], "delivered")
    client = redis.Redis.from_url(redis_url)
    assert client.zcard("bp:{o:acme}:outbox") == 0  # nothing left that could be sent again
    client.close()
    assert sorted(hit.headers["webhook-id"] for hit in target.hits) == sorted(
        e["id"] for e in events["data"]
    )
    assert sorted(json.loads(hit.body)["type"] for hit in target.hits) == [
        "budget.blocked",
        "budget.threshold_alert",
    ]


async def test_failed_attempts_are_retried_under_the_same_id_until_delivered(
    start_proxy: Callable[..., Awaitable[Proxy]], receivers: list[Receiver]
) -> None:
    proxy = await start_proxy(clock=TickingClock(), webhooks=FAST)
    release = asyncio.Event()

    async def fail_twice(hit: Hit, n: int) -> web.Response:
        if n <= 2:
            return web.Response(status=500, text="not now")
        await release.wait()
        return web.Response(status=204)

    target = await receiver(receivers, fail_twice)
    key_id, _ = await key_with_spend(proxy)
    event = await alert_now(proxy, key_id, target.url, SECRET)

    await wait_for(lambda: len(target.hits) == 3, "the third attempt")
    during = await delivery_of(proxy, event["id"])
    assert during["status"] == "pending" and during["attempts"] == 3
    assert during["last_error"] == "HTTP 500"
    release.set()

    record = await settled(proxy, event["id"], "delivered")
    assert record["attempts"] == 3
    assert [hit.headers["webhook-id"] for hit in target.hits] == [event["id"]] * 3
    webhook = Webhook(base64.b64encode(SECRET.encode()).decode())
    for hit in target.hits:
        webhook.verify(hit.body, hit.headers)


async def test_a_receiver_that_was_down_gets_the_event_once_it_listens(
    start_proxy: Callable[..., Awaitable[Proxy]], receivers: list[Receiver]
) -> None:
    proxy = await start_proxy(clock=TickingClock(), webhooks=FAST)
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    key_id, _ = await key_with_spend(proxy)
    event = await alert_now(proxy, key_id, url, SECRET)

    async def refused_twice() -> bool:
        record = await delivery_of(proxy, event["id"])
        return record["attempts"] >= 2 and "connect" in (record["last_error"] or "").lower()

    await wait_for(refused_twice, "failed connection attempts")
    assert (await delivery_of(proxy, event["id"]))["status"] == "pending"

    target = await receiver(receivers, port=port)
    record = await settled(proxy, event["id"], "delivered")
    assert [hit.headers["webhook-id"] for hit in target.hits] == [event["id"]]
    assert record["attempts"] >= 3


async def test_redirects_are_not_followed(
    start_proxy: Callable[..., Awaitable[Proxy]], receivers: list[Receiver]
) -> None:
    proxy = await start_proxy(clock=TickingClock(), webhooks=FAST)

    async def redirect(hit: Hit, n: int) -> web.Response:
        if hit.path == "/hook":
            raise web.HTTPFound("/elsewhere")
        return web.Response(text="followed")

    target = await receiver(receivers, redirect)
    key_id, _ = await key_with_spend(proxy)
    event = await alert_now(proxy, key_id, target.url, SECRET)

    async def redirected_twice() -> bool:
        return int((await delivery_of(proxy, event["id"]))["attempts"]) >= 2

    await wait_for(redirected_twice, "two attempts")
    record = await delivery_of(proxy, event["id"])
    assert record["status"] == "pending"
    assert record["last_error"] == "HTTP 302: redirects are not followed"
    assert {hit.path for hit in target.hits} == {"/hook"}


async def test_internal_targets_are_refused_before_any_connection(
    start_proxy: Callable[..., Awaitable[Proxy]], receivers: list[Receiver]
) -> None:
    proxy = await start_proxy(webhooks={"poll_seconds": 0.02})  # no allow_private_targets
    listening = await receiver(receivers)
    key_id, _ = await key_with_spend(proxy)
    org_path = "/api/v1/llm/budgets/org/acme"
    targets = {
        "loopback address": (listening.url, "org", None),
        "loopback": (listening.url.replace("127.0.0.1", "localhost"), "cluster", None),
        "cloud metadata address": ("http://169.254.169.254/latest/meta-data/", "org", org_path),
        "private address": ("http://10.20.30.40/hook", "cluster", org_path),
    }
    for reason, (url, owner, path) in targets.items():
        event = await alert_now(proxy, key_id, url, SECRET, owner=owner, scope_path=path)
        record = await settled(proxy, event["id"], "failed")
        assert record["attempts"] == 1
        assert record["last_error"].startswith("refused target")
        assert reason in record["last_error"], record
    assert listening.hits == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://[::ffff:10.0.0.1]/hook", "private address"),  # IPv4-mapped IPv6
        ("http://[fd00:ec2::254]/latest", "cloud metadata address"),
        ("http://[::1]:8080/hook", "loopback address"),
        ("http://224.0.0.1/hook", "multicast address"),
        ("http://0.0.0.0/hook", "unspecified address"),
        ("http://100.64.0.1/hook", "non-public address"),  # carrier-grade NAT
        ("ftp://93.184.216.34/hook", "only http and https"),
        # Issue 11 item 8: IPv6 forms of refused IPv4 addresses, and site-local.
        ("http://[2002:7f00:1::]/hook", "embedding 127.0.0.1, a loopback address"),  # 6to4
        ("http://[2002:a9fe:a9fe::1]/", "embedding 169.254.169.254, a cloud metadata address"),
        ("http://[2002:a00:1::1]/hook", "embedding 10.0.0.1, a private address"),
        ("http://[fec0::1]/hook", "site-local address"),
        ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", "embedding 127.0.0.1"),  # Teredo
        ("http://[64:ff9b::a00:1]/hook", "embedding 10.0.0.1"),  # NAT64
        ("http://[::7f00:1]/hook", "embedding 127.0.0.1"),  # IPv4-compatible
    ],
)
async def test_address_rules_refuse_internal_targets(url: str, reason: str) -> None:
    """Judged on the address alone: nothing is connected to here."""
    with pytest.raises(TargetRefused, match=reason):
        await resolve_target(URL(url), [])


async def test_allowed_networks_and_public_addresses_pass() -> None:
    allowed = [ipaddress.ip_network("10.0.0.0/8")]
    assert str(await resolve_target(URL("http://10.1.2.3/x"), allowed)) == "10.1.2.3"
    assert str(await resolve_target(URL("https://93.184.216.34/x"), [])) == "93.184.216.34"
    public_6to4 = "2002:5db8:d822::1"  # 6to4 of 93.184.216.34
    assert str(await resolve_target(URL(f"https://[{public_6to4}]/x"), [])) == public_6to4
    with pytest.raises(TargetRefused, match="metadata"):
        await resolve_target(URL("http://169.254.169.254/"), allowed)


async def test_gives_up_after_max_attempt_hours(
    start_proxy: Callable[..., Awaitable[Proxy]], receivers: list[Receiver]
) -> None:
    clock = TickingClock()
    proxy = await start_proxy(clock=clock, webhooks=FAST)

    async def always_fail(hit: Hit, n: int) -> web.Response:
        return web.Response(status=503)

    target = await receiver(receivers, always_fail)
    key_id, _ = await key_with_spend(proxy)
    event = await alert_now(proxy, key_id, target.url, SECRET)
    await wait_for(lambda: len(target.hits) >= 2, "retries")
    assert (await delivery_of(proxy, event["id"]))["status"] == "pending"

    clock.advance(25 * 3600)
    record = await settled(proxy, event["id"], "failed")
    assert record["last_error"].startswith("HTTP 503 (gave up after")
    hits = len(target.hits)
    assert await delivery_of(proxy, event["id"]) == record  # failed is final
    assert len(target.hits) == hits


async def test_deliveries_are_visible_to_admins_of_their_org_only(
    start_proxy: Callable[..., Awaitable[Proxy]], receivers: list[Receiver]
) -> None:
    proxy = await start_proxy(webhooks=FAST)
    target = await receiver(receivers)
    acme_key, _ = await key_with_spend(proxy, "acme")
    other_key, _ = await key_with_spend(proxy, "other")
    acme_event = await alert_now(proxy, acme_key, target.url, SECRET)
    other_event = await alert_now(proxy, other_key, target.url, SECRET)
    await settled(proxy, acme_event["id"], "delivered")
    await settled(proxy, other_event["id"], "delivered")
    _, acme_admin = await proxy.create_key(org="acme", role="org_admin")
    _, member = await proxy.create_key(org="acme")

    mine = await deliveries(proxy, acme_admin)
    assert [d["event_id"] for d in mine] == [acme_event["id"]]
    assert mine[0]["budget_id"] == acme_event["budget_id"] and mine[0]["org_id"] == "acme"
    status, body = await proxy.admin(
        "GET", "/api/v1/webhooks/deliveries?org_id=other", key=acme_admin
    )
    assert status == 404, body
    status, body = await proxy.admin("GET", "/api/v1/webhooks/deliveries", key=member)
    assert status == 403 and body["error"]["code"] == "forbidden"
    every = {d["event_id"] for d in await deliveries(proxy)}
    assert every == {acme_event["id"], other_event["id"]}
    only_other = await deliveries(proxy, org_id="other", status="delivered")
    assert [d["event_id"] for d in only_other] == [other_event["id"]]
    assert await deliveries(proxy, org_id="other", status="failed") == []


async def test_slow_receiver_does_not_slow_llm_requests(
    start_proxy: Callable[..., Awaitable[Proxy]], receivers: list[Receiver]
) -> None:
    proxy = await start_proxy(webhooks={**FAST, "concurrency": 64})

    async def slow(hit: Hit, n: int) -> web.Response:
        await asyncio.sleep(2.0)  # the receiver's behaviour under test, not synchronisation
        return web.Response(text="finally")

    target = await receiver(receivers, slow)
    _, probe = await proxy.create_key(org="probe")
    per_request = await chat(proxy.openai(probe))

    async def run(webhook_url: str | None) -> list[float]:
        """50 sequential requests, each crossing one more 2 % alert threshold."""
        key_id, plaintext = await proxy.create_key(org="acme")
        status, body = await proxy.admin(
            "PUT",
            f"/api/v1/llm/budgets/apikey/{key_id}",
            {
                "period": "daily",
                "limit_kind": "tokens",
                "limit": 50 * per_request,
                "thresholds": [{"pct": 2 * i, "action": "alert"} for i in range(1, 51)],
                "webhook_url": webhook_url,
                "webhook_secret": SECRET,
            },
        )
        assert status == 200, body
        client = proxy.openai(plaintext)
        latencies = []
        for _ in range(50):
            started = time.perf_counter()
            await chat(client)
            latencies.append(time.perf_counter() - started)
        return latencies

    quiet = await run(None)
    busy = await run(target.url)

    async def delivering() -> bool:
        return bool(target.hits)

    # The 50 requests can finish before the poller's first claim; from the first hit on, the
    # receiver holds every delivery for 2 s, and LLM requests made meanwhile must not wait.
    await wait_for(delivering, "the first delivery to reach the slow receiver", within=10)
    client = proxy.openai(probe)
    for _ in range(20):
        started = time.perf_counter()
        await chat(client)
        busy.append(time.perf_counter() - started)
    answered_when_done = sum(hit.answered is not None for hit in target.hits)
    print(
        f"\nLLM request p50 without webhooks: {statistics.median(quiet) * 1000:.2f} ms, "
        f"with 50 deliveries to a 2 s receiver in flight: {statistics.median(busy) * 1000:.2f} ms"
    )
    assert answered_when_done < 50, "the LLM requests waited for the receiver"

    async def all_answered() -> bool:
        return sum(hit.answered == 200 for hit in target.hits) == 50

    await wait_for(all_answered, "50 slow deliveries", within=20)
    assert len({hit.headers["webhook-id"] for hit in target.hits}) == 50


@pytest.mark.slow
async def test_delivery_of_a_killed_proxy_is_completed_once_by_another(
    tmp_path: Path, mock_upstream: TestServer, redis_url: str, receivers: list[Receiver]
) -> None:
    first_seen, release = asyncio.Event(), asyncio.Event()

    async def hold_first(hit: Hit, n: int) -> web.Response:
        if n == 1:  # the first attempt is in flight when its proxy is killed
            first_seen.set()
            await release.wait()
            return web.Response(status=500)
        return web.Response(text="ok")

    target = await receiver(receivers, hold_first)
    config = write_config(
        tmp_path / "proxy.toml",
        str(mock_upstream.make_url("/v1")),
        redis_url,
        webhooks="\n".join(
            [
                'allow_private_targets = ["127.0.0.0/8"]',
                "poll_seconds = 0.05",
                "retry_base_seconds = 0.05",
                "total_timeout_seconds = 2",
                "claim_timeout_seconds = 3",
            ]
        ),
    )
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    doomed = await start_proxy_process(config, tmp_path / "doomed.log")
    survivor = None
    try:
        async with aiohttp.ClientSession(headers=headers) as session:
            base = doomed.url
            async with session.post(base + "/api/v1/keys", json={"org_id": "acme"}) as r:
                key = await r.json()
            async with session.post(
                base + "/v1/chat/completions",
                json=CHAT,
                headers={"Authorization": f"Bearer {key['key']}"},
            ) as r:
                assert r.status == 200, await r.text()
            budget_path = f"/api/v1/llm/budgets/apikey/{key['id']}"
            async with session.put(base + budget_path, json=budget_body(target.url, SECRET)) as r:
                assert r.status == 200, await r.text()
            async with session.get(base + budget_path + "/events") as r:
                (event,) = (await r.json())["data"]

            await asyncio.wait_for(first_seen.wait(), 10)
            doomed.process.kill()  # SIGKILL: no shutdown, no hand-back of the claim
            doomed.process.wait()
            release.set()

            survivor = await start_proxy_process(config, tmp_path / "survivor.log")

            async def delivered() -> dict[str, Any] | None:
                async with session.get(survivor.url + "/api/v1/webhooks/deliveries") as r:
                    (record,) = (await r.json())["data"]
                return record if record["status"] == "delivered" else None

            record = await wait_for(delivered, "the takeover delivery", within=20)
    finally:
        doomed.stop()
        if survivor is not None:
            survivor.stop()

    assert record["attempts"] == 2
    assert [hit.headers["webhook-id"] for hit in target.hits] == [event["id"], event["id"]]
    assert [hit.answered for hit in target.hits].count(200) == 1
    Webhook(base64.b64encode(SECRET.encode()).decode()).verify(
        target.hits[1].body, target.hits[1].headers
    )
    client = redis.Redis.from_url(redis_url)
    assert client.zcard("bp:{o:acme}:outbox") == 0
    client.close()


# --- secrets at rest (issue 11 item 5) -----------------------------------------------------

SECRET_KEY = base64.b64encode(b"k" * 32).decode()
OTHER_KEY = base64.b64encode(b"o" * 32).decode()


def redis_text(redis_url: str) -> str:
    """Every key name and every value of the test Redis, as one string."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    parts: list[str] = []
    try:
        for name in client.scan_iter("*"):
            parts.append(name)
            kind = client.type(name)
            if kind == "hash":
                parts += [f"{k}={v}" for k, v in client.hgetall(name).items()]
            elif kind == "string":
                parts.append(str(client.get(name)))
            elif kind == "list":
                parts += client.lrange(name, 0, -1)
            elif kind == "zset":
                parts += client.zrange(name, 0, -1)
            elif kind == "set":
                parts += list(client.smembers(name))
            elif kind == "stream":
                parts += [json.dumps(fields) for _, fields in client.xrange(name)]
    finally:
        client.close()
    return "\n".join(parts)


def verify(secret: str, hit: Hit) -> dict[str, Any]:
    result: dict[str, Any] = Webhook(base64.b64encode(secret.encode()).decode()).verify(
        hit.body, hit.headers
    )
    return result


async def test_webhook_secrets_are_sealed_at_rest_and_still_sign(
    start_proxy: Callable[..., Awaitable[Proxy]],
    receivers: list[Receiver],
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 11 item 5: secrets were plain text in Redis (the budget, and every queued
    delivery's copy of it). With PROXY_SECRET_KEY set, neither holds it; deliveries are signed
    with it all the same."""
    monkeypatch.setenv("PROXY_SECRET_KEY", SECRET_KEY)
    proxy = await start_proxy(clock=TickingClock(), webhooks=FAST)
    gate = asyncio.Event()

    async def after_gate(hit: Hit, n: int) -> web.Response:
        return web.Response(text="ok") if gate.is_set() else web.Response(status=503)

    target = await receiver(receivers, after_gate)
    key_id, _ = await key_with_spend(proxy)
    event = await alert_now(proxy, key_id, target.url, SECRET)
    await wait_for(lambda: target.hits, "a first (refused) attempt")
    stored = redis_text(redis_url)
    assert "webhook_secret_sealed" in stored  # in the budget and in the queued delivery
    assert "s3cret" not in stored  # (JSON writes the rest of it as \\u escapes)
    gate.set()
    await settled(proxy, event["id"], "delivered")
    assert verify(SECRET, target.hits[-1])["event"]["id"] == event["id"]


async def test_secrets_stored_before_a_key_was_set_are_sealed_at_the_next_start(
    start_proxy: Callable[..., Awaitable[Proxy]],
    receivers: list[Receiver],
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delenv("PROXY_SECRET_KEY", raising=False)
    caplog.set_level(logging.WARNING)
    old = await start_proxy(clock=TickingClock(), webhooks=FAST)
    assert "PROXY_SECRET_KEY is not set" in caplog.text  # said at start-up
    gate = asyncio.Event()

    async def after_gate(hit: Hit, n: int) -> web.Response:
        return web.Response(text="ok") if gate.is_set() else web.Response(status=503)

    target = await receiver(receivers, after_gate)
    key_id, _ = await key_with_spend(old)
    event = await alert_now(old, key_id, target.url, SECRET)
    await wait_for(lambda: target.hits, "a first (refused) attempt")
    assert "s3cret" in redis_text(redis_url)  # plain text: no key was set
    await old.server.close()  # its deliverer stops too

    monkeypatch.setenv("PROXY_SECRET_KEY", f"{SECRET_KEY},{OTHER_KEY}")
    new = await start_proxy(clock=TickingClock(), webhooks=FAST)
    assert "s3cret" not in redis_text(redis_url)  # the budget and the queued delivery, sealed
    gate.set()
    await settled(new, event["id"], "delivered")
    assert verify(SECRET, target.hits[-1])["event"]["id"] == event["id"]


async def test_a_secret_that_cannot_be_opened_is_never_sent_unsigned(
    start_proxy: Callable[..., Awaitable[Proxy]],
    receivers: list[Receiver],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PROXY_SECRET_KEY", SECRET_KEY)
    sealer = await start_proxy(webhooks={**FAST, "poll_seconds": 3600})  # never gets to deliver
    target = await receiver(receivers)
    key_id, _ = await key_with_spend(sealer)
    event = await alert_now(sealer, key_id, target.url, SECRET)
    await sealer.server.close()
    monkeypatch.setenv("PROXY_SECRET_KEY", OTHER_KEY)  # the sealing key is gone
    proxy = await start_proxy(clock=TickingClock(), webhooks=FAST)

    async def errored() -> dict[str, Any] | None:
        record = await delivery_of(proxy, event["id"])
        return record if record["last_error"] else None

    record = await wait_for(errored, "an attempt that could not open the secret")
    assert record["status"] == "pending"  # retried: the key may be restored
    assert "secret cannot be opened" in record["last_error"]
    assert target.hits == []  # never sent unsigned


def test_the_secret_key_must_be_32_bytes_of_base64() -> None:
    for bad in ("short", base64.b64encode(b"x" * 31).decode(), "not base64 at all!" * 3):
        with pytest.raises(SecretKeyError):
            SecretBox.from_env({"PROXY_SECRET_KEY": bad})
    assert SecretBox.from_env({}) is None
    new, old = (
        SecretBox.from_env({"PROXY_SECRET_KEY": f"{OTHER_KEY},{SECRET_KEY}"}),
        (SecretBox.from_env({"PROXY_SECRET_KEY": SECRET_KEY})),
    )
    assert new is not None and old is not None
    sealed = old.seal(SECRET)
    assert SECRET not in sealed and old.seal(SECRET) != sealed  # a fresh nonce each time
    assert new.open(sealed) == SECRET  # rotation: the new list still opens old values
    with pytest.raises(SecretUnavailable):
        SecretBox.from_env({"PROXY_SECRET_KEY": OTHER_KEY}).open(sealed)  # type: ignore[union-attr]
    with pytest.raises(SecretUnavailable):
        old.open(sealed[:-4] + "AAAA")  # altered


async def test_a_default_end_user_budget_delivers_per_end_user_with_their_spend(
    start_proxy: Callable[..., Awaitable[Proxy]], receivers: list[Receiver]
) -> None:
    proxy = await start_proxy(webhooks=FAST)
    target = await receiver(receivers)
    _, key = await proxy.create_key(org="acme")
    path = "/api/v1/llm/budgets/external-user-default?org_id=acme"
    status, default = await proxy.admin("PUT", path, budget_body(target.url, SECRET))
    assert status == 200, default
    used = {}
    for user in ("alice", "bob"):
        answer = await proxy.openai(key).chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=16,
            extra_headers={"X-On-Behalf-Of": user},
        )
        assert answer.usage is not None
        used[user] = answer.usage.total_tokens
    await chat(proxy.openai(key))  # naming nobody: the default does not apply
    await wait_for(lambda: len(target.hits) >= 2, "two deliveries")
    payloads = [json.loads(hit.body) for hit in target.hits]
    assert sorted(p["event"]["target_id"] for p in payloads) == ["alice", "bob"]
    for p in payloads:
        assert p["event"]["budget_id"] == default["id"]
        assert p["budget"]["scope"] == "external_user_default"
        assert p["budget"]["scope_org_id"] == "acme"
        assert p["budget"]["spend"]["tokens_spent"] == str(used[p["event"]["target_id"]])
