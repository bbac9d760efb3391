"""``llm-proxy budgets list|get|set|delete|events``: the budget API from the shell, as tables
(``--json`` prints the API's answer as it is).

    llm-proxy budgets set apikey key_0123 --period monthly --limit 50 --alert 80 --block 100
    llm-proxy budgets get org acme
    llm-proxy budgets events apikey key_0123
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any
from urllib.parse import quote

from proxy.tools.admin_http import AdminError, AdminHttp, add_connection_flags
from proxy.tools.tables import table, to_json

BASE = "/api/v1/llm/budgets"
SCOPES = ("org", "apikey", "end-user", "end-user-default")
_SEGMENTS = {
    "org": "org",
    "apikey": "apikey",
    "end-user": "external-user",
    "end-user-default": "external-user-default",
}
BUDGET_COLUMNS = (
    ("id", "id"),
    ("scope", "scope"),
    ("scope_id", "scope id"),
    ("owner", "owner"),
    ("period", "period"),
    ("limit_kind", "kind"),
    ("limit", "limit"),
    ("spent", "spent"),
    ("pct", "%"),
    ("status", "status"),
    ("window", "window"),
    ("thresholds", "thresholds"),
)
EVENT_COLUMNS = (
    ("created_at", "created at"),
    ("type", "type"),
    ("pct", "%"),
    ("period_key", "window"),
    ("spend_snapshot", "spend"),
    ("limit_snapshot", "limit"),
    ("budget_id", "budget"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="budgets_action", required=True)
    listing = sub.add_parser("list", help="every budget you can see")
    get = sub.add_parser("get", help="the budgets of one org or key")
    put = sub.add_parser("set", help="create or replace a budget")
    delete = sub.add_parser("delete", help="remove a budget")
    events = sub.add_parser("events", help="threshold events of an org or key")
    for p in (get, put, delete, events):
        p.add_argument("scope", choices=SCOPES)
        p.add_argument(
            "scope_id",
            nargs="?",
            default="",
            help="the org id, the API key id, or the end user (none for end-user-default)",
        )
        p.add_argument("--org", help="end-user scopes: the org (cluster admins; default: yours)")
    put.add_argument("--period", required=True, choices=("daily", "weekly", "monthly"))
    put.add_argument("--limit", required=True, type=float, help="currency units, or tokens")
    put.add_argument("--kind", default="cost", choices=("cost", "tokens"))
    put.add_argument("--alert", type=int, action="append", default=[], metavar="PCT")
    put.add_argument("--block", type=int, metavar="PCT", help="refuse requests from this %%")
    put.add_argument("--webhook-url")
    put.add_argument("--webhook-secret")
    for p in (put, delete):
        p.add_argument("--owner", default="org", choices=("org", "cluster"))
    events.add_argument("--limit", type=int, help="most recent N (default 100)")
    for p in (listing, get, put, delete, events):
        p.add_argument("--json", action="store_true", help="the API's JSON answer")
        add_connection_flags(p)


def _row(budget: dict[str, Any]) -> dict[str, Any]:
    spend = budget.get("spend") or {}
    kind = budget.get("limit_kind")
    spent = spend.get("cost_spent") if kind == "cost" else spend.get("tokens_spent")
    thresholds = " ".join(f"{t['action']}@{t['pct']}%" for t in budget.get("thresholds", []))
    return {
        **budget,
        "spent": spent,
        "pct": spend.get("pct"),
        "status": spend.get("status"),
        "window": spend.get("window"),
        "thresholds": thresholds,
    }


def _path(args: argparse.Namespace) -> str:
    """The scope's path; an end user's id may hold any printable character (quoted)."""
    segment = _SEGMENTS[args.scope]
    if args.scope == "end-user-default":
        path = f"{BASE}/{segment}"
    elif not args.scope_id:
        raise AdminError(f"budgets {args.budgets_action} {args.scope} needs its id", status=2)
    else:
        path = f"{BASE}/{segment}/{quote(args.scope_id, safe='')}"
    return path


def _org_params(args: argparse.Namespace) -> list[tuple[str, str]]:
    if args.org and args.scope.startswith("end-user"):
        return [("org_id", args.org)]
    return []


def _body(args: argparse.Namespace) -> dict[str, Any]:
    thresholds = [{"pct": pct, "action": "alert"} for pct in args.alert]
    if args.block is not None:
        thresholds.append({"pct": args.block, "action": "block"})
    if not thresholds:
        raise AdminError("a budget needs at least one --alert PCT or --block PCT", status=2)
    limit: float | int = int(args.limit) if args.limit == int(args.limit) else args.limit
    body: dict[str, Any] = {
        "period": args.period,
        "limit_kind": args.kind,
        "limit": limit,
        "thresholds": thresholds,
        "owner": args.owner,
    }
    if args.webhook_url:
        body["webhook_url"] = args.webhook_url
    if args.webhook_secret:
        body["webhook_secret"] = args.webhook_secret
    return body


async def _call(args: argparse.Namespace) -> str:
    action = args.budgets_action
    async with AdminHttp(args) as http:
        if action == "list":
            answer = await http.call("GET", BASE)
        elif action == "get":
            answer = await http.call("GET", _path(args), _org_params(args) or None)
        elif action == "set":
            answer = await http.call(
                "PUT", _path(args), _org_params(args) or None, body=_body(args)
            )
        elif action == "delete":
            params = [("owner", args.owner), *_org_params(args)]
            answer = await http.call("DELETE", _path(args), params)
        else:
            params = [("limit", str(args.limit))] if args.limit else []
            answer = await http.call("GET", _path(args) + "/events", params + _org_params(args))
    if args.json:
        return to_json(answer)
    if action == "delete":
        return f"deleted the {answer['owner']} budget of {answer['scope']} {answer['scope_id']}"
    if action == "events":
        return table(EVENT_COLUMNS, answer["data"]) if answer["data"] else "(no events)"
    budgets = [answer] if action == "set" else answer["data"]
    if not budgets:
        return "(no budgets)"
    return table(BUDGET_COLUMNS, [_row(b) for b in budgets])


def main(args: argparse.Namespace) -> int:
    print(asyncio.run(_call(args)))
    return 0
