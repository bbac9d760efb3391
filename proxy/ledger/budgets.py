"""Budgets: policies over the spend that every request adds to its key's and org's windows
(and its end user's, where the org budgets or limits its end users).

A budget is stored as one JSON value in its org's ``budgets`` hash, under the field
``k:<key id>:<owner>``, ``o:<owner>``, ``u:<end-user hex>:<owner>`` or ``ud:<owner>`` (the
org's default for each end user, which has no spend of its own: it judges each end user's).
Besides the contract's fields it carries what the Lua scripts compare against, precomputed here
in exact decimal arithmetic: each threshold's line and the block line, as integers in the
budget's unit (nano-units for cost, tokens for tokens).

Its webhook secret is sealed (``webhook_secret_sealed``, see ``proxy.store.secret_box``) when
``PROXY_SECRET_KEY`` is set, else kept in ``webhook_secret`` as before. The scripts copy the
budget's JSON into each queued delivery, so deliveries carry the secret as the budget does.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal, Protocol

from proxy.ledger.keys import Scope, budget_field, events_tag, org_key, org_prefix, spend_tag
from proxy.ledger.scripts import HASH_SWAP, PUT_BUDGET
from proxy.ledger.windows import Period, Windows, iso_millis
from proxy.store.client import Redis
from proxy.store.secret_box import SecretBox, open_sealed

log = logging.getLogger(__name__)

NANO = 1_000_000_000
END_USER_SCOPES = ("external_user", "external_user_default")
Owner = Literal["cluster", "org"]
OWNERS: tuple[Owner, ...] = ("cluster", "org")
SEALED = "webhook_secret_sealed"


# Lines are compared by Lua scripts, whose numbers are doubles: every line must be an integer
# a double holds exactly. A cost line of 2**53 - 1 nano-units is 9,007,199.25 currency units.
MAX_LINE = 2**53 - 1
# Scripts write a threshold's pct into events with cjson (14 significant digits).
MAX_PCT = 1_000_000_000
# The smallest limit: one nano-unit (cost) or a billionth of a token. Lines are whole units, so
# a smaller limit has no line of its own, and spend / limit would overflow the gauge's pct.
MIN_LIMIT = Decimal("0.000000001")


class ThresholdSpec(Protocol):
    """One threshold of a budget to store (the API's ``Threshold`` is one)."""

    @property
    def pct(self) -> int: ...
    @property
    def action(self) -> Literal["alert", "block"]: ...


class BudgetSpec(Protocol):
    """A budget to store, as validated by the API (its ``BudgetInput`` is one): the limit a
    number whose lines fit ``MAX_LINE``, at least one threshold."""

    @property
    def period(self) -> Period: ...
    @property
    def limit_kind(self) -> Literal["cost", "tokens"]: ...
    @property
    def limit(self) -> int | float: ...
    @property
    def thresholds(self) -> Sequence[ThresholdSpec]: ...
    @property
    def owner(self) -> Owner: ...
    @property
    def webhook_url(self) -> str | None: ...
    @property
    def webhook_secret(self) -> str | None: ...
    @property
    def clamp(self) -> bool: ...


def _unit_amount(limit: float | int, kind: str) -> Decimal:
    amount = Decimal(str(limit))
    return amount * NANO if kind == "cost" else amount


def stored_budget(
    spec: BudgetSpec, scope: Scope, scope_id: str, now_iso: str, box: SecretBox | None = None
) -> dict[str, Any]:
    """The JSON kept in Redis; the id is filled in by ``budget_put.lua``."""
    amount = _unit_amount(spec.limit, spec.limit_kind)
    lines = [
        {"pct": t.pct, "action": t.action, "at": math.ceil(amount * t.pct / 100)}
        for t in spec.thresholds
    ]
    stored: dict[str, Any] = {
        "id": "__BUDGET_ID__",
        "scope": scope,
        "scope_id": scope_id,
        "owner": spec.owner,
        "period": spec.period,
        "limit_kind": spec.limit_kind,
        "limit": spec.limit,
        "thresholds": [{"pct": t.pct, "action": t.action} for t in spec.thresholds],
        "alert_webhook_url": spec.webhook_url,
        "webhook_secret": spec.webhook_secret if box is None else None,
        "unit": "c" if spec.limit_kind == "cost" else "t",
        "lines": lines,
        "limit_str": format(Decimal(str(spec.limit)), "f"),
        "clamp": spec.clamp,
        "updated_at": now_iso,
    }
    if box is not None and spec.webhook_secret is not None:
        stored[SEALED] = box.seal(spec.webhook_secret)
    blocks = [t.pct for t in spec.thresholds if t.action == "block"]
    if blocks:
        line = amount * min(blocks) / 100
        stored["block_floor"] = math.floor(line)
        stored["block_ceil"] = math.ceil(line)
    return stored


def webhook_secret(budget: dict[str, Any], box: SecretBox | None) -> str | None:
    """The secret that signs the budget's deliveries; SecretUnavailable when it is sealed
    and cannot be opened (no key, another key, altered)."""
    sealed = budget.get(SEALED)
    if sealed:
        return open_sealed(box, sealed)
    plain = budget.get("webhook_secret")
    return plain if isinstance(plain, str) and plain else None


def seal_stored(raw: str, box: SecretBox) -> str | None:
    """A stored budget's JSON with its plain-text secret sealed; None when there is none."""
    budget = json.loads(raw)
    plain = budget.get("webhook_secret")
    if not isinstance(plain, str) or not plain:
        return None
    budget["webhook_secret"] = None
    budget[SEALED] = box.seal(plain)
    return json.dumps(budget, separators=(",", ":"))


def rule(stored: dict[str, Any]) -> str:
    """What the request-path scripts need of a budget, without decoding its JSON:
    ``"<period> <unit> <block floor|-> <block ceil|-> <lowest line>[ clamp]"``."""
    lowest = min(line["at"] for line in stored["lines"])
    floor = stored.get("block_floor", "-")
    ceil = stored.get("block_ceil", "-")
    clamp = " clamp" if stored.get("clamp") else ""
    return f"{stored['period']} {stored['unit']} {floor} {ceil} {lowest}{clamp}"


@dataclass(frozen=True)
class Spend:
    cost_nano: int
    tokens: int


@dataclass(frozen=True)
class BudgetRecord:
    """A stored budget (its JSON, as ``stored_budget`` made it) and, unless it is the default
    for each end user, the settled spend of its current window."""

    budget: dict[str, Any]
    window: str = ""
    window_end: float = 0.0
    spend: Spend | None = None


class BudgetStore:
    def __init__(self, redis: Redis, box: SecretBox | None = None) -> None:
        self._redis = redis
        self.box = box

    def webhook_secret(self, budget: dict[str, Any]) -> str | None:
        return webhook_secret(budget, self.box)

    async def seal_stored_secrets(self, orgs: list[str]) -> int:
        """Seals the plain-text webhook secrets written before a key was set: in the budgets
        and in the deliveries already queued (each carries its budget's JSON). Each rewrite is
        a compare-and-set, so a budget changed meanwhile is left as its writer made it."""
        if self.box is None:
            return 0
        sealed = 0
        for org_id in orgs:
            budgets = org_key(org_id, "budgets")
            for field, raw in (await self._redis.hgetall(budgets)).items():
                sealed += await self._swap(budgets, field, raw)
            pipe = self._redis.pipeline(transaction=False)
            pipe.zrange(org_key(org_id, "outbox"), 0, -1)
            pipe.zrange(org_key(org_id, "whlog"), 0, -1)
            ids = {event_id for listing in await pipe.execute() for event_id in listing}
            for event_id in ids:
                record = org_key(org_id, "delivery", event_id)
                held = await self._redis.hget(record, "budget")
                if held:
                    sealed += await self._swap(record, "budget", held)
        return sealed

    async def _swap(self, key: str, field: str, raw: str) -> int:
        assert self.box is not None
        try:
            new = seal_stored(raw, self.box)
        except ValueError:
            log.warning("%s %s: not JSON; left as it is", key, field)
            return 0
        if new is None:
            return 0
        return int(await HASH_SWAP(self._redis, [key], [field, raw, new]))

    async def put(
        self,
        org_id: str,
        scope: Scope,
        scope_id: str,
        spec: BudgetSpec,
        windows: Windows,
        now: float,
    ) -> BudgetRecord:
        stored = stored_budget(spec, scope, scope_id, iso_millis(now), self.box)
        await PUT_BUDGET(
            self._redis,
            [org_prefix(org_id)],
            [
                budget_field(scope, scope_id, spec.owner),
                json.dumps(stored, separators=(",", ":")),
                "bud_" + secrets.token_hex(8),
                spend_tag(scope, scope_id),
                windows.of(spec.period),
                windows.ttl(spec.period, now),
                int(now * 1000),
                iso_millis(now),
                "put" + secrets.token_hex(6),
                rule(stored),
                scope_id if scope == "external_user" else "",
            ],
        )
        found = await self.get(org_id, scope, scope_id, spec.owner, windows)
        assert found is not None
        return found

    async def get(
        self, org_id: str, scope: Scope, scope_id: str, owner: str, windows: Windows
    ) -> BudgetRecord | None:
        raw = await self._redis.hget(
            org_key(org_id, "budgets"), budget_field(scope, scope_id, owner)
        )
        if raw is None:
            return None
        return (await self._with_spend(org_id, [json.loads(raw)], windows))[0]

    async def list_budgets(
        self, org_id: str, windows: Windows, scope: Scope | None = None, scope_id: str = ""
    ) -> list[BudgetRecord]:
        """Budgets of an org: all of them, or those of one scope (the org, one key, one end
        user, or the default for each end user)."""
        raw = await self._redis.hgetall(org_key(org_id, "budgets"))
        budgets = [json.loads(value) for _, value in sorted(raw.items())]
        if scope is not None:
            budgets = [
                b
                for b in budgets
                if b["scope"] == scope
                and (scope in ("org", "external_user_default") or b["scope_id"] == scope_id)
            ]
        return await self._with_spend(org_id, budgets, windows)

    async def _with_spend(
        self, org_id: str, budgets: list[dict[str, Any]], windows: Windows
    ) -> list[BudgetRecord]:
        pipe = self._redis.pipeline(transaction=False)
        gauged = [b for b in budgets if spend_tag(b["scope"], b["scope_id"])]
        for b in gauged:
            tag = spend_tag(b["scope"], b["scope_id"])
            pipe.hmget(org_key(org_id, "spend", tag, windows.of(b["period"])), "c", "t")
        spends = dict(zip((id(b) for b in gauged), await pipe.execute(), strict=True))
        records = []
        for b in budgets:
            record = BudgetRecord(b)
            if id(b) in spends:
                c, t = spends[id(b)]
                period = b["period"]
                spend = Spend(int(c or 0), int(t or 0))
                record = BudgetRecord(b, windows.of(period), windows.end(period), spend)
            records.append(record)
        return records

    async def delete(self, org_id: str, scope: Scope, scope_id: str, owner: str) -> bool:
        """Enforcement and alerts stop; a budget created later gets a new id."""
        name = budget_field(scope, scope_id, owner)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hdel(org_key(org_id, "budgets"), name)
        pipe.hdel(org_key(org_id, "budget_rules"), name)
        pipe.hdel(org_key(org_id, "budget_ids"), name)
        removed, _, _ = await pipe.execute()
        return bool(removed)

    async def events(
        self, org_id: str, scope: Scope, scope_id: str, limit: int
    ) -> list[dict[str, Any]]:
        key = org_key(org_id, "events", events_tag(scope, scope_id))
        return [json.loads(e) for e in await self._redis.lrange(key, 0, limit - 1)]

    async def spend(self, org_id: str, scope: Scope, scope_id: str, window: str) -> Spend:
        c, t = await self._redis.hmget(
            org_key(org_id, "spend", spend_tag(scope, scope_id), window), "c", "t"
        )
        return Spend(int(c or 0), int(t or 0))
