"""Reading what the proxy recorded, through the admin API, and comparing it with what the
upstream reported: spend per key before and after the run, once settled."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from proxy.catalog.pricing import (
    Price,
)
from proxy.tools.loadtest.plan import LoadKey, LoadtestError
from proxy.tools.loadtest.tally import KeyUsage, Tally

_SETTLE_POLL_S = 0.2
_SETTLE_WAIT_S = 10.0
_TEMP_BUDGET: dict[str, Any] = {
    "period": "monthly",
    "limit_kind": "tokens",
    "limit": 10**15,
    "thresholds": [{"pct": 100, "action": "alert"}],
    "owner": "org",
}
"""Alert-only and out of reach: it makes a key's spend readable without changing admission."""


@dataclass(frozen=True)
class SpendReading:
    window: str
    tokens: int
    cost_nano: int


class AdminClient:
    """The few admin calls the load test makes; any unexpected answer is a LoadtestError."""

    def __init__(self, session: aiohttp.ClientSession, url: str, admin_key: str) -> None:
        self._session = session
        self._url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {admin_key}"}

    async def call(self, method: str, path: str, body: Any = None, ok: int = 200) -> Any:
        try:
            async with self._session.request(
                method, self._url + path, json=body, headers=self._headers
            ) as response:
                payload = await response.json(content_type=None)
                status = response.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise LoadtestError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        if status != ok:
            raise LoadtestError(f"{method} {path}: HTTP {status}: {json.dumps(payload)[:300]}")
        return payload

    async def create_keys(self, count: int, org: str | None) -> list[LoadKey]:
        keys = []
        for i in range(count):
            body: dict[str, Any] = {"name": f"loadtest-{i}"}
            if org:
                body["org_id"] = org
            created = await self.call("POST", "/api/v1/keys", body, ok=201)
            keys.append(LoadKey(created["key"], created["id"]))
        return keys

    async def revoke(self, key_id: str) -> None:
        await self.call("DELETE", f"/api/v1/keys/{key_id}")

    async def resolve_ids(self, keys: Sequence[LoadKey], org: str | None) -> list[str | None]:
        """Key ids by the visible key prefix; None where no single active key matches."""
        if all(k.key_id for k in keys):
            return [k.key_id for k in keys]
        listing = await self.call("GET", "/api/v1/keys" + (f"?org_id={org}" if org else ""))
        records = [r for r in listing["data"] if r.get("status") == "active" and r["key_prefix"]]
        ids: list[str | None] = []
        for key in keys:
            if key.key_id:
                ids.append(key.key_id)
                continue
            found = [r["id"] for r in records if key.secret.startswith(r["key_prefix"])]
            ids.append(found[0] if len(found) == 1 else None)
        return ids

    async def spend(self, key_id: str) -> SpendReading | None:
        """The key's spend as its first budget shows it (spend belongs to the key, so any of
        its budgets will do); None if it has no budget."""
        listing = await self.call("GET", f"/api/v1/llm/budgets/apikey/{key_id}")
        if not listing["data"]:
            return None
        spend = listing["data"][0]["spend"]
        return SpendReading(
            spend["window"], int(spend["tokens_spent"]), int(spend["cost_spent_nano"])
        )

    async def add_temporary_budget(self, key_id: str) -> None:
        await self.call("PUT", f"/api/v1/llm/budgets/apikey/{key_id}", _TEMP_BUDGET)

    async def remove_temporary_budget(self, key_id: str) -> None:
        await self.call("DELETE", f"/api/v1/llm/budgets/apikey/{key_id}?owner=org")


class Reconciler:
    """Proxy-recorded spend per key id, read before and after the run."""

    def __init__(self, admin: AdminClient) -> None:
        self.admin = admin
        self.key_ids: list[str] = []
        self.temporary: list[str] = []
        self.before: dict[str, SpendReading] = {}

    async def prepare(self, key_ids: Sequence[str]) -> None:
        self.key_ids = list(dict.fromkeys(key_ids))
        for key_id in self.key_ids:
            if await self.admin.spend(key_id) is None:
                await self.admin.add_temporary_budget(key_id)
                self.temporary.append(key_id)
        self.before = await self.read()

    async def read(self) -> dict[str, SpendReading]:
        readings = {}
        for key_id in self.key_ids:
            found = await self.admin.spend(key_id)
            if found is None:
                raise LoadtestError(f"the budget of key {key_id} disappeared during the run")
            readings[key_id] = found
        return readings

    async def settled(self) -> dict[str, SpendReading]:
        """Streams end for the client a moment before the proxy settles: wait until stable."""
        deadline = time.monotonic() + _SETTLE_WAIT_S
        last = await self.read()
        while time.monotonic() < deadline:
            await asyncio.sleep(_SETTLE_POLL_S)
            current = await self.read()
            if current == last:
                return current
            last = current
        return last

    async def cleanup(self) -> None:
        for key_id in self.temporary:
            with contextlib.suppress(LoadtestError):
                await self.admin.remove_temporary_budget(key_id)


def reconcile(
    tally: Tally,
    key_ids: Sequence[str | None],
    before: dict[str, SpendReading],
    after: dict[str, SpendReading],
    price: Price | None,
) -> dict[str, Any]:
    upstream = KeyUsage()
    unresolved = 0
    for usage, key_id in zip(tally.per_key, key_ids, strict=True):
        if key_id is None:
            unresolved += usage.requests
        else:
            upstream.add(usage)
    rolled = sorted(k for k in before if before[k].window != after[k].window)
    proxy_tokens = sum(after[k].tokens - before[k].tokens for k in before)
    proxy_cost = sum(after[k].cost_nano - before[k].cost_nano for k in before)
    tokens_match = proxy_tokens == upstream.tokens
    cost_match = price is not None and proxy_cost == upstream.cost_nano
    result: dict[str, Any] = {
        "keys": len(before),
        "upstream": {
            "prompt_tokens": upstream.prompt_tokens,
            "completion_tokens": upstream.completion_tokens,
            "tokens": upstream.tokens,
            "cost_nano": upstream.cost_nano if price is not None else None,
        },
        "proxy": {"tokens": proxy_tokens, "cost_nano": proxy_cost},
        "tokens_match": tokens_match,
        "cost_match": cost_match if price is not None else None,
        "notes": [],
    }
    notes: list[str] = result["notes"]
    if price is None:
        notes.append("no price known for the model (give --price): cost not compared")
    if unresolved:
        notes.append(f"{unresolved} successful requests used keys whose id could not be found")
    if tally.usage_missing:
        notes.append(f"{tally.usage_missing} successful responses carried no usage")
    if tally.transport_errors:
        notes.append("requests that failed on the client side may have been charged")
    if rolled:
        notes.append(f"spend window rolled over during the run for {len(rolled)} key(s)")
        result["status"] = "not comparable"
    else:
        agreed = tokens_match and (price is None or cost_match)
        result["status"] = "match" if agreed else "mismatch"
    return result


# --- report ---------------------------------------------------------------------------------------
