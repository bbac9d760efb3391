"""``llm-proxy usage``: who spent what, from the proxy's cost report
(``/api/v1/llm/usage/costs``), as a table with totals, CSV or JSON.

    llm-proxy usage --group-by model,api_key_id --since 7d
    llm-proxy usage --from 2026-11-01 --to 2026-12-01 --org acme --bucket 1d --csv

With ``--bucket`` the range is cut into UTC-aligned buckets, one cost report each (at most
``MAX_BUCKETS``).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from datetime import UTC, datetime
from typing import Any

from proxy.tools.admin_http import AdminError, AdminHttp, add_connection_flags
from proxy.tools.tables import money, table, to_csv, to_json

DIMENSIONS = ("model", "api_key_id", "external_user_id", "org_id", "team_id")
WIDTHS = {"1m": 60, "1h": 3600, "1d": 86400}
MAX_BUCKETS = 1000
_PARALLEL = 8
_SPAN = re.compile(r"^([0-9]+)([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
METRICS = (
    ("num_model_requests", "requests"),
    ("input_tokens", "input"),
    ("input_cached_tokens", "cached"),
    ("output_tokens", "output"),
    ("cost", "cost"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--group-by",
        default="model",
        help=f"comma-separated, of {', '.join(DIMENSIONS)} (default: model)",
    )
    parser.add_argument("--since", help="a span back from now: 90m, 12h, 7d, 2w (default 7d)")
    parser.add_argument(
        "--from", dest="start", help="start: 2026-11-01, 2026-11-01T08:00 or Unix s"
    )
    parser.add_argument("--to", dest="end", help="end, exclusive (default: now)")
    parser.add_argument("--org", help="one org (cluster admins; default: every org you see)")
    parser.add_argument("--bucket", choices=tuple(WIDTHS), help="one row set per UTC bucket")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="JSON for scripts")
    output.add_argument("--csv", action="store_true", help="CSV for scripts")
    add_connection_flags(parser)


def parse_span(text: str) -> int:
    found = _SPAN.match(text.strip())
    if not found or int(found.group(1)) == 0:
        raise AdminError(f"--since: '{text}' is not a span like 90m, 12h, 7d or 2w", status=2)
    return int(found.group(1)) * _UNIT[found.group(2)]


def parse_time(text: str, flag: str) -> int:
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise AdminError(f"{flag}: '{text}' is not a date, a time or Unix seconds", 2) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def time_range(args: argparse.Namespace, now: int) -> tuple[int, int]:
    if args.since and args.start:
        raise AdminError("give --since or --from, not both", status=2)
    end = parse_time(args.end, "--to") if args.end else now
    if args.start:
        start = parse_time(args.start, "--from")
    else:
        start = end - parse_span(args.since or "7d")
    if end <= start:
        raise AdminError("the range is empty: --to must be after the start", status=2)
    return start, end


def grouping(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        if name not in DIMENSIONS:
            raise AdminError(f"--group-by: '{name}' is not one of {', '.join(DIMENSIONS)}", 2)
    if not names:
        raise AdminError("--group-by needs at least one dimension", status=2)
    return list(dict.fromkeys(names))


def _iso(moment: int) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def collect(args: argparse.Namespace, now: int) -> dict[str, Any]:
    start, end = time_range(args, now)
    dims = grouping(args.group_by)
    spans = [(start, end)]
    if args.bucket:
        width = WIDTHS[args.bucket]
        first = start - start % width
        spans = [(max(b, start), min(b + width, end)) for b in range(first, end, width)]
        if len(spans) > MAX_BUCKETS:
            raise AdminError(
                f"{len(spans)} buckets of {args.bucket}: at most {MAX_BUCKETS}; "
                "use a wider --bucket or a shorter range",
                status=2,
            )
    async with AdminHttp(args) as http:
        gate = asyncio.Semaphore(_PARALLEL)

        async def one(span: tuple[int, int]) -> Any:
            params = [("start_time", str(span[0])), ("end_time", str(span[1]))]
            params += [("group_by", d) for d in dims]
            if args.org:
                params.append(("org_id", args.org))
            async with gate:
                return await http.call("GET", "/api/v1/llm/usage/costs", params)

        answers = await asyncio.gather(*(one(span) for span in spans))
    rows: list[dict[str, Any]] = []
    total = {name: 0 for name, _ in METRICS if name != "cost"}
    total_nano = 0
    currency = None
    for span, answer in zip(spans, answers, strict=True):
        currency = answer.get("currency")
        for found in answer["data"]:
            row: dict[str, Any] = {"bucket": _iso(span[0])} if args.bucket else {}
            row.update({d: found.get(d) for d in dims})
            for name in total:
                row[name] = int(found.get(name) or 0)
                total[name] += row[name]
            row["cost_nano"] = found["cost_nano"]
            row["cost"] = money(found["cost_nano"])
            total_nano += int(found["cost_nano"])
            rows.append(row)
    return {
        "object": "usage.report",
        "start_time": start,
        "end_time": end,
        "bucket_width": args.bucket,
        "group_by": dims,
        "currency": currency,
        "data": rows,
        "total": {**total, "cost_nano": str(total_nano), "cost": money(total_nano)},
    }


def render(report: dict[str, Any]) -> str:
    columns = [("bucket", "bucket")] if report["bucket_width"] else []
    columns += [(d, d) for d in report["group_by"]]
    cost_heading = f"cost ({report['currency']})" if report["currency"] else "cost"
    columns += [(name, cost_heading if name == "cost" else heading) for name, heading in METRICS]
    total = {**report["total"], columns[0][0]: "TOTAL"}
    heading = (
        f"usage {_iso(report['start_time'])} .. {_iso(report['end_time'])}"
        f" by {', '.join(report['group_by'])}"
        + (f", per {report['bucket_width']}" if report["bucket_width"] else "")
    )
    if not report["data"]:
        return f"{heading}\n(no usage)"
    return f"{heading}\n{table(columns, report['data'], total)}"


def main(args: argparse.Namespace) -> int:
    report = asyncio.run(collect(args, int(time.time())))
    if args.json:
        print(to_json(report))
    elif args.csv:
        columns = (["bucket"] if report["bucket_width"] else []) + report["group_by"]
        columns += [name for name, _ in METRICS if name != "cost"] + ["cost_nano", "cost"]
        print(to_csv(columns, report["data"]), end="")
    else:
        print(render(report))
    return 0
