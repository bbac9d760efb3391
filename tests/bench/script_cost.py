"""What admit and settle cost inside Redis, per call, without HTTP or a load generator.

    python tests/bench/script_cost.py [plain|named|tracked] [--calls 20000] [--batch N]

Starts its own Redis, provisions what the benchmark's key has (key and org rate limits, a
cost budget on the key and a token budget on the org), then runs N admits and N settles one at
a time and reports, from ``INFO commandstats``, Redis's time per EVALSHA (wall time inside
the call) and the redis-server process's CPU time per call (from /proc; steadier when other
processes share the cores). Scenarios: ``plain`` (no end user), ``named`` (each request names
one of 1,000 end users, in an org without end-user rules), ``tracked`` (the same, with a
default budget and rate limits for each end user). ``--batch N``: settles go N to a call
(``settle_batch.lua``), and settle figures are per settle, not per call.

To compare two versions, run it with ``PYTHONPATH`` pointing at each version's source tree.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # after PYTHONPATH: another version's tree wins when given

from proxy.admin.budget_shapes import BudgetInput  # noqa: E402
from proxy.config import RedisConfig  # noqa: E402
from proxy.gateway.settle_spool import SettleSpool  # noqa: E402
from proxy.ledger.admission import Admission  # noqa: E402
from proxy.ledger.api_keys import Identity, KeyCreate, KeyStore, Limits  # noqa: E402
from proxy.ledger.budgets import BudgetStore  # noqa: E402
from proxy.store.connection import connect  # noqa: E402
from proxy.store.embedded_redis import EmbeddedRedis  # noqa: E402

HUGE = 10**12
ORG = "bench"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(scenario: str, calls: int, batch: int = 1) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="script-cost-"))
    with EmbeddedRedis(work / "redis", persist=False) as server:
        client = connect(RedisConfig(), server.url)
        stats = redis.Redis.from_url(server.url, decode_responses=True)
        keys = KeyStore(client)
        limits = Limits(rpm=HUGE, tpm=HUGE, concurrency=100_000)
        record, _ = await keys.create(KeyCreate(name="bench", limits=limits), ORG)
        await keys.set_org_limits(ORG, limits)
        budgets = BudgetStore(client)
        admission = Admission(client, {}, 120, time.time, SettleSpool(work / "spool"))
        now = time.time()
        windows = admission.windows(now)
        thresholds = [{"pct": 80, "action": "alert"}, {"pct": 100, "action": "block"}]
        cost = BudgetInput.model_validate(
            {"period": "monthly", "limit_kind": "cost", "limit": 10**6, "thresholds": thresholds}
        )
        tokens = cost.model_copy(update={"limit_kind": "tokens", "limit": HUGE})
        await budgets.put(ORG, "apikey", record.id, cost, windows, now)
        await budgets.put(ORG, "org", ORG, tokens, windows, now)
        if scenario == "tracked":
            from proxy.ledger.end_users import EndUserPolicies, EndUserPolicy

            await budgets.put(ORG, "external_user_default", ORG, cost, windows, now)
            await EndUserPolicies(client).put(ORG, EndUserPolicy(limits=limits))
        identity = Identity(record.id, ORG, "member")
        rids = [f"req_{i}" for i in range(calls)]
        phases: dict[str, Any] = {}
        stats.config_resetstat()
        started = cpu_seconds(server.pid or 0)
        for i, rid in enumerate(rids):
            extra: dict[str, Any] = {}
            if scenario != "plain":
                from proxy.ledger.keys import end_user_tag

                user = f"user-{i % 1000}"
                extra = {"end_user": user, "end_user_tag": end_user_tag(user)}
            decision = await admission.admit(
                identity, rid, 53, 20_000, prompt_tokens=37, model="gpt-4o-mini", **extra
            )
            assert type(decision).__name__ == "Admitted", decision
        phases["admit"] = (stats.info("commandstats")["cmdstat_evalsha"], started)
        stats.config_resetstat()
        started = cpu_seconds(server.pid or 0)
        requests = [
            admission.settle_request(identity, rid, 50, 18_000, {"rid": rid}) for rid in rids
        ]
        if batch <= 1:
            for request in requests:
                await admission.settle(request)
        else:
            for at in range(0, calls, batch):
                await admission.settle_batch(ORG, requests[at : at + batch])
        phases["settle"] = (stats.info("commandstats")["cmdstat_evalsha"], started)
        ended = cpu_seconds(server.pid or 0)
        result: dict[str, Any] = {"scenario": scenario, "calls": calls, "keys": stats.dbsize()}
        admit_stats, admit_start = phases["admit"]
        settle_stats, settle_start = phases["settle"]
        result["admit_us"] = round(float(admit_stats["usec_per_call"]), 1)
        result["settle_us"] = round(float(settle_stats["usec"]) / calls, 1)
        result["batch"] = batch
        result["admit_cpu_us"] = round((settle_start - admit_start) / calls * 1e6, 1)
        result["settle_cpu_us"] = round((ended - settle_start) / calls * 1e6, 1)
        await client.aclose()
        stats.close()
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "scenario", nargs="?", default="plain", choices=("plain", "named", "tracked")
    )
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1, help="settles per call")
    args = parser.parse_args()
    r = asyncio.run(measure(args.scenario, args.calls, args.batch))
    print(
        f"{r['scenario']}: admit {r['admit_us']} us in Redis ({r['admit_cpu_us']} us CPU) per "
        f"call, settle {r['settle_us']} us ({r['settle_cpu_us']} us CPU) per settle, "
        f"{r['batch']} settles per call, "
        f"{r['calls']} calls, {r['keys']} keys left"
    )


if __name__ == "__main__":
    main()
