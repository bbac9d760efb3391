"""``llm-proxy keys``: create, list, get, update, rotate and revoke API keys over the admin
API — tables for people, ``--json`` (the API's answer) for scripts, one-line errors, as
``llm-proxy budgets`` does."""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from proxy.tools.admin_http import AdminError, AdminHttp, add_connection_flags
from proxy.tools.tables import table, to_json

ROLES = ("member", "org_admin", "cluster_admin")
LIMITS = (
    ("rps", "requests per second"),
    ("rpm", "requests per minute"),
    ("rph", "requests per hour"),
    ("rpd", "requests per day"),
    ("tpm", "tokens per minute"),
    ("concurrency", "concurrent requests"),
)
KEY_COLUMNS = (
    ("id", "key id"),
    ("org_id", "org"),
    ("name", "name"),
    ("role", "role"),
    ("status", "status"),
    ("key_prefix", "prefix"),
    ("models", "models"),
    ("limits", "limits"),
    ("expires", "expires"),
    ("last_used", "last used"),
    ("metadata", "metadata"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_action", required=True)
    create = sub.add_parser("create", help="a new key (its secret is printed this once)")
    create.add_argument("--org", help="org id (required for cluster admins)")
    create.add_argument("--name", default="")
    create.add_argument("--role", default="member", choices=ROLES)
    create.add_argument("--models", help="comma-separated allowed models (default: all)")
    listing = sub.add_parser("list", help="the keys of every org you can see")
    listing.add_argument("--org")
    get = sub.add_parser("get", help="one key")
    revoke = sub.add_parser("revoke", help="refuse the key from the next request on")
    rotate = sub.add_parser("rotate", help="a new secret for the same key id")
    rotate.add_argument(
        "--grace-seconds", type=int, default=0, help="how long the old secret keeps working"
    )
    update = sub.add_parser("update", help="change name, role, models, limits, expiry, metadata")
    update.add_argument("--name")
    update.add_argument("--role", choices=ROLES)
    update.add_argument("--models", help="comma-separated allowed models; '' for all")
    update.add_argument("--no-expiry", action="store_true", help="remove the expiry")
    for p in (get, revoke, rotate, update):
        p.add_argument("key_id")
    for p in (create, update):
        for name, words in LIMITS:
            p.add_argument(f"--{name}", type=int, help=words)
        p.add_argument("--expires-at", help="ISO 8601 instant (2027-01-31T00:00:00Z)")
        p.add_argument("--expires-in", help="a duration from now: 30d, 12h, 90m")
        p.add_argument(
            "--metadata", action="append", metavar="KEY=VALUE", help="repeatable; replaces all"
        )
    for p in (create, listing, get, revoke, rotate, update):
        p.add_argument("--json", action="store_true", help="the API's JSON answer")
        add_connection_flags(p)


def _expires(args: argparse.Namespace) -> int | None:
    if args.expires_at and args.expires_in:
        raise AdminError("give --expires-at or --expires-in, not both", status=2)
    if args.expires_at:
        try:
            instant = datetime.fromisoformat(args.expires_at.replace("Z", "+00:00"))
        except ValueError:
            raise AdminError(f"--expires-at {args.expires_at!r} is not ISO 8601", 2) from None
        if instant.tzinfo is None:
            instant = instant.replace(tzinfo=UTC)
        return int(instant.timestamp())
    if args.expires_in:
        text = args.expires_in.strip()
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
        if len(text) < 2 or text[-1] not in units or not text[:-1].isdigit():
            raise AdminError(f"--expires-in {text!r}: a number and s, m, h or d (30d)", 2)
        return int(time.time()) + int(text[:-1]) * units[text[-1]]
    return None


def _metadata(pairs: list[str] | None) -> dict[str, str] | None:
    if pairs is None:
        return None
    result: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise AdminError(f"--metadata {pair!r}: KEY=VALUE", status=2)
        result[name] = value
    return result


def _body(args: argparse.Namespace, creating: bool) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if creating:
        body.update(name=args.name, role=args.role)
        if args.org:
            body["org_id"] = args.org
        if args.models:
            body["models"] = args.models.split(",")
    else:
        for name in ("name", "role"):
            if getattr(args, name) is not None:
                body[name] = getattr(args, name)
        if args.models is not None:
            body["models"] = args.models.split(",") if args.models else None
        if args.no_expiry:
            body["expires_at"] = None
    limits = {name: getattr(args, name) for name, _ in LIMITS if getattr(args, name) is not None}
    if limits or creating:
        body["limits"] = limits
    expires = _expires(args)
    if expires is not None:
        body["expires_at"] = expires
    metadata = _metadata(args.metadata)
    if metadata is not None:
        body["metadata"] = metadata
    return body


def _when(seconds: int | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M")


def _row(key: dict[str, Any]) -> dict[str, Any]:
    limits = " ".join(f"{k}={v}" for k, v in (key.get("limits") or {}).items() if v is not None)
    metadata = key.get("metadata") or {}
    return {
        **key,
        "models": ",".join(key["models"]) if key.get("models") else "all",
        "limits": limits or None,
        "expires": _when(key.get("expires_at")),
        "last_used": _when(key.get("last_used_at")),
        "metadata": " ".join(f"{k}={v}" for k, v in metadata.items()) or None,
    }


async def _call(args: argparse.Namespace) -> str:
    action = args.keys_action
    path = f"/api/v1/keys/{getattr(args, 'key_id', '')}"
    async with AdminHttp(args) as http:
        if action == "create":
            answer = await http.call("POST", "/api/v1/keys", body=_body(args, True))
        elif action == "list":
            params = [("org_id", args.org)] if args.org else None
            answer = await http.call("GET", "/api/v1/keys", params)
        elif action == "get":
            answer = await http.call("GET", path)
        elif action == "revoke":
            answer = await http.call("DELETE", path)
        elif action == "rotate":
            body = {"grace_seconds": args.grace_seconds}
            answer = await http.call("POST", path + "/rotate", body=body)
        else:
            answer = await http.call("PATCH", path, body=_body(args, False))
    if args.json:
        return to_json(answer)
    if action == "revoke":
        return f"revoked {answer['id']}"
    keys = answer["data"] if action == "list" else [answer]
    if not keys:
        return "(no keys)"
    text = table(KEY_COLUMNS, [_row(k) for k in keys])
    if "key" in answer and action in ("create", "rotate"):
        text += f"\n\nkey: {answer['key']}\n(shown this once: store it now)"
        if answer.get("previous_valid_until"):
            until = _when(answer["previous_valid_until"])
            text += f"\nthe previous secret works until {until} UTC"
    return text


def main(args: argparse.Namespace) -> int:
    print(asyncio.run(_call(args)))
    return 0
