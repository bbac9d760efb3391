"""``llm-proxy loadtest``: its arguments, the run from setup to cleanup, and the exit status."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import aiohttp

from proxy.catalog.pricing import (
    Price,
    lookup_price,
    price_from_config,
    with_cache_writes,
)
from proxy.config import PriceConfig
from proxy.tools.loadtest.plan import (
    ADMIN_KEY_ENV,
    MAX_CREATED_KEYS,
    MAX_DURATION_S,
    MAX_PROMPT_TOKENS,
    MAX_REQUESTS,
    LoadKey,
    LoadtestError,
    Plan,
    synthetic_prompt,
)
from proxy.tools.loadtest.reconcile import AdminClient, Reconciler, reconcile
from proxy.tools.loadtest.report import build_report, render
from proxy.tools.loadtest.runner import Runner


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("PROXY_URL", "http://127.0.0.1:8080"),
        help="proxy base URL (env PROXY_URL)",
    )
    parser.add_argument("--key", action="append", default=[], help="API key to load (repeat)")
    parser.add_argument("--keys-file", help="file with one API key per line ('#' comments)")
    parser.add_argument(
        "--create-keys", type=int, default=0, metavar="M", help="mint M keys (needs --admin-key)"
    )
    parser.add_argument("--org", help="org of created keys; narrows key-id lookup")
    parser.add_argument(
        "--admin-key", help=f"admin key for creating keys and reconciling (env {ADMIN_KEY_ENV})"
    )
    parser.add_argument("-c", "--concurrency", type=int, default=16, help="concurrent clients")
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument(
        "--duration", type=float, help=f"seconds to run (default 10, max {MAX_DURATION_S:g})"
    )
    limit.add_argument("--requests", type=int, help=f"requests to send (max {MAX_REQUESTS})")
    parser.add_argument(
        "--rate",
        type=float,
        metavar="R",
        help="send R requests/s on a fixed schedule (open loop; latency counts from each "
        "request's scheduled time) instead of each client sending when its last answer arrives",
    )
    parser.add_argument(
        "--stream-ratio", type=float, default=0.0, help="share of streamed requests, 0..1"
    )
    parser.add_argument(
        "--api",
        choices=("openai", "anthropic"),
        default="openai",
        help="openai: POST /v1/chat/completions; anthropic: POST /v1/messages (x-api-key)",
    )
    parser.add_argument("--model", default="gpt-4o-mini")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument(
        "--prompt-tokens", type=int, default=32, help="approximate prompt size in tokens"
    )
    parser.add_argument("--prompt-file", help="use this file's text as the prompt instead")
    parser.add_argument(
        "--price",
        help="model price per 1M tokens as INPUT,OUTPUT[,CACHED_INPUT] for the cost check "
        "(default: the genai-prices database, as the proxy uses without a configured price)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (s)")
    parser.add_argument("--json", dest="json_path", metavar="FILE", help="write the report here")
    parser.add_argument(
        "--progress",
        type=float,
        default=5.0,
        metavar="S",
        help="a progress line on stderr every S seconds while it runs (0: none; default 5)",
    )


def _read_keys(args: argparse.Namespace) -> list[LoadKey]:
    secrets = list(args.key)
    if args.keys_file:
        try:
            text = Path(args.keys_file).read_text()
        except OSError as exc:
            raise LoadtestError(f"cannot read --keys-file: {exc}") from exc
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                secrets.append(line)
    return [LoadKey(secret) for secret in secrets]


def _prompt(args: argparse.Namespace) -> str:
    if args.prompt_file:
        try:
            return Path(args.prompt_file).read_text()
        except OSError as exc:
            raise LoadtestError(f"cannot read --prompt-file: {exc}") from exc
    if not 1 <= args.prompt_tokens <= MAX_PROMPT_TOKENS:
        raise LoadtestError(f"--prompt-tokens must be 1..{MAX_PROMPT_TOKENS}")
    return synthetic_prompt(args.prompt_tokens)


def _price(args: argparse.Namespace) -> Price | None:
    if not args.price:
        if getattr(args, "api", "openai") == "anthropic":
            found = lookup_price(args.model, "anthropic")
            return None if found is None else with_cache_writes(found)
        return lookup_price(args.model)
    parts = args.price.split(",")
    if len(parts) not in (2, 3):
        raise LoadtestError("--price takes INPUT,OUTPUT or INPUT,OUTPUT,CACHED_INPUT")
    try:
        values = [Decimal(p.strip()) for p in parts]
        config = PriceConfig(
            input=values[0], output=values[1], cached_input=values[2] if len(values) > 2 else None
        )
    except (InvalidOperation, ValueError) as exc:
        raise LoadtestError(f"--price: {exc}") from exc
    price = price_from_config(config)
    return with_cache_writes(price) if getattr(args, "api", "openai") == "anthropic" else price


async def run_loadtest(args: argparse.Namespace) -> dict[str, Any]:
    """Set up keys and reconciliation, run the load, and return the report."""
    admin_key = args.admin_key or os.environ.get(ADMIN_KEY_ENV)
    keys = _read_keys(args)
    if not 0 <= args.create_keys <= MAX_CREATED_KEYS:
        raise LoadtestError(f"--create-keys must be 0..{MAX_CREATED_KEYS}")
    if args.create_keys and not admin_key:
        raise LoadtestError(f"--create-keys needs --admin-key (or {ADMIN_KEY_ENV})")
    if not keys and not args.create_keys:
        raise LoadtestError("no API keys: give --key, --keys-file or --create-keys")
    duration = args.duration
    if duration is None and args.requests is None:
        duration = 10.0
    # An OpenAI-style base URL (".../v1") is accepted as well as the proxy's own.
    url = args.url.rstrip("/").removesuffix("/v1")
    plan = Plan(
        url=url,
        keys=tuple(keys),
        concurrency=args.concurrency,
        duration=duration,
        requests=args.requests,
        stream_ratio=args.stream_ratio,
        model=args.model,
        max_tokens=args.max_tokens,
        prompt=_prompt(args),
        timeout=args.timeout,
        rate=args.rate,
        api=args.api,
    )
    price = _price(args)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        admin = AdminClient(session, url, admin_key) if admin_key else None
        created: list[LoadKey] = []
        reconciler: Reconciler | None = None
        try:
            if admin is not None and args.create_keys:
                created = await admin.create_keys(args.create_keys, args.org)
                plan = dataclasses.replace(plan, keys=(*plan.keys, *created))
            key_ids: list[str | None] = []
            if admin is not None:
                key_ids = await admin.resolve_ids(plan.keys, args.org)
                reconciler = Reconciler(admin)
                await reconciler.prepare([k for k in key_ids if k is not None])
            runner = Runner(plan, price, max(getattr(args, "progress", 0.0) or 0.0, 0.0))
            with _graceful_interrupt(runner):
                tally = await runner.run()
            if reconciler is None:
                reconciliation: dict[str, Any] = {
                    "status": "skipped",
                    "reason": f"no admin key (--admin-key or {ADMIN_KEY_ENV}) to read spend",
                }
            elif not reconciler.key_ids:
                reconciliation = {"status": "skipped", "reason": "no key id could be found"}
            else:
                after = await reconciler.settled()
                reconciliation = reconcile(tally, key_ids, reconciler.before, after, price)
                if reconciler.temporary:
                    reconciliation["notes"].append(
                        f"temporary alert-only budgets on {len(reconciler.temporary)} key(s) "
                        "made spend readable; removed again"
                    )
        finally:
            if reconciler is not None:
                await reconciler.cleanup()
            if admin is not None:
                for key in created:
                    assert key.key_id is not None
                    with contextlib.suppress(LoadtestError):
                        await admin.revoke(key.key_id)
    report = build_report(plan, tally, price, reconciliation)
    if created:
        report["created_keys"] = [k.key_id for k in created]
    return report


@contextlib.contextmanager
def _graceful_interrupt(runner: Runner) -> Iterator[None]:
    """First Ctrl-C ends the run and still reports; a second one stops at once."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGINT, runner.stop)
    except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(args: argparse.Namespace) -> None:
    """Exit status: 0 done, 1 reconciliation mismatch, 2 setup error."""
    try:
        report = _run(run_loadtest(args))
    except LoadtestError as exc:
        print(f"llm-proxy loadtest: {exc}", file=sys.stderr)
        sys.exit(2)
    print(render(report))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
    sys.exit(1 if report["reconciliation"]["status"] == "mismatch" else 0)
