"""The test harness: a real redis-server, the mock upstream over real HTTP, the proxy itself.

Fixtures start everything on free loopback ports; nothing outside this machine is contacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import redis
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.web_runner import BaseRunner

from proxy.app import create_app
from proxy.config import ModelConfig, PriceConfig, RedisConfig, Settings, UpstreamConfig
from proxy.gateway.state import GATEWAY
from proxy.http_protocol import ConnectionLimits, GuardedAppRunner
from proxy.store.connection import connect
from proxy.store.embedded_redis import EmbeddedRedis, free_port
from proxy.tools.mock import RECEIVED, MockOptions, build_mock_app

ADMIN_KEY = "sk-test-admin-0123456789"
REPO = Path(__file__).resolve().parent.parent


TEST_TOPOLOGY = os.environ.get("LLM_PROXY_TEST_REDIS", "single")
"""``cluster`` or ``sentinel`` runs the tests that take ``redis_url`` against that topology
(``tests/redis_topologies.py``) instead of one server. Tests that talk to the server as a
single node themselves (restarts, raw clients) do not apply there."""

TEST_BATCH_SETTLES = os.environ.get("LLM_PROXY_TEST_BATCH_SETTLES", "")
"""``1`` or ``0`` runs every proxy the tests start with ``[limits] batch_settles`` on or off
(unset: the configuration's default), so the suites run both ways."""


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), persist=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from redis_topologies import RedisClusterTopology, RedisSentinelTopology, running

    base = tmp_path_factory.mktemp(TEST_TOPOLOGY)
    kinds: dict[str, type[RedisClusterTopology | RedisSentinelTopology]] = {
        "cluster": RedisClusterTopology,
        "sentinel": RedisSentinelTopology,
    }
    with running(kinds[TEST_TOPOLOGY](base)) as started:
        yield started


@pytest.fixture
def redis_url(request: pytest.FixtureRequest) -> str:
    """A clean database for every test (tests run one at a time)."""
    if TEST_TOPOLOGY != "single":
        topology = request.getfixturevalue("redis_topology")
        topology.flushall()
        url: str = topology.url
        return url
    redis_server: EmbeddedRedis = request.getfixturevalue("redis_server")
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


class FakeClock:
    """Injectable time: tests move it instead of sleeping."""

    def __init__(self, start: float | None = None) -> None:
        self.now = start if start is not None else time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
