"""What the Bedrock tests share: a throwaway CA (trustme) and the proxy's certificate, the
proxy served over HTTPS in-process, boto3 ``bedrock-runtime`` clients that send the proxy key
as a Bedrock API key, the mock's test AWS credentials, and prices for exact books."""

from __future__ import annotations

import math
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pytest
import trustme
from aiohttp.test_utils import TestServer
from botocore.config import Config
from conftest import ADMIN_KEY, FakeClock, Proxy, ProxyTestServer, make_settings

from proxy.app import create_app
from proxy.config import ModelConfig, PriceConfig, UpstreamConfig
from proxy.tls import tls_context
from proxy.tools.mock import MockOptions

CLAUDE = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
LLAMA = "meta.llama3-1-8b-instruct-v1:0"
RATES = {"input": "3", "cache_read": "0.3", "cache_write": "3.75", "output": "15"}
MESSAGES: list[Any] = [{"role": "user", "content": [{"text": "hello there"}]}]
OPTIONS = MockOptions()


@dataclass
class Tls:
    ca: Path
    cert: Path
    """Certificate chain and key in one PEM file."""

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


def make_tls(directory: Path) -> Tls:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    tls = Tls(directory / "ca.pem", directory / "server.pem")
    ca.cert_pem.write_to_path(str(tls.ca))
    cert.private_key_and_cert_chain_pem.write_to_path(str(tls.cert))
    return tls


def aws_env(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    """The proxy signs with the mock's test credentials, from the environment (botocore's
    chain); nothing of the machine's own AWS set-up is read."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", OPTIONS.aws_access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", OPTIONS.aws_secret_access_key)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_RETRY_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def bedrock_models(**claude: Any) -> list[ModelConfig]:
    price = PriceConfig(
        input=Decimal(RATES["input"]),
        cached_input=Decimal(RATES["cache_read"]),
        cache_write_input=Decimal(RATES["cache_write"]),
        output=Decimal(RATES["output"]),
    )
    return [
        ModelConfig(name=CLAUDE, upstream="aws", price=price, context_window=200_000, **claude),
        ModelConfig(name=LLAMA, upstream="aws", max_output_tokens=2048),
        ModelConfig(name="*anthropic.claude-*", upstream="aws", context_window=200_000),
    ]


def bedrock_upstream(root: str, **extra: Any) -> UpstreamConfig:
    return UpstreamConfig(
        name="aws",
        kind="bedrock",
        region="us-east-1",
        base_url=root,
        forward_headers=["x-mock-*"],
        **extra,
    )


def expected_cost(usage: dict[str, int]) -> int:
    """Converse usage priced apart from the proxy's code (Decimal rates, one ceiling)."""
    total = (
        Decimal(usage["inputTokens"]) * Decimal(RATES["input"])
        + Decimal(usage.get("cacheReadInputTokens", 0)) * Decimal(RATES["cache_read"])
        + Decimal(usage.get("cacheWriteInputTokens", 0)) * Decimal(RATES["cache_write"])
        + Decimal(usage["outputTokens"]) * Decimal(RATES["output"])
    )
    return math.ceil(total * 10**9 / 10**6)


def client(url: str, tls: Tls, key: str, monkeypatch: pytest.MonkeyPatch, **config: Any) -> Any:
    """boto3's ``bedrock-runtime`` client with the proxy key as its Bedrock API key; ``x-mock-*``
    headers (``config["mock"]``) are added to every request for the mock's controls."""
    mock = config.pop("mock", {})
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", key)
    config.setdefault("retries", {"mode": "standard", "max_attempts": 3})
    runtime = boto3.client(
        "bedrock-runtime",
        region_name="us-east-1",
        endpoint_url=url,
        verify=str(tls.ca),
        config=Config(**config),
    )

    def add_headers(request: Any, **_: Any) -> None:
        for name, value in mock.items():
            request.headers[name] = value

    runtime.meta.events.register("before-sign.bedrock-runtime.*", add_headers)
    return runtime


async def start_tls_proxy(
    redis_url: str, mock: TestServer, tls: Tls, **sections: Any
) -> AsyncIterator[Proxy]:
    """The proxy in-process, served over HTTPS with ``[server]`` TLS settings."""
    root = str(mock.make_url("")).rstrip("/")
    sections.setdefault("upstreams", [bedrock_upstream(root)])
    sections.setdefault("models", bedrock_models())
    server = {"tls_cert": str(tls.cert), "tls_key": str(tls.cert)}
    settings = make_settings(root, server=server, **sections)
    clock = FakeClock()
    app = create_app(settings, redis_url, clock=clock)
    test_server = ProxyTestServer(app, host="127.0.0.1")
    await test_server.start_server(ssl=tls_context(settings.server))
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls.client_context()))
    proxy = Proxy(
        url=str(test_server.make_url("")).rstrip("/"),
        server=test_server,
        app=app,
        mock=mock,
        clock=clock,
        session=session,
        admin_key=ADMIN_KEY,
    )
    try:
        yield proxy
    finally:
        await session.close()
        await test_server.close()


Factory = Callable[..., Any]
