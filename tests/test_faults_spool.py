"""A settle spool that cannot hold a settle is noticed (issue 21, item 2).

At start the proxy refuses to run on a spool directory it cannot write; while running,
``/readyz`` reports it; a shared append that fails is reported to every settle it carried, and
a settle neither Redis nor the disk took is counted, logged as an error, and never turned into
a 500 for an answer the upstream already gave.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import ADMIN_KEY, REPO, eventually, make_settings, write_config
from prometheus_client import REGISTRY
from redis.exceptions import ResponseError

from proxy.app import create_app
from proxy.gateway.deferred_settles import MAX_ATTEMPTS, DeferredSettles
from proxy.gateway.settle_spool import (
    QUARANTINE_NAME,
    SettleRequest,
    SettleSpool,
    SpoolWriteError,
)
from proxy.store.embedded_redis import EmbeddedRedis, free_port

MESSAGES = [{"role": "user", "content": "hello"}]


def _settle(rid: str) -> SettleRequest:
    return SettleRequest("acme", rid, "key_x", 10, 100, 1.0, ["rid", rid])


def _break(directory: Path) -> None:
    """The directory becomes unusable the way a lost mount is: a file where it was."""
    shutil.rmtree(directory)
    directory.write_bytes(b"")


def _mend(directory: Path) -> None:
    directory.unlink()
    directory.mkdir()


# --- start-up ----------------------------------------------------------------------------------


async def test_serve_refuses_to_start_on_a_spool_that_cannot_hold_a_settle(
    tmp_path: Path, redis_url: str
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"")
    spool = blocker / "spool"
    with pytest.raises(OSError):  # the premise: nothing can be written there
        spool.mkdir(parents=True)
    config = write_config(
        tmp_path / "proxy.toml",
        "http://127.0.0.1:9/v1",
        redis_url,
        limits=f'spool_dir = "{spool}"',
    )
    env = {**os.environ, "TEST_PROXY_ADMIN_KEY": ADMIN_KEY, "PYTHONPATH": str(REPO)}
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "--config", str(config), "serve", "--port", str(port),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(tmp_path),
    )  # fmt: skip
    try:
        assert process.stdout is not None and process.stderr is not None
        said = await asyncio.wait_for(process.stdout.readline(), 60)  # "listening", or its end
        assert b"listening" not in said, "it started serving on a spool it cannot write"
        stderr = await process.stderr.read()
        await asyncio.wait_for(process.wait(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 1, stderr.decode()
    assert "cannot start" in stderr.decode()
    assert f"settle spool directory {spool}" in stderr.decode()


# --- the shared append -------------------------------------------------------------------------


async def test_a_failed_shared_append_fails_every_settle_it_carried(tmp_path: Path) -> None:
    full = Path("/dev/full")
    with full.open("wb", buffering=0) as probe, pytest.raises(OSError) as seen:
        probe.write(b"x")  # the premise: this device answers every write with ENOSPC
    assert seen.value.errno == errno.ENOSPC
    spool = SettleSpool(tmp_path / "spool")
    spool._file = full.open("a+b", buffering=0)  # the spool's file on a disk that is full
    try:
        results = await asyncio.gather(
            *(spool.keep(_settle(f"r{i}")) for i in range(6)), return_exceptions=True
        )
    finally:
        spool.close()
    assert [type(r) for r in results] == [SpoolWriteError] * 6, results
    assert all(r.errno == errno.ENOSPC for r in results if isinstance(r, OSError))
    assert spool.failing is not None


# --- while serving -----------------------------------------------------------------------------


class Gate:
    """An upstream that answers a chat completion only when the test says so."""

    def __init__(self) -> None:
        self.received = asyncio.Event()
        self.release = asyncio.Event()

    async def chat(self, request: web.Request) -> web.Response:
        await request.read()
        self.received.set()
        await self.release.wait()
        return web.json_response(
            {
                "id": "chatcmpl-gate",
                "object": "chat.completion",
                "created": 0,
                "model": "gpt-4o-mini",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "hi"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
            }
        )


async def _status(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as response:
        return response.status, await response.json()


def _unspooled() -> float:
    return REGISTRY.get_sample_value("llm_proxy_settles_unspooled_total") or 0.0


@pytest.fixture
async def gated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[str, Gate, EmbeddedRedis, Path, aiohttp.ClientSession]]:
    monkeypatch.setenv("TEST_PROXY_ADMIN_KEY", ADMIN_KEY)
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-upstream-secret")
    gate = Gate()
    upstream_app = web.Application()
    upstream_app.router.add_post("/v1/chat/completions", gate.chat)
    upstream = TestServer(upstream_app, host="127.0.0.1")
    await upstream.start_server()
    redis = EmbeddedRedis(tmp_path / "redis", persist=True)
    await redis.astart()
    async with aioredis.Redis.from_url(redis.url) as client:
        await client.config_set("appendfsync", "always")  # a crash loses nothing acknowledged
    spool = tmp_path / "spool"
    spool.mkdir()
    settings = make_settings(str(upstream.make_url("/v1")), limits={"spool_dir": str(spool)})
    proxy = TestServer(create_app(settings, redis.url), host="127.0.0.1")
    await proxy.start_server()
    session = aiohttp.ClientSession()
    try:
        yield str(proxy.make_url("")).rstrip("/"), gate, redis, spool, session
    finally:
        gate.release.set()
        await session.close()
        await proxy.close()
        await upstream.close()
        await redis.astop()


async def test_readyz_reports_a_spool_that_cannot_hold_a_settle(
    gated: tuple[str, Gate, EmbeddedRedis, Path, aiohttp.ClientSession],
) -> None:
    url, _, _, spool, session = gated
    assert await _status(session, url + "/readyz") == (200, {"status": "ready", "redis": "ok"})
    _break(spool)
    status, body = await _status(session, url + "/readyz")
    assert status == 503, body
    assert body["status"] == "unavailable" and body["spool"].startswith("unwritable")
    assert str(spool) not in body["spool"]  # an unauthenticated answer names no path
    _mend(spool)
    assert (await _status(session, url + "/readyz"))[0] == 200


async def test_a_settle_neither_redis_nor_the_disk_took_is_answered_counted_and_logged(
    gated: tuple[str, Gate, EmbeddedRedis, Path, aiohttp.ClientSession],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, gate, redis, spool, session = gated
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with session.post(url + "/api/v1/keys", json={"org_id": "acme"}, headers=auth) as r:
        assert r.status == 201
        key = (await r.json())["key"]
    before = _unspooled()

    async def ask() -> tuple[int, Any]:
        async with session.post(
            url + "/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": MESSAGES},
            headers={"Authorization": f"Bearer {key}"},
        ) as response:
            return response.status, await response.json()

    asking = asyncio.create_task(ask())
    await asyncio.wait_for(gate.received.wait(), 10)  # admitted: the upstream has it
    await asyncio.to_thread(redis.kill)
    _break(spool)
    with caplog.at_level(logging.WARNING):
        gate.release.set()
        status, body = await asyncio.wait_for(asking, 30)
    assert status == 200, body  # the upstream answered: the client gets it, not a 500
    assert body["usage"]["total_tokens"] == 9
    assert _unspooled() == before + 1
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("NOT kept on disk" in line for line in said), said
    claims = [r.getMessage() for r in caplog.records if "deferred" in r.getMessage()]
    assert not any("; kept in" in line for line in claims), claims  # no false "kept on disk"

    # Still retried from memory: once Redis and the disk are back, the usage lands.
    _mend(spool)
    await redis.astart()
    store = aioredis.Redis.from_url(redis.url, decode_responses=True)
    try:

        async def landed() -> bool:
            return bool(await store.xlen("bp:{o:acme}:usage"))

        await eventually(landed, within=20, what="the in-memory settle to land")
    finally:
        await store.aclose()


async def test_a_settle_that_cannot_be_set_aside_stays_held_and_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An item Redis keeps refusing goes to the quarantine file; when that write fails too
    (here: the quarantine file is the always-full device), the item stays held and it is said,
    instead of the retry task dying with the item gone from memory."""
    directory = tmp_path / "spool"
    directory.mkdir()
    (directory / QUARANTINE_NAME).symlink_to("/dev/full")
    with pytest.raises(OSError):  # the premise: the quarantine cannot be written
        with (directory / QUARANTINE_NAME).open("ab", buffering=0) as handle:
            handle.write(b"x")
    refusals = 0

    async def refuse(_req: SettleRequest) -> object:
        nonlocal refusals
        refusals += 1
        raise ResponseError("ERR this item is bad")

    deferred = DeferredSettles(refuse, SettleSpool(directory))
    try:
        with caplog.at_level(logging.ERROR):
            await deferred.add(_settle("poison"), ResponseError("ERR this item is bad"))

            async def reported() -> bool:
                return any("could not be set aside" in r.getMessage() for r in caplog.records)

            await eventually(reported, within=20, what="the failed quarantine reported")
        assert refusals >= MAX_ATTEMPTS
        assert len(deferred) == 1  # still held, still retried
    finally:
        await deferred.drain(grace=0)
