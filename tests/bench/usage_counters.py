"""What the usage counters cost: Redis CPU per request and Redis memory per combination.

    python tests/bench/usage_counters.py [--keys 10] [--models 3] [--users 200] [--requests 20000]

Admits and settles requests through the real scripts (``Admission``: ``admit.lua`` and
``settle.lua``) against an embedded Redis of its own, spread over ``keys`` x ``models`` x
``users`` combinations within one minute, and reports Redis's own CPU time per admitted and
settled request (``INFO cpu``, so the client's cost is not in it; and the admit and settle
scripts' own time, ``INFO commandstats``) and ``MEMORY USAGE`` of the
minute, hour and day hashes the settles wrote. From that it projects one org's bound: minutes
kept ``retention_1m_hours`` hours, hours ``retention_1h_days`` days, days ``retention_1d_days``
days, each as full as this one. Run from a checkout without the counters, it measures the
scripts without them (for before/after comparisons of the CPU figure).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import redis.asyncio as aioredis  # noqa: E402

from proxy import config  # noqa: E402
from proxy.gateway.settle_spool import SettleSpool  # noqa: E402
from proxy.ledger.admission import Admission  # noqa: E402
from proxy.ledger.api_keys import Identity  # noqa: E402
from proxy.store.embedded_redis import EmbeddedRedis  # noqa: E402

ORG = "bench"


async def measure(args: argparse.Namespace) -> dict[str, object]:
    usage = config.UsageConfig() if hasattr(config, "UsageConfig") else None
    with tempfile.TemporaryDirectory() as scratch:
        server = EmbeddedRedis(Path(scratch) / "redis", persist=False)
        await server.astart()
        redis = aioredis.Redis.from_url(server.url, decode_responses=True)
        try:
            at = float(int(time.time()) // 60 * 60 + 1)  # one minute, one hour, one day
            extra: dict[str, Any] = {}
            if "usage" in inspect.signature(Admission).parameters:
                extra["usage"] = usage
            admission = Admission(
                redis, {}, 120.0, lambda: at, SettleSpool(Path(scratch) / "spool"), **extra
            )
            for k in range(args.keys):
                await redis.hset(f"bp:{{o:{ORG}}}:key:key_{k:016x}", "status", "active")
            sem = asyncio.Semaphore(64)

            async def one(n: int) -> None:
                kid = f"key_{n % args.keys:016x}"
                model = f"model-{(n // args.keys) % args.models}"
                user = f"end-user-{(n // (args.keys * args.models)) % args.users:06d}"
                who = Identity(kid, ORG, "member")
                rid = f"req_{n:012x}"
                async with sem:
                    await admission.admit(
                        who, rid, 200, 5000, prompt_tokens=100, model=model,
                        endpoint="chat/completions", end_user=user,
                    )  # fmt: skip
                    record: dict[str, str | int | None] = {
                        "rid": rid, "kid": kid, "user": user, "model": model,
                        "endpoint": "chat/completions", "in": 100, "out": 50,
                        "cached": 20, "cost_nano": 4321,
                    }  # fmt: skip
                    await admission.settle(admission.settle_request(who, rid, 150, 4321, record))

            await asyncio.gather(*(one(n) for n in range(min(2000, args.requests))))  # warm-up
            await redis.config_resetstat()
            before = await redis.info("cpu")
            await asyncio.gather(*(one(n) for n in range(2000, args.requests)))
            after = await redis.info("cpu")
            used = sum(after[f] - before[f] for f in ("used_cpu_user", "used_cpu_sys"))
            measured = max(args.requests - 2000, 1)
            cpu_us = used / measured * 1e6
            scripts_us = (await redis.info("commandstats"))["cmdstat_evalsha"]["usec"] / measured
            widths = {}
            for code, seconds in (("m", 60), ("h", 3600), ("d", 86400)):
                key = f"bp:{{o:{ORG}}}:usage:{code}:{int(at) // seconds * seconds}"
                if await redis.exists(key):
                    widths[code] = {
                        "bytes": int(await redis.memory_usage(key) or 0),
                        "fields": int(await redis.hlen(key)),
                        "encoding": await redis.object("encoding", key),
                    }
            admission.close()
        finally:
            await redis.aclose()
            await server.astop()
    combos = min(args.keys * args.models * args.users, args.requests)
    if not widths:
        return {
            "redis_cpu_us_per_request": round(cpu_us, 1),
            "scripts_us_per_request": round(scripts_us, 1),
            "counters": "none",
        }
    per_combo = widths["d"]["bytes"] / combos
    assert usage is not None
    buckets = {
        "m": usage.retention_1m_hours * 60,
        "h": usage.retention_1h_days * 24,
        "d": usage.retention_1d_days,
    }
    bound = sum(int(widths[c]["bytes"]) * n for c, n in buckets.items())
    return {
        "redis_cpu_us_per_request": round(cpu_us, 1),
        "scripts_us_per_request": round(scripts_us, 1),
        "combinations": combos,
        "requests": args.requests,
        "widths": widths,
        "bytes_per_combination": round(float(per_combo), 1),
        "buckets_kept": buckets,
        "org_bound_mb_if_every_bucket_this_full": round(bound / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=10)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--requests", type=int, default=20000)
    result = asyncio.run(measure(parser.parse_args()))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
