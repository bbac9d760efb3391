"""``llm-proxy loadtest`` against a real proxy and the mock: counts add up, spend reconciles.

The mock answers every chat request with 16 completion tokens, and the load test's synthetic
prompt is sized to exactly ``--prompt-tokens`` (one-token words), so every successful request
here costs 32 + 16 = 48 tokens — which makes the expected rejections exact.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from conftest import ADMIN_KEY, REPO, Proxy, eventually, start_proxy_process, write_config

from proxy.catalog.tokenizer import count_chat_prompt, get_encoding
from proxy.cli import build_parser
from proxy.config import ModelConfig, UpstreamConfig
from proxy.tools.loadtest import (
    WAKE_EARLY_S,
    LoadKey,
    LoadtestError,
    Plan,
    Runner,
    build_report,
    render,
    run_loadtest,
    synthetic_prompt,
)
from proxy.tools.mock import MockOptions, build_mock_app

TOKENS_PER_REQUEST = 32 + 16


async def loadtest(*argv: str) -> dict[str, Any]:
    args = build_parser().parse_args(["loadtest", *argv])
    report: dict[str, Any] = await run_loadtest(args)
    return report


def assert_counts_add_up(report: dict[str, Any], sent: int) -> None:
    assert report["requests"] == sent
    answered = sum(report["status"].values())
    assert answered + sum(report["transport_errors"].values()) == sent
    assert report["responses"] == answered == report["latency_ms"]["all"]["count"]
    non_200 = answered - report["status"].get("200", 0)
    assert sum(report["rejections"].values()) == non_200


def test_synthetic_prompt_has_the_requested_size() -> None:
    enc = get_encoding("o200k_base")
    for tokens in (8, 32, 1000):
        body = {"messages": [{"role": "user", "content": synthetic_prompt(tokens)}]}
        assert count_chat_prompt(enc, body) == tokens


def test_stream_ratio_spreads_streams_exactly() -> None:
    plan = Plan(url="http://x", keys=(LoadKey("k"),), stream_ratio=0.3)
    assert sum(plan.streamed(n) for n in range(200)) == 60


async def test_report_adds_up_and_spend_reconciles(proxy: Proxy) -> None:
    report = await loadtest(
        "--url", proxy.url, "--admin-key", ADMIN_KEY, "--create-keys", "3", "--org", "acme",
        "--requests", "200", "--concurrency", "16", "--stream-ratio", "0.5",
    )  # fmt: skip
    assert_counts_add_up(report, 200)
    assert report["status"] == {"200": 200}
    assert report["latency_ms"]["ok_buffered"]["count"] == 100
    assert report["latency_ms"]["ok_streamed"]["count"] == 100
    assert report["usage"]["tokens"] == 200 * TOKENS_PER_REQUEST
    rec = report["reconciliation"]
    assert rec["status"] == "match", rec
    assert rec["keys"] == 3
    assert rec["proxy"]["tokens"] == rec["upstream"]["tokens"] == 200 * TOKENS_PER_REQUEST
    assert rec["proxy"]["cost_nano"] == rec["upstream"]["cost_nano"] > 0
    # What the run set up is gone: created keys revoked, temporary budgets removed.
    for key_id in report["created_keys"]:
        status, key = await proxy.admin("GET", f"/api/v1/keys/{key_id}")
        assert key["status"] == "revoked"
        status, budgets = await proxy.admin("GET", f"/api/v1/llm/budgets/apikey/{key_id}")
        assert status == 200 and budgets["data"] == []


async def test_anthropic_messages_load_reconciles(
    start_proxy: Any, mock_upstream: TestServer
) -> None:
    root = str(mock_upstream.make_url("")).rstrip("/")
    proxy: Proxy = await start_proxy(
        upstreams=[
            UpstreamConfig(
                name="claude",
                base_url=root,
                api_key_env="TEST_UPSTREAM_KEY",
                kind="anthropic",
                forward_headers=["x-mock-*"],
            )
        ],
        models=[ModelConfig(name="claude-sonnet-4-5", upstream="claude")],
    )
    report = await loadtest(
        "--url", proxy.url, "--admin-key", ADMIN_KEY, "--create-keys", "2", "--org", "acme",
        "--requests", "40", "--concurrency", "8", "--stream-ratio", "0.5",
        "--api", "anthropic", "--model", "claude-sonnet-4-5",
    )  # fmt: skip
    assert_counts_add_up(report, 40)
    assert report["status"] == {"200": 40}
    assert report["usage"]["tokens"] == 40 * TOKENS_PER_REQUEST
    rec = report["reconciliation"]
    assert rec["status"] == "match", rec
    assert rec["proxy"]["cost_nano"] == rec["upstream"]["cost_nano"] > 0
    assert proxy.received()[-1].path == "/v1/messages"


async def test_rejections_are_counted_by_reason(proxy: Proxy) -> None:
    _, limited = await proxy.create_key(limits={"rpm": 20})
    budget_id, budgeted = await proxy.create_key()
    status, _ = await proxy.admin(
        "PUT",
        f"/api/v1/llm/budgets/apikey/{budget_id}",
        {
            "period": "daily",
            "limit_kind": "tokens",
            "limit": 1000,
            "thresholds": [{"pct": 100, "action": "block"}],
        },
    )
    assert status == 200
    report = await loadtest(
        "--url", proxy.url, "--admin-key", ADMIN_KEY, "--key", limited, "--key", budgeted,
        "--requests", "200", "--concurrency", "8", "--stream-ratio", "0.25",
    )  # fmt: skip
    assert_counts_add_up(report, 200)
    # 100 requests per key: 20 fit the rpm limit (the test clock stands still), 20 * 48 tokens
    # fit the 1000-token budget; the rest are refused for the right reason, and cost nothing.
    assert report["status"] == {"200": 40, "429": 160}
    assert report["rejections"] == {"rate_limit_exceeded": 80, "budget_exceeded": 80}
    rec = report["reconciliation"]
    assert rec["status"] == "match", rec
    assert rec["proxy"]["tokens"] == 40 * TOKENS_PER_REQUEST
    assert rec["proxy"]["cost_nano"] == rec["upstream"]["cost_nano"]


async def test_unknown_key_is_reported_as_401_without_reconciliation(proxy: Proxy) -> None:
    report = await loadtest("--url", proxy.url, "--key", "sk-bp-nope", "--requests", "20")
    assert_counts_add_up(report, 20)
    assert report["status"] == {"401": 20}
    assert report["rejections"] == {"invalid_api_key": 20}
    assert report["reconciliation"]["status"] == "skipped"


async def run_cli(*argv: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PROXY_ADMIN_KEY", "PROXY_URL")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "loadtest", *argv,
        cwd=str(REPO), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.slow
async def test_cli_runs_for_a_duration_and_writes_json(
    tmp_path: Path, redis_url: str, mock_upstream: TestServer
) -> None:
    config = write_config(tmp_path / "proxy.toml", str(mock_upstream.make_url("/v1")), redis_url)
    server = await start_proxy_process(config, tmp_path / "proxy.log")
    try:
        out_json = tmp_path / "report.json"
        code, out, err = await run_cli(
            "--url", server.url, "--admin-key", ADMIN_KEY, "--create-keys", "2", "--org", "acme",
            "--duration", "1.5", "--concurrency", "8", "--stream-ratio", "0.5",
            "--json", str(out_json),
        )  # fmt: skip
    finally:
        server.stop()
    assert code == 0, err
    report = json.loads(out_json.read_text())
    assert 1.5 <= report["elapsed_s"] < 5
    assert report["status"]["200"] == report["requests"] > 0
    assert report["reconciliation"]["status"] == "match"
    assert "reconcile  MATCH over 2 key(s)" in out


@pytest.mark.slow  # runs the CLI in processes of its own, several seconds
async def test_cli_rejects_bad_options_before_sending() -> None:
    for argv, message in (
        (["--key", "k", "--stream-ratio", "1.5"], "--stream-ratio"),
        (["--key", "k", "--duration", "99999"], "--duration"),
        (["--create-keys", "2"], "--admin-key"),
        ([], "no API keys"),
    ):
        code, _, err = await run_cli("--url", "http://127.0.0.1:9", *argv)
        assert code == 2, err
        assert message in err


# --- fixed rate (open loop) -----------------------------------------------------------------------

MOCK_LATENCY_MS = 50


@pytest.fixture
async def slow_upstream() -> AsyncIterator[str]:
    """The mock with a fixed delay before every answer, loaded directly (no proxy, no books)."""
    server = TestServer(build_mock_app(MockOptions(latency_ms=MOCK_LATENCY_MS)), host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


async def test_fixed_rate_follows_the_schedule(proxy: Proxy) -> None:
    _, key = await proxy.create_key()
    report = await loadtest(
        "--url", proxy.url, "--key", key, "--requests", "100", "--rate", "200",
        "--concurrency", "8", "--stream-ratio", "0.5",
    )  # fmt: skip
    assert_counts_add_up(report, 100)
    assert report["status"] == {"200": 100}
    # Request n is due at n / 200 s (a client wakes up to WAKE_EARLY_S before): the schedule
    # alone takes 99 / 200 s.
    assert 99 / 200 - WAKE_EARLY_S <= report["elapsed_s"] < 5
    assert report["rate"] == 200.0
    assert 0 < report["achieved_rate"] <= 200 * 1.02
    assert report["late_starts"] >= 0
    assert "rate       target 200.0 req/s, achieved" in render(report)


async def test_fixed_rate_duration_issues_only_requests_due_before_the_deadline(
    proxy: Proxy,
) -> None:
    _, key = await proxy.create_key()
    report = await loadtest(
        "--url", proxy.url, "--key", key, "--duration", "0.5", "--rate", "100",
        "--concurrency", "4",
    )  # fmt: skip
    # Due at 0, 0.01, ..., 0.49 s; the one due at 0.5 s is not sent.
    assert_counts_add_up(report, 50)
    assert report["status"] == {"200": 50}
    assert 0.49 - WAKE_EARLY_S <= report["elapsed_s"] < 5


async def test_fixed_rate_latency_counts_from_the_scheduled_time(slow_upstream: str) -> None:
    # One client, 50 ms per answer, a request due every 1 ms: the schedule runs away, and each
    # request's wait for the busy client is part of its latency (no coordinated omission).
    requests = 20
    report = await loadtest(
        "--url", slow_upstream, "--key", "k", "--requests", str(requests), "--rate", "1000",
        "--concurrency", "1",
    )  # fmt: skip
    assert_counts_add_up(report, requests)
    assert report["status"] == {"200": requests}
    # Request n (due at n ms) ends no earlier than (n + 1) * 50 ms.
    latency = report["latency_ms"]["all"]
    assert latency["max"] >= requests * MOCK_LATENCY_MS - (requests - 1)
    assert latency["p50"] >= 8 * MOCK_LATENCY_MS
    assert report["late_starts"] >= requests - 1
    assert report["achieved_rate"] < 1000 / 10
    assert f"{report['late_starts']} request(s) started late" in render(report)

    closed = await loadtest(
        "--url", slow_upstream, "--key", "k", "--requests", str(requests), "--concurrency", "1",
    )  # fmt: skip
    assert_counts_add_up(closed, requests)
    assert closed["rate"] is None and closed["late_starts"] is None
    assert closed["achieved_rate"] is None
    # Closed loop: each request measured from its own send, i.e. the mock's delay alone.
    assert MOCK_LATENCY_MS <= closed["latency_ms"]["all"]["max"] < 8 * MOCK_LATENCY_MS
    assert "rate " not in render(closed)
    assert report["requests"] == closed["requests"]


async def test_stop_ends_clients_waiting_for_their_slot(slow_upstream: str) -> None:
    # 1 request/s, 4 clients: three of them hold tickets due 1, 2 and 3 s ahead.
    plan = Plan(
        url=slow_upstream, keys=(LoadKey("k"),), concurrency=4, duration=None, requests=10, rate=1.0
    )
    runner = Runner(plan, None)
    run = asyncio.create_task(runner.run())

    async def first_sent() -> bool:
        return runner.tally.sent >= 1

    await eventually(first_sent, what="the first request")
    runner.stop()
    tally = await asyncio.wait_for(run, timeout=5)  # waiting clients would send at 1 s
    assert tally.interrupted
    assert tally.sent == 1
    assert tally.statuses == {200: 1}
    report = build_report(plan, tally, None, {"status": "skipped", "reason": "test"})
    assert_counts_add_up(report, 1)


def test_rate_must_be_positive_and_bounded() -> None:
    keys = (LoadKey("k"),)
    for rate in (0.0, -1.0, float("nan"), float("inf"), 1e6):
        with pytest.raises(LoadtestError, match="--rate must be in"):
            Plan(url="http://x", keys=keys, rate=rate)
    with pytest.raises(LoadtestError, match="longer than"):
        Plan(url="http://x", keys=keys, duration=None, requests=10_000, rate=1.0)
    assert Plan(url="http://x", keys=keys, duration=None, requests=3600, rate=1.0).rate == 1.0


@pytest.mark.slow  # runs the CLI in processes of its own, several seconds
async def test_cli_rejects_bad_rates_before_sending() -> None:
    for rate, message in (
        ("0", "--rate must be in (0, 100000]"),
        ("-5", "--rate must be in (0, 100000]"),
        ("fast", "argument --rate: invalid float value: 'fast'"),
    ):
        code, out, err = await run_cli("--url", "http://127.0.0.1:9", "--key", "k", "--rate", rate)
        assert code == 2, err
        assert message in err
        assert out == ""


@pytest.mark.slow  # runs the CLI in processes of its own, several seconds
async def test_cli_shows_progress_while_it_runs(proxy: Proxy) -> None:
    _, key = await proxy.create_key()
    code, out, err = await run_cli(
        "--url", proxy.url, "--key", key, "--duration", "2.2", "--concurrency", "4",
        "--progress", "0.5",
    )  # fmt: skip
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("loadtest: ")]
    assert len(lines) >= 3, err
    assert "/2.2 s" in lines[0] and "answered" in lines[0] and "req/s" in lines[0]
    assert "loadtest: " not in out  # the report alone on stdout
