"""Redis stopped (SIGTERM), paused (SIGSTOP) and killed (SIGKILL) under load, then restarted
from its append-only file or resumed (issue 12): a real ``llm-proxy serve`` process, a real
redis-server, eight clients sending requests all along.

While Redis is away every request is refused with 503 ``store_unavailable`` (none reaches the
upstream); requests admitted before are answered, their settles spooled and replayed. After
each fault the proxy serves again without a restart, and at the end the books equal, to the
token, the usage of the answers the clients received — nothing lost, nothing charged twice,
no reservation left (including admits whose replies were lost: they are released).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from conftest import ADMIN_KEY, eventually, start_proxy_process, usage_record, write_config
from helpers import user_messages

from proxy.ledger.windows import windows_at
from proxy.store.embedded_redis import EmbeddedRedis
from proxy.tools.mock import RECEIVED

pytestmark = [pytest.mark.slow, pytest.mark.redis]

MESSAGES = user_messages("keep going")
P = "bp:{o:acme}:"


@dataclass
class Load:
    """Clients that keep sending requests, and everything they got back."""

    url: str
    key: str
    statuses: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    """total_tokens of every 200, as the client saw it."""
    other: list[Any] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def count(self, status: int) -> int:
        return self.statuses.count(status)

    async def client(self, session: aiohttp.ClientSession, n: int) -> None:
        headers = {"Authorization": f"Bearer {self.key}", "x-mock-latency-ms": "20"}
        while not self.stop.is_set():
            stream = n % 2 == 0
            body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 9}
            if stream:
                body.update(stream=True, stream_options={"include_usage": True})
            try:
                async with session.post(
                    self.url + "/v1/chat/completions", json=body, headers=headers
                ) as response:
                    status = response.status
                    if status == 200 and stream:
                        usage = None
                        async for line in response.content:
                            if b'"usage":{' in line:
                                usage = line
                        assert usage is not None, "a stream ended without its usage"
                        self.tokens.append(int(usage.split(b'"total_tokens":')[1].split(b",")[0]))
                    elif status == 200:
                        self.tokens.append((await response.json())["usage"]["total_tokens"])
                    else:
                        answer = await response.json()
                        if status != 503 or answer["error"]["code"] != "store_unavailable":
                            self.other.append((status, answer))
            except aiohttp.ClientError as exc:
                self.other.append(repr(exc))
                status = 0
            self.statuses.append(status)


async def until(check: Callable[[], bool], what: str, within: float = 30) -> None:
    async def ok() -> bool:
        return check()

    await eventually(ok, within=within, what=what)


async def until_count(load: Load, status: int, at_least: int, what: str) -> None:
    """Until ``load`` has had ``at_least`` answers of ``status``."""
    await until(lambda: load.count(status) >= at_least, what)


@pytest.fixture
async def aof_redis(tmp_path: Path) -> AsyncIterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis", persist=True)
    await server.astart()
    await always_fsync(server)
    yield server
    if server.pid is not None:
        os.kill(server.pid, signal.SIGCONT)
    await server.astop()


async def always_fsync(server: EmbeddedRedis) -> None:
    """Every acknowledged write on disk, so that a SIGKILL loses nothing Redis acknowledged
    (what this test checks is the proxy, not Redis's fsync window)."""
    async with aioredis.Redis.from_url(server.url) as client:
        await client.config_set("appendfsync", "always")


async def test_redis_stopped_paused_and_killed_under_load_loses_nothing(
    tmp_path: Path, aof_redis: EmbeddedRedis, mock_upstream: TestServer
) -> None:
    config = write_config(
        tmp_path / "proxy.toml",
        str(mock_upstream.make_url("/v1")),
        aof_redis.url,
        redis="hot_path_timeout = 1.0\nsocket_timeout = 0.5",
        limits=f'spool_dir = "{tmp_path / "spool"}"',
    )
    proxy = await start_proxy_process(config, tmp_path / "proxy.log")
    forwarded_before = len(mock_upstream.app[RECEIVED])
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            async with session.post(
                proxy.url + "/api/v1/keys",
                json={"org_id": "acme"},
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            ) as response:
                kid, key = (await response.json())["id"], (await response.json())["key"]
            load = Load(proxy.url, key)
            clients = [asyncio.create_task(load.client(session, n)) for n in range(8)]

            faults: list[tuple[str, Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]]
            faults = [
                ("SIGTERM", aof_redis.astop, aof_redis.astart),
                ("SIGSTOP", lambda: _signal(aof_redis, signal.SIGSTOP),
                 lambda: _signal(aof_redis, signal.SIGCONT)),
                ("SIGKILL", lambda: asyncio.to_thread(aof_redis.kill), aof_redis.astart),
            ]  # fmt: skip
            for name, fault, recover in faults:
                served = load.count(200)
                await until_count(load, 200, served + 20, f"load before {name}")
                refused = load.count(503)
                started = time.monotonic()
                await fault()
                await until_count(load, 503, refused + 5, f"503s after {name}")
                await recover()
                if name != "SIGSTOP":
                    await always_fsync(aof_redis)
                served = load.count(200)
                await until_count(load, 200, served + 20, f"service after {name}")
                print(f"\n{name}: served again {time.monotonic() - started:.2f} s after the fault")
            load.stop.set()
            await asyncio.gather(*clients)

            store = aioredis.Redis.from_url(aof_redis.url, decode_responses=True)
            try:

                async def settled() -> bool:
                    return await store.zcard(P + "leases") == 0 and not [
                        k async for k in store.scan_iter(P + "infl:*")
                    ]

                try:
                    await eventually(settled, within=30, what="every reservation settled")
                except AssertionError:
                    left = await store.zrange(P + "leases", 0, -1)
                    held = [await store.hgetall(P + "lease:" + rid) for rid in left]
                    raise AssertionError(
                        f"reservations left: {dict(zip(left, held, strict=True))}"
                    ) from None
                daily = windows_at(time.time()).daily
                spent = int(await store.hget(f"{P}spend:k:{kid}:{daily}", "t") or 0)
                records = [usage_record(f) for _, f in await store.xrange(P + "usage")]
            finally:
                await store.aclose()
    finally:
        proxy.stop()

    assert load.other == [], load.other[:5]  # only answers and store_unavailable refusals
    assert set(load.statuses) <= {200, 503}
    answered = load.count(200)
    # Nothing refused reached the upstream, and everything answered did, once.
    assert len(mock_upstream.app[RECEIVED]) - forwarded_before == answered
    # The books, to the token: what the clients were told they used, nothing more or less.
    assert spent == sum(load.tokens)
    charged = [r for r in records if not r.get("released")]
    assert len(charged) == answered
    assert not [r for r in records if r.get("reclaimed")], "a reservation was reclaimed"
    print(
        f"{answered} answered, {load.count(503)} refused with 503, {spent} tokens recorded "
        f"== the clients' usage; {len(records) - len(charged)} lost-reply admits released"
    )


async def _signal(server: EmbeddedRedis, sig: signal.Signals) -> None:
    assert server.pid is not None
    os.kill(server.pid, sig)
