"""``llm-proxy demo``: the proxy in front of the bundled mock upstream, with a fresh key.

Everything runs in one process (a private Redis, mock, proxy) so a first-time user sees the
whole request path work before wiring a real provider.

The demo never touches a configured Redis or data directory: its Redis is in memory, in a
temporary directory, and ends with the demo (``serving.private_redis``). So its key — active,
unlimited, printed on the terminal — cannot outlive it, even if the demo is killed, and a demo
started beside ``serve`` leaves ``serve``'s data alone.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
from dataclasses import dataclass

from aiohttp import web

from proxy.config import ModelConfig, Settings, UpstreamConfig
from proxy.ledger.api_keys import KeyCreate, KeyStore, new_plaintext
from proxy.serving import private_redis, running_site, serve_worker, use_uvloop
from proxy.store.connection import connect
from proxy.store.embedded_redis import RedisServerNotFound, find_redis_server, free_port
from proxy.store.secret_box import ENV as SECRET_KEY_ENV
from proxy.tools.mock import MockOptions, build_mock_app

DEMO_ORG = "demo"
_MOCK_KEY_ENV = "LLM_PROXY_DEMO_UPSTREAM_KEY"
"""The mock's Anthropic routes want an ``x-api-key``, as Anthropic's do: the demo's own."""


def demo_settings(base: Settings, mock_port: int) -> Settings:
    # x-mock-* headers pass: a demo user can ask the mock for errors, delays, long answers.
    upstream = UpstreamConfig(
        name="mock",
        base_url=f"http://127.0.0.1:{mock_port}/v1",
        api_key_env=None,
        forward_headers=["x-mock-*"],
    )
    claude = UpstreamConfig(
        name="mock-anthropic",
        base_url=f"http://127.0.0.1:{mock_port}",
        api_key_env=_MOCK_KEY_ENV,
        kind="anthropic",
        forward_headers=["x-mock-*"],
    )
    models = [
        ModelConfig(name="claude-*", upstream="mock-anthropic", context_window=200_000),
        ModelConfig(name="gpt-4o-mini", upstream="mock", max_output_tokens=16384),
        ModelConfig(name="gpt-4o", upstream="mock", max_output_tokens=16384),
        ModelConfig(
            name="text-embedding-3-small",
            upstream="mock",
            encoding="cl100k_base",
            kind="embedding",
        ),
    ]
    return base.model_copy(update={"upstreams": [upstream, claude], "models": models})


@dataclass(frozen=True)
class DemoKeys:
    key: str
    key_id: str
    admin_key: str
    admin_from_env: bool


def _instructions(host: str, port: int, keys: DemoKeys) -> str:
    root = f"http://{host}:{port}"
    base = f"{root}/v1"
    key, admin = keys.key, keys.admin_key
    admin_origin = "from PROXY_ADMIN_KEY" if keys.admin_from_env else "minted for this demo"
    return f"""
llm-proxy demo is running on {root} (upstream: the bundled mock).
Its Redis is private and in memory: these keys and everything else end with the demo.

  API key:    {key}   (org "{DEMO_ORG}", key id {keys.key_id})
  Admin key:  {admin}   ({admin_origin})
  Console:    {root}/ui   (sign in with the admin key)

  curl {base}/chat/completions \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "Hello"}}]}}'

  from openai import OpenAI
  client = OpenAI(base_url="{base}", api_key="{key}")
  print(client.chat.completions.create(
      model="gpt-4o-mini", messages=[{{"role": "user", "content": "Hello"}}]))

  # Claude Code: ANTHROPIC_BASE_URL=http://{host}:{port} ANTHROPIC_AUTH_TOKEN={key} claude
  import anthropic
  claude = anthropic.Anthropic(base_url="http://{host}:{port}", api_key="{key}")
  print(claude.messages.create(model="claude-sonnet-4-5", max_tokens=100,
      messages=[{{"role": "user", "content": "Hello"}}]))

  # Who spent what, and a budget on the key (the budget API takes the key *id*):
  export PROXY_URL={root} PROXY_ADMIN_KEY={admin}
  llm-proxy usage --since 1h --group-by model,external_user_id
  llm-proxy budgets set apikey {keys.key_id} --period daily --limit 1 --block 100

Press Ctrl-C to stop.
""".rstrip()


async def _run(settings: Settings, redis_url: str, host: str, port: int) -> None:
    mock_port = free_port()
    os.environ.setdefault(_MOCK_KEY_ENV, "demo-upstream-key")
    async with running_site(
        build_mock_app(MockOptions()), "127.0.0.1", mock_port, reuse_port=False, grace=1
    ):
        proxy_settings = demo_settings(settings, mock_port)
        redis = connect(settings.redis, redis_url)
        record, key = await KeyStore(redis).create(KeyCreate(name="demo key"), DEMO_ORG)
        await redis.aclose()
        keys = DemoKeys(key, record.id, *_admin_key(settings))

        async def announce(_runner: web.AppRunner) -> None:
            print(_instructions(host, port, keys), flush=True)

        await serve_worker(proxy_settings, redis_url, host, port, False, on_ready=announce)


def _admin_key(settings: Settings) -> tuple[str, bool]:
    """The demo's admin key: the operator's (the bootstrap variable) when set, else a fresh one
    set in that variable, so the app registers it as it registers any bootstrap key. Without
    one, the admin API, usage and the console were unusable in the demo."""
    variable = settings.auth.bootstrap_key_env
    given = os.environ.get(variable)
    if given:
        return given, True
    os.environ[variable] = minted = new_plaintext()
    return minted, False


def _quiet_production_warnings() -> None:
    """The demo's Redis is private, in memory and gone with the demo: the warning about webhook
    secrets stored in plain text is meant for production, so the demo seals them with a key
    of its own."""
    os.environ.setdefault(
        SECRET_KEY_ENV, base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
    )


def run_demo(settings: Settings, host: str, port: int) -> None:
    use_uvloop(settings.server.uvloop)
    try:
        find_redis_server()
    except RedisServerNotFound as exc:
        raise RedisServerNotFound(
            f"{exc} (The demo always runs its own private Redis, never the one in REDIS_URL, "
            "so that its throwaway key cannot land in a shared Redis.)"
        ) from None
    _quiet_production_warnings()
    with private_redis(settings) as redis_url:
        asyncio.run(_run(settings, redis_url, host, port))
