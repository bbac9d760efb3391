"""Bedrock through ``llm-proxy serve`` itself: HTTPS on the proxy's own port from the
``[server]`` TLS settings (a SIGHUP reloads the certificate), and exactly N of N+4 concurrent
Converse requests admitted over two processes when a budget fits N worst cases — the
refusals reaching boto3 as ``ServiceQuotaExceededException``, never retried."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from bedrock_support import CLAUDE, MESSAGES, RATES, Tls, aws_env, client, make_tls
from botocore.exceptions import ClientError
from conftest import ADMIN_KEY, REPO, budget, write_config

from proxy.catalog.routes import build_routes
from proxy.config import load_settings
from proxy.dialects import BEDROCK
from proxy.store.embedded_redis import free_port

pytestmark = pytest.mark.slow
N = 6
BODY: dict[str, Any] = {"messages": MESSAGES, "inferenceConfig": {"maxTokens": 20}}


def bedrock_config(tmp: Path, mock: TestServer, redis_url: str, tls: Tls) -> Path:
    root = str(mock.make_url("")).rstrip("/")
    tail = f"""
[[upstreams]]
name = "aws"
kind = "bedrock"
region = "us-east-1"
base_url = "{root}"
forward_headers = ["x-mock-*"]

[[models]]
name = "{CLAUDE}"
upstream = "aws"
context_window = 200000
[models.price]
input = {RATES["input"]}
output = {RATES["output"]}
"""
    server = f'tls_cert = "{tls.cert}"\ntls_key = "{tls.cert}"'
    return write_config(tmp / "proxy.toml", root + "/v1", redis_url, tail, server=server)


async def _ready(url: str, context: ssl.SSLContext, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        while time.monotonic() < deadline:
            assert process.poll() is None, "serve exited"
            try:
                async with session.get(url + "/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("serve did not become ready")


async def serve_tls(config: Path, tls: Tls, count: int) -> AsyncIterator[list[tuple[str, int]]]:
    """``count`` serve processes over HTTPS, each on its own port: (URL, pid) each."""
    env = {**os.environ, "TEST_PROXY_ADMIN_KEY": ADMIN_KEY, "PYTHONPATH": str(REPO)}
    processes, urls = [], []
    for i in range(count):
        port = free_port()
        log = (config.parent / f"proxy{i}.log").open("wb")
        command = [sys.executable, "-m", "proxy", "--config", str(config), "serve"]
        processes.append(
            subprocess.Popen(
                [*command, "--port", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(config.parent),
            )
        )
        urls.append(f"https://127.0.0.1:{port}")
    try:
        for url, process in zip(urls, processes, strict=True):
            await _ready(url, tls.client_context(), process)
        yield [(url, process.pid) for url, process in zip(urls, processes, strict=True)]
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=20)


async def _admin(url: str, tls: Tls, method: str, path: str, body: Any = None) -> Any:
    connector = aiohttp.TCPConnector(ssl=tls.client_context())
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.request(method, url + path, json=body, headers=headers) as response:
            answer = await response.json(content_type=None)
            assert response.status in (200, 201), answer
            return answer


async def test_exactly_n_of_n_plus_4_concurrent_converse_requests_over_two_processes(
    tmp_path: Path,
    mock_upstream: TestServer,
    redis_url: str,
    store: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    aws_env(monkeypatch, tmp_path)
    tls = make_tls(tmp_path)
    config = bedrock_config(tmp_path, mock_upstream, redis_url, tls)
    route = build_routes(load_settings(config, environ={}))[CLAUDE]
    worst = (await BEDROCK.reserve({}, "converse", dict(BODY), route)).tokens
    async for served in serve_tls(config, tls, 2):
        urls = [url for url, _ in served]
        created = await _admin(urls[0], tls, "POST", "/api/v1/keys", {"org_id": "bedrock-n"})
        kid, key = created["id"], created["key"]
        line = budget(limit=N * worst)
        await _admin(urls[1], tls, "PUT", f"/api/v1/llm/budgets/apikey/{kid}", line)
        slow = {"x-mock-latency-ms": "1500"}  # every request is in flight at once
        clients = [client(url, tls, key, monkeypatch, mock=slow) for url in urls]

        def one(i: int, clients: list[Any] = clients) -> Any:
            try:
                return clients[i % 2].converse(modelId=CLAUDE, **BODY)
            except ClientError as exc:
                return exc.response

        with ThreadPoolExecutor(N + 4) as pool:
            loop = asyncio.get_running_loop()
            results = await asyncio.gather(
                *(loop.run_in_executor(pool, one, i) for i in range(N + 4))
            )
    admitted = [r for r in results if "output" in r]
    refused = [r for r in results if "Error" in r]
    assert len(admitted) == N and len(refused) == 4
    for error in refused:
        assert error["Error"]["Code"] == "ServiceQuotaExceededException"
        assert error["ResponseMetadata"]["RetryAttempts"] == 0
    p = "bp:{o:bedrock-n}:"
    assert await store.xlen(p + "usage") == N
    assert await store.zcard(p + "leases") == 0


async def test_serve_answers_https_and_reloads_its_certificate_on_sighup(
    tmp_path: Path, mock_upstream: TestServer, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    aws_env(monkeypatch, tmp_path)
    tls = make_tls(tmp_path)
    config = bedrock_config(tmp_path, mock_upstream, redis_url, tls)
    async for served in serve_tls(config, tls, 1):
        url, pid = served[0]
        # Plain HTTP on the TLS port is not served.
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):
                async with session.get(url.replace("https", "http") + "/healthz") as r:
                    await r.read()
        # TLS 1.1 is refused; 1.2 and 1.3 are served.
        old = tls.client_context()
        with warnings.catch_warnings():  # deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            old.maximum_version = ssl.TLSVersion.TLSv1_1
            old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=old)) as s:
                async with s.get(url + "/healthz") as r:
                    await r.read()
        # A new pair from another CA, then SIGHUP: new handshakes trust only the new CA.
        (tmp_path / "renewed").mkdir()
        renewed = make_tls(tmp_path / "renewed")
        tls.cert.write_bytes(renewed.cert.read_bytes())
        os.kill(pid, signal.SIGHUP)
        await asyncio.sleep(0.5)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=renewed.client_context())
        ) as session:
            async with session.get(url + "/healthz") as response:
                assert response.status == 200

