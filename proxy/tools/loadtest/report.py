"""The report: throughput, latency percentiles, statuses and rejections, the reconciliation,
as JSON and as a human-readable table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from proxy.catalog.pricing import (
    Price,
)
from proxy.tools.loadtest.plan import Plan
from proxy.tools.loadtest.tally import KeyUsage, Tally


def percentiles(values: Sequence[float]) -> dict[str, float] | None:
    """Nearest-rank percentiles in milliseconds."""
    if not values:
        return None
    ordered = sorted(values)
    n = len(ordered)

    def rank(p: float) -> float:
        return round(ordered[max(math.ceil(p / 100 * n) - 1, 0)] * 1000, 3)

    return {
        "count": n,
        "mean": round(sum(ordered) / n * 1000, 3),
        "p50": rank(50),
        "p90": rank(90),
        "p99": rank(99),
        "max": round(ordered[-1] * 1000, 3),
    }


def build_report(
    plan: Plan, tally: Tally, price: Price | None, reconciliation: dict[str, Any]
) -> dict[str, Any]:
    total = KeyUsage()
    for usage in tally.per_key:
        total.add(usage)
    completed = sum(tally.statuses.values())
    elapsed = tally.elapsed or 1e-9
    achieved: float | None = None
    if plan.rate is not None:
        # Sends per second over the sending window, one slot per request: on schedule, the rate.
        achieved = round(tally.sent / (tally.last_send + 1 / plan.rate), 2) if tally.sent else 0.0
    return {
        "target": plan.url,
        "model": plan.model,
        "concurrency": plan.concurrency,
        "keys": len(plan.keys),
        "stream_ratio": plan.stream_ratio,
        "max_tokens": plan.max_tokens,
        "limit": {"duration_s": plan.duration} if plan.duration else {"requests": plan.requests},
        "interrupted": tally.interrupted,
        "requests": tally.sent,
        "responses": completed,
        "elapsed_s": round(tally.elapsed, 3),
        "rps": round(completed / elapsed, 2),
        "ok_rps": round(tally.statuses.get(200, 0) / elapsed, 2),
        "rate": plan.rate,
        "achieved_rate": achieved,
        "late_starts": tally.late_starts if plan.rate is not None else None,
        "latency_ms": {
            "all": percentiles(tally.latency_all),
            "ok_buffered": percentiles(tally.latency_buffered),
            "ok_streamed": percentiles(tally.latency_streamed),
            "streamed_first_byte": percentiles(tally.first_byte_streamed),
        },
        "status": {str(k): v for k, v in sorted(tally.statuses.items())},
        "rejections": dict(tally.reasons.most_common()),
        "transport_errors": dict(tally.transport_errors.most_common()),
        "usage": {
            "prompt_tokens": total.prompt_tokens,
            "completion_tokens": total.completion_tokens,
            "cached_tokens": total.cached_tokens,
            "tokens": total.tokens,
            "cost_nano": total.cost_nano if price is not None else None,
            "responses_without_usage": tally.usage_missing,
        },
        "price_nano_per_1m": (
            None
            if price is None
            else {
                "input": price.input_nano_per_m,
                "cached_input": price.cached_input_nano_per_m,
                "output": price.output_nano_per_m,
                "source": price.source,
            }
        ),
        "reconciliation": reconciliation,
    }


def _fmt_latency(row: dict[str, float] | None) -> str:
    if row is None:
        return "-"
    return "p50 {p50:.1f}  p90 {p90:.1f}  p99 {p99:.1f}  max {max:.1f}  (n={count})".format(**row)


def _money(nano: int | None) -> str:
    return "-" if nano is None else f"{Decimal(nano) / 1_000_000_000:.9f}"


def render(report: dict[str, Any]) -> str:
    """The report for people; ``--json`` writes the same data for machines."""
    lines = [
        f"llm-proxy loadtest → {report['target']}  model {report['model']}  "
        f"{report['concurrency']} clients, {report['keys']} key(s), "
        f"{report['stream_ratio']:.0%} streamed, max_tokens {report['max_tokens']}",
        f"requests   {report['requests']} sent, {report['responses']} answered in "
        f"{report['elapsed_s']:.2f} s → {report['rps']:.1f} req/s "
        f"({report['ok_rps']:.1f} req/s with 200)"
        + ("  [interrupted]" if report["interrupted"] else ""),
    ]
    if report["rate"] is not None:
        late = report["late_starts"]
        lines.append(
            f"rate       target {report['rate']:.1f} req/s, achieved {report['achieved_rate']:.1f} "
            "req/s, "
            + (
                f"{late} request(s) started late (all clients busy, or this client short of "
                "CPU); latency counts from the scheduled time"
                if late
                else "every request started on time"
            )
        )
    lines.append("latency ms")
    for name, row in report["latency_ms"].items():
        lines.append(f"  {name:<20} {_fmt_latency(row)}")
    status = "  ".join(f"{k}: {v}" for k, v in report["status"].items()) or "-"
    lines.append(f"status     {status}")
    if report["rejections"]:
        lines.append(
            "rejections " + "  ".join(f"{k}: {v}" for k, v in report["rejections"].items())
        )
    if report["transport_errors"]:
        lines.append(
            "client errors " + "  ".join(f"{k}: {v}" for k, v in report["transport_errors"].items())
        )
    usage = report["usage"]
    lines.append(
        f"usage      upstream reported {usage['tokens']} tokens "
        f"({usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion), "
        f"cost {_money(usage['cost_nano'])}"
    )
    rec = report["reconciliation"]
    if rec["status"] == "skipped":
        lines.append(f"reconcile  skipped: {rec['reason']}")
    else:
        lines.append(
            f"reconcile  {rec['status'].upper()} over {rec['keys']} key(s): tokens upstream "
            f"{rec['upstream']['tokens']} / proxy {rec['proxy']['tokens']}; cost upstream "
            f"{_money(rec['upstream']['cost_nano'])} / proxy {_money(rec['proxy']['cost_nano'])}"
        )
        lines.extend(f"           note: {note}" for note in rec["notes"])
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------------------
