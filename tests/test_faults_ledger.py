"""Faults against the books (issue 12, items 1-3), with real processes where a process dies.

- A proxy killed (SIGKILL) with streams in flight: its leases are reclaimed by another process
  with no further traffic, each charged its whole reservation (the most it could have spent),
  never less than what had passed through; slots and in-flight counters come back.
- A lease reclaimed from a proxy that was only cut off: its own settle, arriving later,
  corrects the charge to the actual usage, exactly once.
- A proxy stopped during a Redis outage: its unsettled usage is in the spool on disk and the
  next process replays it exactly once.
- A settle the script keeps refusing is quarantined; it does not hold back the others.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from conftest import (
    ADMIN_KEY,
    FakeClock,
    Proxy,
    eventually,
    make_settings,
    start_proxy_process,
    usage_record,
    write_config,
)
from helpers import user_messages
from prometheus_client import REGISTRY

from proxy.app import create_app
from proxy.catalog.pricing import cost_nano, resolve_price
from proxy.catalog.tokenizer import count_prompt, get_encoding
from proxy.config import MeteringConfig, ModelConfig
from proxy.gateway.lease_sweeper import sweep_once
from proxy.gateway.settle_spool import QUARANTINE_NAME
from proxy.gateway.state import GATEWAY
from proxy.ledger.api_keys import Identity
from proxy.ledger.windows import windows_at
from proxy.store.embedded_redis import EmbeddedRedis, free_port

MESSAGES = user_messages("tell me a long story")


def prefix(org: str) -> str:
    return f"bp:{{o:{org}}}:"


async def create_key(session: aiohttp.ClientSession, url: str, org: str) -> tuple[str, str]:
    async with session.post(
        url + "/api/v1/keys", json={"org_id": org}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ) as response:
        body = await response.json()
        assert response.status == 201, body
        return body["id"], body["key"]


async def spend(store: aioredis.Redis, org: str, tag: str, now: float) -> tuple[int, int]:
    c, t = await store.hmget(f"{prefix(org)}spend:{tag}:{windows_at(now).daily}", "c", "t")
    return int(c or 0), int(t or 0)


async def nothing_held(store: aioredis.Redis, org: str) -> bool:
    return await store.zcard(prefix(org) + "leases") == 0 and not [
        k async for k in store.scan_iter(prefix(org) + "infl:*")
    ]


# --- 1: kill -9 with streams in flight ------------------------------------------------------


@pytest.mark.slow
async def test_a_killed_proxys_streams_are_charged_their_reservation_without_further_traffic(
    tmp_path: Path, redis_url: str, mock_upstream: TestServer, store: aioredis.Redis
) -> None:
    config = write_config(
        tmp_path / "proxy.toml",
        str(mock_upstream.make_url("/v1")),
        redis_url,
        limits=f'lease_seconds = 1\nspool_dir = "{tmp_path / "spool"}"',
    )
    port_a = free_port()
    port_b = free_port()
    while port_b == port_a:
        port_b = free_port()
    victim, survivor = await asyncio.gather(
        start_proxy_process(config, tmp_path / "victim.log", port=port_a),
        start_proxy_process(config, tmp_path / "survivor.log", port=port_b),
    )
    max_tokens = 40
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": max_tokens, "stream": True}
    prompt = await count_prompt(get_encoding("o200k_base"), "chat/completions", body)
    price = resolve_price(ModelConfig(name="gpt-4o-mini", upstream="x"), MeteringConfig())
    assert price is not None
    reserve_tokens = prompt + max_tokens
    reserve_cost = cost_nano(price, prompt, max_tokens)
    seen: dict[int, int] = {}
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            busy_kid, busy_key = await create_key(session, survivor.url, "busy")
            lonely_kid, lonely_key = await create_key(session, survivor.url, "lonely")

            async def stream(index: int, key: str) -> None:
                headers = {
                    "Authorization": f"Bearer {key}",
                    "x-mock-output-tokens": str(max_tokens),
                    "x-mock-chunk-delay-ms": "150",
                }
                seen[index] = 0
                async with session.post(
                    victim.url + "/v1/chat/completions", json=body, headers=headers
                ) as response:
                    assert response.status == 200
                    async for line in response.content:
                        if line.startswith(b"data: {"):
                            seen[index] += 1

            tasks = [asyncio.create_task(stream(i, busy_key)) for i in range(19)]
            tasks.append(asyncio.create_task(stream(19, lonely_key)))

            async def streaming() -> bool:
                return len(seen) == 20 and all(n >= 3 for n in seen.values())

            await eventually(streaming, what="20 streams under way")
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait(timeout=10)
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(o, Exception) for o in outcomes), outcomes
            relayed = sum(seen.values())

            # No request reaches either org again: the survivor's sweeper alone reclaims.
            async def reclaimed() -> bool:
                return await nothing_held(store, "busy") and await nothing_held(store, "lonely")

            await eventually(reclaimed, within=20, what="the dead proxy's leases reclaimed")
            now = time.time()
            busy = await spend(store, "busy", f"k:{busy_kid}", now)
            lonely = await spend(store, "lonely", f"k:{lonely_kid}", now)
            assert busy == (19 * reserve_cost, 19 * reserve_tokens)
            assert lonely == (reserve_cost, reserve_tokens)
            assert await spend(store, "busy", "o", now) == busy
            # Never less than what passed through (each content chunk is one token).
            assert 20 * max_tokens >= relayed and busy[1] + lonely[1] >= relayed + 20 * prompt
            records = [usage_record(f) for _, f in await store.xrange(prefix("busy") + "usage")] + [
                usage_record(f) for _, f in await store.xrange(prefix("lonely") + "usage")
            ]
            assert len(records) == 20
            assert all(r["reclaimed"] == "1" and r["model"] == "gpt-4o-mini" for r in records)
            assert all(r["in"] == prompt and r["out"] == max_tokens for r in records)
            # The slots are back: the key serves again at once.
            headers = {"Authorization": f"Bearer {lonely_key}"}
            plain = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 5}
            async with session.post(
                survivor.url + "/v1/chat/completions", json=plain, headers=headers
            ) as response:
                assert response.status == 200
        log = (tmp_path / "survivor.log").read_text()
        assert "reclaimed" in log and "charged its reservation" in log
    finally:
        victim.stop()
        survivor.stop()


# --- 1b: a reclaimed lease whose proxy settles after all -------------------------------------


async def test_a_late_settle_corrects_the_reclaimed_charge_to_the_actual_usage_once(
    start_proxy: Any, store: aioredis.Redis
) -> None:
    clock = FakeClock()
    proxy: Proxy = await start_proxy(clock=clock, limits={"sweep_seconds": 3600})
    kid, _ = await proxy.create_key()
    gw = proxy.app[GATEWAY]
    who = Identity(kid, "acme", "member")
    decision = await gw.admission.admit(
        who, "req_cut_off", 1000, 50_000, prompt_tokens=400, model="gpt-4o", endpoint="x"
    )
    assert decision.__class__.__name__ == "Admitted"
    # The proxy is cut off long enough for its lease to expire; another sweeper reclaims it.
    clock.advance(gw.settings.limits.lease_seconds + 1)
    await sweep_once(gw)  # (or the proxy's own sweeper got there first)
    assert await nothing_held(store, "acme")
    assert await spend(store, "acme", f"k:{kid}", clock()) == (50_000, 1000)
    # Its own settle arrives: the charge becomes exactly the actual usage.
    req = gw.admission.settle_request(who, "req_cut_off", 420, 7_000, {"rid": "req_cut_off"})
    await gw.admission.settle(req)
    assert await spend(store, "acme", f"k:{kid}", clock()) == (7_000, 420)
    assert await spend(store, "acme", "o", clock()) == (7_000, 420)
    # ...and only once.
    await gw.admission.settle(req)
    assert await spend(store, "acme", f"k:{kid}", clock()) == (7_000, 420)
    assert await nothing_held(store, "acme")


# --- 2: stopped during an outage, replayed by the next process --------------------------------


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis", persist=True)
    await server.astart()
    async with aioredis.Redis.from_url(server.url) as client:
        await client.config_set("appendfsync", "always")
    yield server
    await server.astop()


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(url + "/metrics") as response:
        text = await response.text()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    return sum(values)


@pytest.mark.slow
async def test_a_proxy_stopped_during_an_outage_loses_no_usage(
    tmp_path: Path, own_redis: EmbeddedRedis, mock_upstream: TestServer
) -> None:
    spool = tmp_path / "spool"
    config = write_config(
        tmp_path / "proxy.toml",
        str(mock_upstream.make_url("/v1")),
        own_redis.url,
        limits=f'spool_dir = "{spool}"',
    )
    first = await start_proxy_process(config, tmp_path / "first.log")
    n = 8
    try:
        async with aiohttp.ClientSession() as session:
            kid, key = await create_key(session, first.url, "acme")
            store = aioredis.Redis.from_url(own_redis.url, decode_responses=True)

            async def ask() -> int:
                headers = {
                    "Authorization": f"Bearer {key}",
                    "x-mock-latency-ms": "1500",
                    "x-mock-output-tokens": "7",
                }
                plain = {"model": "gpt-4o-mini", "messages": MESSAGES}
                async with session.post(
                    first.url + "/v1/chat/completions", json=plain, headers=headers
                ) as response:
                    assert response.status == 200
                    return int((await response.json())["usage"]["total_tokens"])

            asks = [asyncio.create_task(ask()) for _ in range(n)]

            async def all_leased() -> bool:
                return int(await store.zcard("bp:{o:acme}:leases")) == n

            await eventually(all_leased, what="every request admitted")
            await store.aclose()
            await asyncio.to_thread(own_redis.kill)  # the upstream answers while Redis is gone
            answered = await asyncio.gather(*asks)
            assert len(answered) == n

            async def spooled() -> bool:
                return await metric(session, first.url, "llm_proxy_settles_pending") == n

            await eventually(spooled, what="the pending settles to show in /metrics")
        first.stop()  # SIGTERM while Redis is still down
        log = (tmp_path / "first.log").read_text()
        assert f"stopping with {n} unsettled request(s) kept in" in log
        files = list(spool.glob("settles-*.jsonl"))
        assert len(files) == 1 and len(files[0].read_text().splitlines()) == n

        await own_redis.astart()
        second = await start_proxy_process(config, tmp_path / "second.log")
        try:
            store = aioredis.Redis.from_url(own_redis.url, decode_responses=True)

            async def replayed() -> bool:
                return (
                    await nothing_held(store, "acme") and await store.xlen("bp:{o:acme}:usage") == n
                )

            await eventually(replayed, within=20, what="the spooled settles replayed")
            tokens = (await spend(store, "acme", f"k:{kid}", time.time()))[1]
            assert tokens == sum(answered)  # exactly once, to the token
            records = [usage_record(f) for _, f in await store.xrange("bp:{o:acme}:usage")]
            assert len({r["rid"] for r in records}) == n
            await store.aclose()
            assert "adopted 8 pending settle(s)" in (tmp_path / "second.log").read_text()

            async def spool_emptied() -> bool:
                return all(not f.read_text().strip() for f in spool.glob("settles-*.jsonl"))

            await eventually(spool_emptied, what="the spool emptied once replayed")
        finally:
            second.stop()
    finally:
        first.stop()


# --- 3: one settle that keeps failing does not hold back the rest ------------------------------


def quarantined() -> float:
    """This process's own counter, read from its registry: the in-process proxies of earlier
    tests share it, so the test compares before and after."""
    return REGISTRY.get_sample_value("llm_proxy_settles_quarantined_total") or 0.0


@pytest.mark.slow
async def test_a_poison_settle_is_quarantined_and_the_rest_are_replayed(
    tmp_path: Path, own_redis: EmbeddedRedis, mock_upstream: TestServer, monkeypatch: Any
) -> None:
    monkeypatch.setenv("TEST_PROXY_ADMIN_KEY", ADMIN_KEY)
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-upstream-secret")
    spool = tmp_path / "spool"
    settings = make_settings(str(mock_upstream.make_url("/v1")), limits={"spool_dir": str(spool)})
    app = create_app(settings, own_redis.url)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    store = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    try:
        async with aiohttp.ClientSession() as session:
            keys = {org: await create_key(session, url, org) for org in ("sick", "well")}

            async def ask(org: str) -> int:
                headers = {"Authorization": f"Bearer {keys[org][1]}", "x-mock-latency-ms": "400"}
                plain = {"model": "gpt-4o-mini", "messages": MESSAGES}
                async with session.post(
                    url + "/v1/chat/completions", json=plain, headers=headers
                ) as response:
                    assert response.status == 200
                    return int((await response.json())["usage"]["total_tokens"])

            # "sick": its lease record is replaced by a value every settle attempt trips on.
            sick = asyncio.create_task(ask("sick"))

            async def leased() -> list[str]:
                found: list[str] = await store.zrange("bp:{o:sick}:leases", 0, -1)
                return found

            quarantined_before = quarantined()
            (rid,) = await eventually(leased, what="the sick request's lease")
            await store.delete(f"bp:{{o:sick}}:lease:{rid}")
            await store.set(f"bp:{{o:sick}}:lease:{rid}", "not a hash")
            await sick  # its settle fails (WRONGTYPE) and is deferred
            # Then an outage: the healthy org's settle is deferred behind the sick one.
            well = asyncio.create_task(ask("well"))

            async def well_leased() -> bool:
                return int(await store.zcard("bp:{o:well}:leases")) == 1

            await eventually(well_leased, what="the healthy request's lease")
            await store.aclose()
            await asyncio.to_thread(own_redis.kill)
            well_tokens = await well
            await own_redis.astart()
            store = aioredis.Redis.from_url(own_redis.url, decode_responses=True)

            async def healthy_settled() -> bool:
                return int(await store.xlen("bp:{o:well}:usage")) == 1

            await eventually(healthy_settled, within=15, what="the healthy settle replayed")
            assert (await spend(store, "well", f"k:{keys['well'][0]}", time.time()))[1] == (
                well_tokens
            )

            async def set_aside() -> bool:
                return (spool / QUARANTINE_NAME).exists()

            await eventually(set_aside, within=15, what="the poison settle quarantined")
            (entry,) = [json.loads(x) for x in (spool / QUARANTINE_NAME).read_text().splitlines()]
            assert entry["settle"]["request_id"] == rid and "WRONGTYPE" in entry["reason"]

            async def counted() -> bool:  # counted after the file is written, not with it
                return quarantined() == quarantined_before + 1

            await eventually(counted, what="the quarantine counted")
            assert len(app[GATEWAY].admission.deferred) == 0
    finally:
        await store.aclose()
        await server.close()
