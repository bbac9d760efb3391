"""``llm-proxy``: serve, demo, the mock upstream, key and limit administration, load tests.

Administration commands talk to a running proxy over its HTTP API with an admin key, so the
same permission rules apply from the shell as from any client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import Any

import aiohttp

from proxy.config import ConfigError, Settings, config_source, load_settings

log = logging.getLogger(__name__)
ADMIN_URL_ENV = "PROXY_URL"


def _settings(args: argparse.Namespace) -> Settings:
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"llm-proxy: bad configuration: {exc}", file=sys.stderr)
        sys.exit(2)
    log.info("configuration: %s", config_source(args.config))
    return settings


def _warn_missing_credentials(settings: Settings) -> None:
    """An upstream whose credential variable is unset would be sent requests without one (a
    401 from the provider, blamed on the proxy): said at start, and refused per request."""
    for upstream in settings.upstreams:
        if upstream.api_key_env and upstream.kind != "bedrock" and not upstream.credential():
            log.warning(
                "upstream %r: its credential variable %s is not set; requests to it are "
                "refused with a 503 until it is (set it and restart)",
                upstream.name,
                upstream.api_key_env,
            )


def _check_routes(settings: Settings) -> None:
    """Prices and encodings (and the secret key) are resolved in each worker too; failing
    here gives a clean exit before any Redis or worker is started."""
    from proxy.catalog.routes import build_routes
    from proxy.providers import bedrock
    from proxy.store.secret_box import SecretBox, SecretKeyError

    try:
        build_routes(settings)
        bedrock.check(settings.upstreams)  # botocore and AWS credentials, to sign with
        SecretBox.from_env()
    except (ConfigError, SecretKeyError) as exc:
        print(f"llm-proxy: bad configuration: {exc}", file=sys.stderr)
        sys.exit(2)


def _starting(start: Any, host: str, port: int, command: str) -> None:
    """Start-up failures (a port in use, Redis never ready, data directory held by another
    process, no redis-server binary) end with one clear line, not a traceback."""
    from proxy.port_check import PortInUse, check_port_free, is_port_in_use
    from proxy.store.data_dir import DataDirInUse
    from proxy.store.embedded_redis import RedisServerNotFound, RedisStartError
    from proxy.store.readiness import StoreNotReady

    try:
        check_port_free(host, port, command)
        start()
    except (PortInUse, StoreNotReady, DataDirInUse, RedisStartError, RedisServerNotFound) as exc:
        print(f"llm-proxy: cannot start: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    except OSError as exc:
        if not is_port_in_use(exc):
            raise
        print(f"llm-proxy: cannot start: {PortInUse(host, port, command)}", file=sys.stderr)
        sys.exit(1)


def cmd_serve(args: argparse.Namespace) -> None:
    from proxy.serving import serve

    settings = _settings(args)
    _check_routes(settings)
    _warn_missing_credentials(settings)
    host = args.host or settings.server.host
    port = args.port if args.port is not None else settings.server.port
    workers = args.workers or settings.server.workers
    _starting(lambda: serve(settings, host, port, workers), host, port, "serve")


def cmd_demo(args: argparse.Namespace) -> None:
    from proxy.tools.demo import run_demo

    settings = _settings(args)
    host = args.host or settings.server.host
    port = args.port if args.port is not None else settings.server.port
    _starting(lambda: run_demo(settings, host, port), host, port, "demo")


def cmd_mock(args: argparse.Namespace) -> None:
    from proxy.tools.mock import MockOptions, run_mock

    options = MockOptions(
        latency_ms=args.latency_ms,
        output_tokens=args.output_tokens,
        chunk_delay_ms=args.chunk_delay_ms,
    )
    _starting(
        lambda: run_mock(args.host, args.port, options), args.host, args.port, "mock-upstream"
    )


def cmd_loadtest(args: argparse.Namespace) -> None:
    from proxy.tools.loadtest import main as loadtest_main

    loadtest_main(args)


async def _admin_call(
    args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None
) -> int:
    key = args.admin_key or os.environ.get("PROXY_ADMIN_KEY")
    if not key:
        print("llm-proxy: an admin key is needed (--admin-key or PROXY_ADMIN_KEY)", file=sys.stderr)
        return 2
    url = args.url.rstrip("/") + path
    async with aiohttp.ClientSession() as session:
        try:
            async with session.request(
                method, url, json=body, headers={"Authorization": f"Bearer {key}"}
            ) as response:
                payload = await response.json(content_type=None)
                print(json.dumps(payload, indent=2))
                return 0 if response.status < 400 else 1
        except aiohttp.ClientError as exc:
            print(f"llm-proxy: cannot reach {url}: {exc}", file=sys.stderr)
            return 1


def _limits(args: argparse.Namespace) -> dict[str, int]:
    names = ("rps", "rpm", "rph", "rpd", "tpm", "concurrency")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def cmd_keys(args: argparse.Namespace) -> None:
    from proxy.tools.keys_cli import main as keys_main

    _admin_command(keys_main, args)


def cmd_usage(args: argparse.Namespace) -> None:
    from proxy.tools.usage_report import main as usage_main

    _admin_command(usage_main, args)


def cmd_budgets(args: argparse.Namespace) -> None:
    from proxy.tools.budgets_cli import main as budgets_main

    _admin_command(budgets_main, args)


def cmd_quote(args: argparse.Namespace) -> None:
    from proxy.tools.quote_cli import main as quote_main

    _admin_command(quote_main, args)


def _admin_command(run: Any, args: argparse.Namespace) -> None:
    from proxy.tools.admin_http import AdminError

    try:
        sys.exit(run(args))
    except AdminError as exc:
        print(f"llm-proxy: {exc}", file=sys.stderr)
        sys.exit(exc.status)


def cmd_org_limits(args: argparse.Namespace) -> None:
    path = f"/api/v1/orgs/{args.org}/limits"
    if args.set:
        sys.exit(asyncio.run(_admin_call(args, "PUT", path, _limits(args))))
    sys.exit(asyncio.run(_admin_call(args, "GET", path)))


def _add_limit_flags(parser: argparse.ArgumentParser) -> None:
    for name, words in (
        ("rps", "requests per second"),
        ("rpm", "requests per minute"),
        ("rph", "requests per hour"),
        ("rpd", "requests per day"),
        ("tpm", "tokens per minute"),
        ("concurrency", "concurrent requests"),
    ):
        parser.add_argument(f"--{name}", type=int, help=words)


def _add_admin_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get(ADMIN_URL_ENV, "http://127.0.0.1:8080"),
        help=f"proxy base URL (env {ADMIN_URL_ENV})",
    )
    parser.add_argument("--admin-key", help="admin key (default: env PROXY_ADMIN_KEY)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-proxy", description=__doc__)
    parser.add_argument(
        "--config", help="TOML config file (default: env PROXY_CONFIG or config/proxy.toml)"
    )
    parser.add_argument("--log-level", default=os.environ.get("PROXY_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, help="processes sharing the port (SO_REUSEPORT)")
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="proxy + mock upstream + a fresh key, ready to try")
    demo.add_argument("--host", help="default: [server] host")
    demo.add_argument("--port", type=int, help="default: [server] port")
    demo.set_defaults(func=cmd_demo)

    mock = sub.add_parser("mock-upstream", help="run the mock OpenAI-compatible upstream")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=9090)
    mock.add_argument("--latency-ms", type=float, default=0.0)
    mock.add_argument("--output-tokens", type=int, default=16)
    mock.add_argument("--chunk-delay-ms", type=float, default=0.0)
    mock.set_defaults(func=cmd_mock)

    from proxy.tools.keys_cli import add_arguments as add_keys_arguments

    keys = sub.add_parser("keys", help="create, list, get, update, rotate and revoke API keys")
    add_keys_arguments(keys)
    keys.set_defaults(func=cmd_keys)

    org_limits = sub.add_parser("org-limits", help="show or set an org's rate limits")
    org_limits.add_argument("org")
    org_limits.add_argument("--set", action="store_true", help="replace the org's limits")
    _add_limit_flags(org_limits)
    _add_admin_flags(org_limits)
    org_limits.set_defaults(func=cmd_org_limits)

    from proxy.tools.budgets_cli import add_arguments as add_budgets_arguments
    from proxy.tools.loadtest import add_arguments as add_loadtest_arguments
    from proxy.tools.usage_report import add_arguments as add_usage_arguments

    usage = sub.add_parser("usage", help="who spent what: cost by model, key, end user, org")
    add_usage_arguments(usage)
    usage.set_defaults(func=cmd_usage)

    budgets = sub.add_parser("budgets", help="list, get, set, delete budgets and their events")
    add_budgets_arguments(budgets)
    budgets.set_defaults(func=cmd_budgets)

    from proxy.tools.quote_cli import add_arguments as add_quote_arguments

    quote = sub.add_parser("quote", help="what a request would reserve, and what would bind")
    add_quote_arguments(quote)
    quote.set_defaults(func=cmd_quote)

    loadtest = sub.add_parser("loadtest", help="load-test a deployment and reconcile spend")
    add_loadtest_arguments(loadtest)
    loadtest.set_defaults(func=cmd_loadtest)
    return parser


def main(argv: list[str] | None = None) -> None:
    from proxy.gateway.request_log import configure_logging

    args = build_parser().parse_args(argv)
    configure_logging(args.log_level.upper())
    args.func(args)


if __name__ == "__main__":
    main()