async def mock_upstream() -> AsyncIterator[TestServer]:
    server = TestServer(build_mock_app(MockOptions()), host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


def make_settings(upstream_url: str, **sections: Any) -> Settings:
    """Settings for tests: the mock as the only upstream, fixed prices, test admin key env, and
    a settle spool of its own (never the working directory's ``.proxy-data``)."""
    limits = dict(sections.pop("limits", {}))
    limits.setdefault("spool_dir", tempfile.mkdtemp(prefix="llm-proxy-spool-"))
    if TEST_BATCH_SETTLES:
        limits.setdefault("batch_settles", TEST_BATCH_SETTLES == "1")
    sections["limits"] = limits
    data: dict[str, Any] = {
        "upstreams": [
            UpstreamConfig(
                name="mock",
                base_url=upstream_url,
                api_key_env="TEST_UPSTREAM_KEY",
                forward_headers=["x-mock-*"],  # the mock's per-request controls
            )
        ],
        "models": [
            ModelConfig(name="gpt-4o-mini", upstream="mock", max_output_tokens=1000),
            ModelConfig(
                name="gpt-4o",
                aliases=["gpt-4o-latest"],
                upstream="mock",
                max_output_tokens=1000,
                price=PriceConfig(input="2.5", cached_input="1.25", output="10"),
            ),
            ModelConfig(
                name="text-embedding-3-small",
                upstream="mock",
                encoding="cl100k_base",
                kind="embedding",
            ),
        ],
        "auth": {"bootstrap_key_env": "TEST_PROXY_ADMIN_KEY", "cache_ttl_seconds": 1.0},
    }
    data.update(sections)
    return Settings.model_validate(data)


@dataclass
class Proxy:
    """A running proxy under test, with the helpers tests keep needing."""

    url: str
    server: TestServer
    app: web.Application
    mock: TestServer
    clock: FakeClock
    session: aiohttp.ClientSession
    admin_key: str = ADMIN_KEY
    clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    def received(self) -> Any:
        return self.mock.app[RECEIVED]

    def openai(self, key: str, **kwargs: Any) -> openai.AsyncOpenAI:
        kwargs.setdefault("max_retries", 0)
        client = openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=key, **kwargs)
        self.clients.append(client)
        return client

    async def admin(
        self, method: str, path: str, json: Any = None, key: str | None = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {key or self.admin_key}"}
        async with self.session.request(
            method, self.url + path, json=json, headers=headers
        ) as response:
            return response.status, await response.json(content_type=None)

    async def create_key(self, org: str = "acme", **spec: Any) -> tuple[str, str]:
        """Returns (key id, plaintext)."""
        status, body = await self.admin("POST", "/api/v1/keys", {"org_id": org, **spec})
        assert status == 201, body
        return body["id"], body["key"]


ProxyFactory = Callable[..., "asyncio.Future[Proxy]"]


class ProxyTestServer(TestServer):
    """The proxy as ``llm-proxy serve`` serves it (``GuardedAppRunner``: JSON errors below the
    application, read timeouts, the connection cap), on a free loopback port."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        limits = ConnectionLimits.of(self.app[GATEWAY].settings.server)
        return GuardedAppRunner(self.app, limits, **kwargs)


@pytest.fixture
async def start_proxy(
    redis_url: str, mock_upstream: TestServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., Any]]:
    monkeypatch.setenv("TEST_PROXY_ADMIN_KEY", ADMIN_KEY)
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-upstream-secret")
    started: list[Proxy] = []

    async def start(clock: FakeClock | None = None, **sections: Any) -> Proxy:
        clock = clock or FakeClock()
        settings = make_settings(str(mock_upstream.make_url("/v1")), **sections)
        app = create_app(settings, redis_url, clock=clock)
        server = ProxyTestServer(app, host="127.0.0.1")
        await server.start_server()
        proxy = Proxy(
            url=str(server.make_url("")).rstrip("/"),
            server=server,
            app=app,
            mock=mock_upstream,
            clock=clock,
            session=aiohttp.ClientSession(),
        )
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        for client in proxy.clients:
            await client.close()
        await proxy.session.close()
        await proxy.server.close()


@pytest.fixture
async def proxy(start_proxy: Callable[..., Any]) -> Proxy:
    result: Proxy = await start_proxy()
    return result


def write_config(
    path: Path,
    upstream_url: str,
    redis_url: str,
    tail: str = "",
    server: str = "",
    redis: str = "",
    **extra: str,
) -> Path:
    """A TOML config for proxies run as separate processes; ``server``, ``redis``: more lines
    of those sections; ``tail`` is appended as is (more ``[[upstreams]]`` and ``[[models]]``)."""
    lines = [
        "[server]",
        'host = "127.0.0.1"',
        "uvloop = true",
        "shutdown_grace_seconds = 10",
        server,
        "[redis]",
        f'url = "{redis_url}"',
        redis,
        "[auth]",
        'bootstrap_key_env = "TEST_PROXY_ADMIN_KEY"',
        "[[upstreams]]",
        'name = "mock"',
        f'base_url = "{upstream_url}"',
        'forward_headers = ["x-mock-*"]',
        "[[models]]",
        'name = "gpt-4o-mini"',
        'upstream = "mock"',
        "max_output_tokens = 1000",
    ]
    if TEST_BATCH_SETTLES:
        switch = f"batch_settles = {'true' if TEST_BATCH_SETTLES == '1' else 'false'}"
        extra["limits"] = switch + "\n" + extra.get("limits", "")
    for section, body in extra.items():
        lines += [f"[{section}]", body]
    path.write_text("\n".join(lines) + "\n" + tail)
    return path


@dataclass
class ProxyProcess:
    process: subprocess.Popen[bytes]
    url: str
    log: Path
    """stdout, and stderr too unless ``errors`` is given."""
    errors: Path | None = None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def start_proxy_process(
    config: Path, log: Path, workers: int = 1, port: int | None = None, errors: Path | None = None
) -> ProxyProcess:
    """``llm-proxy serve`` in its own process, ready when /healthz answers. Its stdout goes to
    ``log``, its stderr too, or to ``errors`` when given."""
    port = port or free_port()
    env = {**os.environ, "TEST_PROXY_ADMIN_KEY": ADMIN_KEY, "PYTHONPATH": str(REPO)}
    handle = log.open("wb")
    error_handle = errors.open("wb") if errors is not None else None
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy",
            "--config",
            str(config),
            "serve",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ],
        stdout=handle,
        stderr=error_handle if error_handle is not None else subprocess.STDOUT,
        env=env,
        cwd=str(config.parent),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"proxy exited: {log.read_text()}")
            try:
                async with session.get(url + "/readyz") as response:
                    if response.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"proxy did not start: {log.read_text()}")
            await asyncio.sleep(0.05)
    return ProxyProcess(process, url, log, errors)


def budget(**overrides: Any) -> dict[str, Any]:
    """A budget body for PUT: 1000 tokens a day, blocking at 100 %, with ``overrides``."""
    body: dict[str, Any] = {
        "period": "daily",
        "limit_kind": "tokens",
        "limit": 1000,
        "thresholds": [{"pct": 100, "action": "block"}],
    }
    body.update(overrides)
    return body


@contextlib.asynccontextmanager
async def proxy_processes(config: Path, count: int = 2) -> AsyncIterator[list[str]]:
    """``count`` ``llm-proxy serve`` processes on one config (distinct ports), their URLs; each
    logs to ``proxy<i>.log`` beside the config."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    procs = await asyncio.gather(
        *(
            start_proxy_process(config, config.parent / f"proxy{i}.log", port=port)
            for i, port in enumerate(ports)
        )
    )
    try:
        yield [proc.url for proc in procs]
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture
async def two_processes(
    tmp_path: Path, redis_url: str, mock_upstream: TestServer
) -> AsyncIterator[list[str]]:
    """Two ``llm-proxy serve`` processes on the test Redis and mock upstream: their URLs."""
    config = write_config(tmp_path / "proxy.toml", str(mock_upstream.make_url("/v1")), redis_url)
    async with proxy_processes(config) as urls:
        yield urls


_NUMERIC = (
    "in",
    "out",
    "cached",
    "cache_write",
    "cache_write_1h",
    "reasoning",
    "cost_nano",
    "status",
)
_FLAGS = ("reported", "client_gone")


def usage_record(fields: dict[str, str]) -> dict[str, Any]:
    """A usage stream entry (flat field/value pairs) with its numbers and flags typed."""
    record: dict[str, Any] = {}
    for name, value in fields.items():
        if name in _NUMERIC:
            record[name] = int(value)
        elif name in _FLAGS:
            record[name] = value == "1"
        else:
            record[name] = value or None
    return record


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A direct client on the test Redis, to check what the proxy wrote."""
    client = connect(RedisConfig(), redis_url)  # the proxy's own kind of client for the URL
    yield client
    await client.aclose()


async def eventually(
    check: Callable[[], Awaitable[Any]], within: float = 10.0, what: str = "condition"
) -> Any:
    """Polls ``check`` until it returns something truthy (a deadline, not a sleep)."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
