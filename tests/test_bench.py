"""The benchmark runs end to end (short, with the built-in generator so CI needs no wrk) and
reports what the issue asks of it; its figures themselves are never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the benchmark's own processes, end to end

BENCH = Path(__file__).parent / "bench" / "run_bench.py"


def test_benchmark_measures_all_three_targets_and_counts_redis_calls(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--duration", "1", "--warmup", "1", "--scenario", "short",
         "--generator", "python", "--connections", "4", "--rounds", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    short = result["scenarios"]["short"]
    assert set(short["targets"]) == {
        "mock", "passthrough", "proxy", "cluster", "cluster_replicated",
    }  # fmt: skip
    for row in short["targets"].values():
        assert row["requests"] > 0 and row["errors"] == 0, row
        assert row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
    # Every request was admitted: one admit and one settle each, nothing else scripted —
    # on the single Redis and, summed over the shards, on the cluster.
    assert short["targets"]["proxy"]["redis_per_request"]["evalsha"] == 2.0
    # On a cluster a reply that comes late (a WAIT past its timeout on a loaded machine) is
    # released by one more call, so a few in a thousand may take a third.
    for name in ("cluster", "cluster_replicated"):
        assert 2.0 <= short["targets"][name]["redis_per_request"]["evalsha"] <= 2.01, name
    # The cluster rows spread their orgs over all three shards and say what each shard costs.
    for name in ("cluster", "cluster_replicated"):
        shards = short["targets"][name]["redis_shards"]
        assert set(shards) == {"shard1", "shard2", "shard3"}
        assert all(shard["share_of_requests"] > 0 for shard in shards.values())
        assert abs(sum(shard["share_of_requests"] for shard in shards.values()) - 1) < 0.01
        assert all(shard["master_us_per_request"] > 0 for shard in shards.values())
    assert "Redis CPU per shard" in done.stdout
    assert set(short["comparison"]["topologies"]) == {"cluster", "cluster_replicated"}
    comparison = short["comparison"]
    proxy, passthrough = short["targets"]["proxy"], short["targets"]["passthrough"]
    assert comparison["throughput_ratio_c_over_b"] == round(proxy["rps"] / passthrough["rps"], 3)
    # Two rounds, and the rows shown are one of them (with two, the higher ratio).
    assert len(comparison["round_ratios"]) == 2
    assert comparison["throughput_ratio_c_over_b"] == max(comparison["round_ratios"])
    assert "(c)/(b) throughput" in done.stdout
    # The same paced load on (b) and (c): half of what (c) carried, offered to both.
    paced = short["paced"]
    assert set(paced) == {"passthrough", "proxy", "cluster", "cluster_replicated"}
    offered = round(proxy["rps"] * 0.5, 1)
    for row in paced.values():
        assert row["offered_rps"] == offered
        assert row["rps"] > 0
        assert row["errors"] == 0 and row["p50_ms"] <= row["p99_ms"]
    assert comparison["paced_added_p50_ms"] == round(
        paced["proxy"]["p50_ms"] - paced["passthrough"]["p50_ms"], 3
    )
    assert "added latency at the same load" in done.stdout


def test_script_cost_measures_admit_and_settle_with_end_users() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH.with_name("script_cost.py")), "tracked", "--calls", "200"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("tracked: admit ") and "200 calls" in done.stdout
