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
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestServer

from proxy.cli import build_parser
from proxy.loadtest import LoadKey, Plan, run_loadtest, synthetic_prompt
from proxy.tokenizer import count_chat_prompt, get_encoding
from tests.conftest import ADMIN_KEY, REPO, Proxy, start_proxy_process, write_config

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
