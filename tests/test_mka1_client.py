"""The MKA1 gateway's generated client (``meetkai-mka1==0.6.10``), unchanged, against the
proxy's usage, cost and pricing endpoints: every answer parses, and what it parses adds up to
the mock's usage priced.

The client pins ``pydantic<2.13``, so it gets a virtualenv of its own, created by this test on
first use in ``.venv-mka1/`` at the repository root (gitignored, reused afterwards), and
``mka1_usage_calls.py`` runs in it against the proxy this test starts.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ADMIN_KEY, REPO, Proxy
from test_usage_api import REPORT_OF, day_range, mixed_load

MKA1 = "meetkai-mka1==0.6.10"
VENV = REPO / ".venv-mka1"
SCRIPT = Path(__file__).with_name("mka1_usage_calls.py")


@pytest.fixture(scope="session")
def mka1_python() -> Iterator[Path]:
    """The client's virtualenv: built once (under a lock) and kept for later runs."""
    python = VENV / "bin" / "python"
    marker = VENV / ".installed"
    with (REPO / ".venv-mka1.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (marker.exists() and marker.read_text() == MKA1 and python.exists()):
            shutil.rmtree(VENV, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=300)
            subprocess.run(
                [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", MKA1],
                check=True,
                timeout=600,
            )
            marker.write_text(MKA1)
    yield python


def total(rows: list[dict[str, Any]], field: str = "num_model_requests") -> int:
    return sum(r[field] for r in rows)


def results(page: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for bucket in page["data"] for r in bucket["results"]]


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_the_mka1_client_parses_every_usage_and_pricing_answer(
    proxy: Proxy, mka1_python: Path
) -> None:
    charges, keys, _ = await mixed_load(proxy)
    key_list = list(keys.values())
    member, org_admin = key_list[0], key_list[2]
    start, end = day_range(proxy.clock())
    process = await asyncio.create_subprocess_exec(
        str(mka1_python),
        str(SCRIPT),
        proxy.url,
        ADMIN_KEY,
        org_admin,
        member,
        str(start),
        str(end),
        str(int(time.time())),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 300)
    assert process.returncode == 0, stderr.decode()
    out = json.loads(stdout)

    everything = sum(c.cost for c in charges)
    acme = [c for c in charges if c.org == "acme"]
    # Costs, with one and several group_by values, an org, an end user.
    assert out["costs"]["object"] == "usage.costs" and out["costs"]["group_by"] == ["model"]
    assert out["costs"]["currency"] == "USD" and out["costs"]["start_time"] == start
    for name in ("costs", "costs_by_key", "costs_by_all"):
        assert out[name]["total_cost_nano"] == str(everything), name
        assert sum(int(r["cost_nano"]) for r in out[name]["data"]) == everything
    assert {r["api_key_id"] for r in out["costs_by_key"]["data"]} == {c.key_id for c in charges}
    assert all(r["team_id"] is None for r in out["costs_by_all"]["data"])
    assert out["costs_acme"]["total_cost_nano"] == str(sum(c.cost for c in acme))
    assert {r["org_id"] for r in out["costs_acme"]["data"]} == {"acme"}
    assert [r["external_user_id"] for r in out["costs_alice"]["data"]] == ["alice"]
    assert out["costs_alice"]["total_cost_nano"] == str(
        sum(c.cost for c in charges if c.user == "alice")
    )
    # Bucketed pages: widths, filters, groupings, paging.
    hourly = out["completions_1h"]
    assert len(hourly["data"]) == 24 and hourly["has_more"] is False
    assert total(results(hourly)) == sum(REPORT_OF[c.endpoint] == "completions" for c in acme)
    assert {(r["model"], r["org_id"]) for r in results(hourly)} <= {
        ("gpt-4o", None),
        ("gpt-4o-mini", None),
    }
    minutes = out["completions_1m"]
    assert all(b["end_time"] - b["start_time"] == 60 for b in minutes["data"])
    assert total(results(minutes)) == sum(REPORT_OF[c.endpoint] == "completions" for c in charges)
    assert {r["org_id"] for r in results(minutes)} == {"acme", "globex"}
    pages = out["completions_pages"]
    assert [len(p["data"]) for p in pages] == [2, 2, 1]
    starts = [b["start_time"] for p in pages for b in p["data"]]
    assert starts == [start + (d - 4) * 86400 for d in range(5)]
    assert sum(total(results(p)) for p in pages) == sum(
        REPORT_OF[c.endpoint] == "completions" and c.user == "alice" for c in charges
    )
    embeddings = results(out["embeddings"])
    assert {r["model"] for r in embeddings} == {"text-embedding-3-small"}
    assert total(embeddings) == sum(c.endpoint == "embeddings" for c in charges)
    assert total(embeddings, "input_tokens") == sum(
        c.input_tokens for c in charges if c.endpoint == "embeddings"
    )
    responses = results(out["responses"])
    assert {(r["background"], r["user_id"]) for r in responses} == {(False, None)}
    assert total(responses, "output_tokens") == sum(
        c.output for c in charges if c.endpoint == "responses"
    )
    # Prices: the list, one model, the org overrides (none), the currency; writes are 405.
    prices = {row["model"]: row for row in out["prices"]["data"]}
    assert prices["gpt-4o"]["rates"]["input_tokens"] == 2.5e-06
    assert [r["model"] for r in out["price_gpt4o"]["data"]] == ["gpt-4o"]
    assert out["org_prices"] == {"object": "list", "data": []}
    assert out["currency"] == {"currency": "USD"}
    for name in ("set_price", "clear_price", "set_org_price", "clear_org_price", "set_currency"):
        assert out[name]["error"] == 405, name
        assert "configuration" in json.loads(out[name]["body"])["error"]["message"]
    # Who may read.
    assert {r["org_id"] for r in out["org_admin_costs"]["data"]} == {"acme"}
    assert out["org_admin_other_org"]["error"] == 403
    assert out["org_admin_other_org_ids"]["error"] == 403
    assert out["member_costs"]["error"] == 403
    assert out["member_prices"]["error"] == 403
