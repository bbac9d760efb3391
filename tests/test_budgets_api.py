"""The budget API (``/api/v1/llm/budgets``) against its contract (spec/budgets-api.md):
shapes field by field, validation, permissions, the live spend gauge and budget events.

Time is a FakeClock fixed at noon of Tuesday 2026-11-24 (UTC), so window ids are known and
no window ends during a test.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NamedTuple

import pytest
import redis.asyncio as aioredis
from conftest import FakeClock, Proxy
from helpers import metered_chat, user_messages

from proxy.ledger.windows import windows_at

BASE = "/api/v1/llm/budgets"
NANO = 1_000_000_000
NOON = datetime(2026, 11, 24, 12, 0, tzinfo=UTC).timestamp()
DAY, WEEK, MONTH = "2026-11-24", "2026-W48", "2026-11"
MESSAGES = user_messages("say something nice about budgets")
BUDGET_FIELDS = {
    "id",
    "scope",
    "scope_id",
    "owner",
    "period",
    "limit_kind",
    "limit",
    "thresholds",
    "alert_webhook_url",
    "clamp",
    "spend",
}
SPEND_FIELDS = {
    "window",
    "cost_spent_nano",
    "cost_spent",
    "tokens_spent",
    "pct",
    "status",
    "reset_at",
}
EVENT_FIELDS = {
    "id",
    "budget_id",
    "type",
    "pct",
    "period_key",
    "spend_snapshot",
    "limit_snapshot",
    "created_at",
}
ERROR_FIELDS = {"message", "type", "code", "param"}
SEED = {
    "period": "weekly",
    "limit_kind": "tokens",
    "limit": 3281.35,
    "thresholds": [{"pct": 793338, "action": "alert"}],
}


class Key(NamedTuple):
    id: str
    secret: str


@dataclass
class World:
    """Two orgs: acme (admin, two members) and globex (admin, member)."""

    proxy: Proxy
    acme_admin: Key
    acme_member: Key
    acme_other: Key
    globex_admin: Key
    globex_member: Key


def budget(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "period": "daily",
        "limit_kind": "tokens",
        "limit": 1000,
        "thresholds": [{"pct": 80, "action": "alert"}, {"pct": 100, "action": "block"}],
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not ...}


def assert_error(body: Any, type_: str | None = None, param: Any = ...) -> dict[str, Any]:
    """OpenAI-shaped: exactly {"error": {message, type, code, param}}."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == ERROR_FIELDS, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if type_ is not None:
        assert error["type"] == type_, error
    if param is not ...:
        assert error["param"] == param, error
    return error


def assert_budget_shape(b: dict[str, Any]) -> None:
    assert set(b) == BUDGET_FIELDS, b
    assert isinstance(b["id"], str) and b["id"].startswith("bud_") and len(b["id"]) > 4
    assert b["scope"] in ("org", "apikey")
    assert b["owner"] in ("cluster", "org")
    assert b["period"] in ("daily", "weekly", "monthly")
    assert b["limit_kind"] in ("cost", "tokens")
    spend = b["spend"]
    assert set(spend) == SPEND_FIELDS, spend
    assert isinstance(spend["cost_spent_nano"], str) and spend["cost_spent_nano"].isdigit()
    assert isinstance(spend["tokens_spent"], str) and spend["tokens_spent"].isdigit()
    for number in ("cost_spent", "pct"):
        assert isinstance(spend[number], int | float) and not isinstance(spend[number], bool)
    assert spend["status"] in ("ok", "blocked")
    reset = datetime.fromisoformat(spend["reset_at"])
    assert reset.utcoffset() is not None and reset.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert spend["reset_at"].endswith("Z") and isinstance(b["clamp"], bool)


def assert_event_shape(e: dict[str, Any]) -> None:
    assert set(e) == EVENT_FIELDS, e
    assert isinstance(e["id"], str) and e["id"]
    assert e["type"] in ("threshold_alert", "blocked")
    assert e["pct"] is None or isinstance(e["pct"], int | float)
    Decimal(e["spend_snapshot"])  # decimal strings
    Decimal(e["limit_snapshot"])
    assert isinstance(e["spend_snapshot"], str) and isinstance(e["limit_snapshot"], str)
    created = datetime.fromisoformat(e["created_at"])
    assert created.utcoffset() is not None and created.utcoffset().total_seconds() == 0  # type: ignore[union-attr]


async def call(
    proxy: Proxy, method: str, path: str, body: Any = None, key: Key | str | None = None
) -> tuple[int, Any]:
    secret = key.secret if isinstance(key, Key) else key
    return await proxy.admin(method, BASE + path, body, secret)


async def raw(proxy: Proxy, method: str, path: str, data: bytes, key: str) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with proxy.session.request(
        method, proxy.url + BASE + path, data=data, headers=headers
    ) as response:
        return response.status, await response.text()


async def chat(proxy: Proxy, key: Key, max_tokens: int = 100) -> int:
    """One admitted request that uses exactly ``prompt + max_tokens`` tokens; returns them."""
    return await metered_chat(proxy.openai(key.secret), "gpt-4o", MESSAGES, max_tokens)


@pytest.fixture
async def world(start_proxy: Callable[..., Any]) -> World:
    proxy: Proxy = await start_proxy(clock=FakeClock(NOON))
    keys = [
        Key(*await proxy.create_key("acme", role="org_admin")),
        Key(*await proxy.create_key("acme")),
        Key(*await proxy.create_key("acme")),
        Key(*await proxy.create_key("globex", role="org_admin")),
        Key(*await proxy.create_key("globex")),
    ]
    return World(proxy, *keys)


async def redis_spend(store: aioredis.Redis, org: str, tag: str, window: str) -> tuple[int, int]:
    c, t = await store.hmget(f"bp:{{o:{org}}}:spend:{tag}:{window}", "c", "t")
    return int(c or 0), int(t or 0)


# --- shapes -----------------------------------------------------------------------------


async def test_seed_example_is_accepted_and_returned_field_by_field(world: World) -> None:
    p, kid = world.proxy, world.acme_member.id
    status, b = await call(p, "PUT", f"/apikey/{kid}", SEED)
    assert status == 200, b
    assert_budget_shape(b)
    assert b["scope"] == "apikey" and b["scope_id"] == kid
    assert b["owner"] == "org"  # the default
    assert (b["period"], b["limit_kind"]) == ("weekly", "tokens")
    assert b["limit"] == 3281.35  # exactly as given, not rounded to whole tokens
    assert b["thresholds"] == [{"pct": 793338, "action": "alert"}]
    assert b["alert_webhook_url"] is None
    assert b["spend"] == {
        "window": WEEK,
        "cost_spent_nano": "0",
        "cost_spent": 0,
        "tokens_spent": "0",
        "pct": 0,
        "status": "ok",
        "reset_at": "2026-11-30T00:00:00Z",  # Monday 00:00 UTC: ISO week 49 begins
    }
    # GET returns the same budget in a BudgetList.
    status, listing = await call(p, "GET", f"/apikey/{kid}")
    assert status == 200
    assert listing == {"object": "list", "data": [b]}


async def test_org_budget_both_owners_and_limits_returned_as_given(world: World) -> None:
    p = world.proxy
    status, own = await call(
        p,
        "PUT",
        "/org/acme",
        budget(
            period="monthly",
            limit_kind="cost",
            limit=12.5,
            webhook_url="https://hooks.example.com/budget?x=1",
        ),
    )
    assert status == 200, own
    assert_budget_shape(own)
    assert (own["scope"], own["scope_id"], own["owner"]) == ("org", "acme", "org")
    assert (own["period"], own["limit_kind"], own["limit"]) == ("monthly", "cost", 12.5)
    assert own["alert_webhook_url"] == "https://hooks.example.com/budget?x=1"
    assert own["spend"]["window"] == MONTH
    status, ceiling = await call(
        p, "PUT", "/org/acme", budget(owner="cluster", period="weekly", limit=5000)
    )
    assert status == 200, ceiling
    assert ceiling["owner"] == "cluster" and ceiling["id"] != own["id"]
    assert type(ceiling["limit"]) is int and ceiling["limit"] == 5000
    assert ceiling["spend"]["window"] == WEEK
    status, listing = await call(p, "GET", "/org/acme")
    assert status == 200 and listing["object"] == "list"
    assert sorted(listing["data"], key=lambda b: b["owner"]) == [ceiling, own]
    # Org budgets are not apikey budgets, and another org has none.
    assert (await call(p, "GET", f"/apikey/{world.acme_member.id}"))[1]["data"] == []
    assert await call(p, "GET", "/org/globex") == (200, {"object": "list", "data": []})


async def test_id_is_stable_across_edits_and_delete_removes_only_that_owner(world: World) -> None:
    p, kid = world.proxy, world.acme_member.id
    _, first = await call(p, "PUT", f"/apikey/{kid}", budget(webhook_url="http://h.example/x"))
    _, ceiling = await call(p, "PUT", f"/apikey/{kid}", budget(owner="cluster"))
    status, edited = await call(
        p,
        "PUT",
        f"/apikey/{kid}",
        budget(
            period="monthly",
            limit_kind="cost",
            limit=0.25,
            thresholds=[{"pct": 150, "action": "block"}],
        ),
    )
    assert status == 200
    assert edited["id"] == first["id"]
    # PUT replaces: everything comes from the new body (the webhook is gone).
    assert (edited["period"], edited["limit_kind"], edited["limit"]) == ("monthly", "cost", 0.25)
    assert edited["thresholds"] == [{"pct": 150, "action": "block"}]
    assert edited["alert_webhook_url"] is None
    assert edited["spend"]["window"] == MONTH

    status, deleted = await call(p, "DELETE", f"/apikey/{kid}?owner=org")
    assert status == 200
    assert deleted == {"scope": "apikey", "scope_id": kid, "owner": "org", "deleted": True}
    status, listing = await call(p, "GET", f"/apikey/{kid}")
    assert status == 200 and listing["data"] == [ceiling]
    status, again = await call(p, "DELETE", f"/apikey/{kid}?owner=org")
    assert status == 404
    assert_error(again)
    # No ?owner means owner org, like the PUT default.
    status, body = await call(p, "DELETE", f"/apikey/{kid}")
    assert status == 404
    assert_error(body)
    status, deleted = await call(p, "DELETE", f"/apikey/{kid}?owner=cluster")
    assert status == 200 and deleted["owner"] == "cluster"
    assert (await call(p, "GET", f"/apikey/{kid}"))[1]["data"] == []

    await call(p, "PUT", "/org/acme", budget())
    status, deleted = await call(p, "DELETE", "/org/acme")
    assert status == 200
    assert deleted == {"scope": "org", "scope_id": "acme", "owner": "org", "deleted": True}
    assert (await call(p, "GET", "/org/acme"))[1]["data"] == []
    assert (await call(p, "DELETE", "/org/acme?owner=org"))[0] == 404


async def test_list_endpoint_lists_budgets_with_live_spend(world: World) -> None:
    p = world.proxy
    _, a = await call(p, "PUT", "/org/acme", budget())
    _, b = await call(p, "PUT", f"/apikey/{world.acme_member.id}", budget(owner="cluster"))
    _, c = await call(p, "PUT", "/org/globex", budget(period="weekly"))
    status, listing = await call(p, "GET", "")
    assert status == 200 and listing["object"] == "list"
    by_id = {x["id"]: x for x in listing["data"]}
    assert by_id == {a["id"]: a, b["id"]: b, c["id"]: c}
    for x in listing["data"]:
        assert_budget_shape(x)


async def test_webhook_secret_is_stored_but_never_returned(
    world: World, store: aioredis.Redis
) -> None:
    p, member = world.proxy, world.acme_member
    secret = "whsec-never-shown-7f3a"
    spec = budget(
        limit=100,
        thresholds=[{"pct": 1, "action": "alert"}],
        webhook_url="http://127.0.0.1:9/hook",
        webhook_secret=secret,
    )
    status, put_text = await raw(
        p, "PUT", f"/apikey/{member.id}", json.dumps(spec).encode(), p.admin_key
    )
    assert status == 200
    assert json.loads(put_text)["alert_webhook_url"] == "http://127.0.0.1:9/hook"
    _, org_text = await raw(p, "PUT", "/org/acme", json.dumps(spec).encode(), p.admin_key)
    # Stored (deliveries need it to sign) ...
    stored = await store.hget("bp:{o:acme}:budgets", f"k:{member.id}:org")
    assert stored is not None and secret in stored
    # ... and a crossing records events for both budgets.
    await chat(p, member, max_tokens=5)
    texts = [put_text, org_text]
    for path in (
        "",
        "/org/acme",
        f"/apikey/{member.id}",
        "/org/acme/events",
        f"/apikey/{member.id}/events",
    ):
        for key in (p.admin_key, world.acme_admin.secret):
            status, text = await raw(p, "GET", path, b"", key)
            assert status == 200, (path, text)
            texts.append(text)
    status, text = await raw(p, "GET", f"/apikey/{member.id}", b"", member.secret)
    assert status == 200
    texts.append(text)
    assert len(json.loads(texts[-3])["data"]) == 1  # the apikey events are there
    for text in texts:
        assert secret not in text
        assert "webhook_secret" not in text


# --- validation -------------------------------------------------------------------------


INVALID: list[Any] = [
    pytest.param(budget(period=...), "period", id="missing-period"),
    pytest.param(budget(limit_kind=...), "limit_kind", id="missing-limit_kind"),
    pytest.param(budget(limit=...), "limit", id="missing-limit"),
    pytest.param(budget(thresholds=...), "thresholds", id="missing-thresholds"),
    pytest.param(budget(period="hourly"), "period", id="period-enum"),
    pytest.param(budget(period="Daily"), "period", id="period-case"),
    pytest.param(budget(limit_kind="requests"), "limit_kind", id="limit_kind-enum"),
    pytest.param(budget(limit=0), "limit", id="limit-zero"),
    pytest.param(budget(limit=0.0), "limit", id="limit-zero-float"),
    pytest.param(budget(limit=-5), "limit", id="limit-negative"),
    pytest.param(budget(limit="10"), "limit", id="limit-string"),
    pytest.param(budget(limit=True), "limit", id="limit-bool"),
    pytest.param(budget(limit=None), "limit", id="limit-null"),
    pytest.param(
        json.dumps(budget(limit=7)).replace("7", "1e400").encode(), "limit", id="limit-1e400"
    ),
    pytest.param(
        json.dumps(budget(limit=7)).replace("7", "-1e400").encode(), "limit", id="limit--1e400"
    ),
    pytest.param(json.dumps(budget(limit=7)).replace("7", "NaN").encode(), "limit", id="limit-NaN"),
    # Issue 11 items 2 and 3: an OverflowError (500), or lines a Lua number cannot hold exactly.
    pytest.param(budget(limit=10**400), "limit", id="limit-1-and-400-zeros"),
    pytest.param(budget(limit=2**53), "limit", id="tokens-limit-2**53"),
    pytest.param(budget(limit_kind="cost", limit=9_007_200), "limit", id="cost-limit-past-2**53"),
    pytest.param(
        budget(limit_kind="cost", limit=9_000_000, thresholds=[{"pct": 101, "action": "block"}]),
        "thresholds",
        id="cost-line-past-2**53",
    ),
    pytest.param(
        budget(thresholds=[{"pct": 10**9 + 1, "action": "alert"}]),
        "thresholds.0.pct",
        id="pct-past-1e9",
    ),
    pytest.param(budget(thresholds=[]), "thresholds", id="thresholds-empty"),
    pytest.param(budget(thresholds={"pct": 80, "action": "alert"}), "thresholds", id="thr-obj"),
    pytest.param(
        budget(thresholds=[{"pct": 0, "action": "alert"}]), "thresholds.0.pct", id="pct-zero"
    ),
    pytest.param(
        budget(thresholds=[{"pct": -10, "action": "block"}]), "thresholds.0.pct", id="pct-neg"
    ),
    pytest.param(
        budget(thresholds=[{"pct": 80.5, "action": "alert"}]), "thresholds.0.pct", id="pct-float"
    ),
    pytest.param(
        budget(thresholds=[{"pct": "80", "action": "alert"}]), "thresholds.0.pct", id="pct-str"
    ),
    pytest.param(
        budget(thresholds=[{"pct": True, "action": "alert"}]), "thresholds.0.pct", id="pct-bool"
    ),
    pytest.param(budget(thresholds=[{"action": "alert"}]), "thresholds.0.pct", id="pct-missing"),
    pytest.param(
        budget(thresholds=[{"pct": 80, "action": "alert"}, {"pct": 100, "action": "stop"}]),
        "thresholds.1.action",
        id="action-enum",
    ),
    pytest.param(budget(thresholds=[{"pct": 80}]), "thresholds.0.action", id="action-missing"),
    pytest.param(
        budget(thresholds=[{"pct": 80, "action": "alert", "notify": True}]),
        "thresholds.0.notify",
        id="threshold-unknown-field",
    ),
    # Below one nano-unit a limit has no line of its own (lines are whole nano-units or
    # tokens), and its gauge's pct overflowed to Infinity, which is not JSON (schemathesis).
    pytest.param(budget(limit=5e-324), "limit", id="limit-subnormal"),
    pytest.param(budget(limit_kind="cost", limit=1e-10), "limit", id="limit-below-one-nano"),
    pytest.param(budget(currency="USD"), "currency", id="unknown-field"),
    pytest.param(budget(alert_webhook_url="https://x.example"), "alert_webhook_url", id="resp-f"),
    pytest.param(budget(webhook_url="/hooks/budget"), "webhook_url", id="webhook-relative"),
    pytest.param(budget(webhook_url="ftp://x.example/h"), "webhook_url", id="webhook-ftp"),
    pytest.param(budget(webhook_url="https://"), "webhook_url", id="webhook-no-host"),
    pytest.param(budget(webhook_url=42), "webhook_url", id="webhook-not-string"),
    pytest.param(budget(webhook_secret=""), "webhook_secret", id="secret-empty"),
    pytest.param(budget(webhook_secret=123), "webhook_secret", id="secret-not-string"),
    pytest.param(budget(owner="admin"), "owner", id="owner-enum"),
    pytest.param(budget(owner=None), "owner", id="owner-null"),
    pytest.param(b'{"period": "daily", "limit_kind": ', None, id="malformed-json"),
    pytest.param(b"[1, 2]", None, id="not-an-object"),
    pytest.param(b"", None, id="empty-body"),
]


@pytest.mark.parametrize("scope", ["apikey", "org"])
@pytest.mark.parametrize(("body", "param"), INVALID)
async def test_invalid_input_is_400_naming_the_field_and_stores_nothing(
    world: World, store: aioredis.Redis, scope: str, body: Any, param: str | None
) -> None:
    p = world.proxy
    path = f"/apikey/{world.acme_member.id}" if scope == "apikey" else "/org/acme"
    _, before = await call(p, "PUT", path, budget(limit=777))
    stored_before = await store.hgetall("bp:{o:acme}:budgets")
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, text = await raw(p, "PUT", path, data, p.admin_key)
    assert status == 400, text
    assert_error(json.loads(text), "invalid_request_error", param)
    # Nothing stored: the existing budget is untouched, and no other owner appeared.
    assert await call(p, "GET", path) == (200, {"object": "list", "data": [before]})
    assert await store.hgetall("bp:{o:acme}:budgets") == stored_before


@pytest.mark.parametrize(
    ("kinds", "value"),
    [
        pytest.param(("cost", "tokens"), 0.000000001, id="one-nano"),
        pytest.param(("cost", "tokens"), 7, id="int"),
        pytest.param(("cost", "tokens"), 99.99, id="cents"),
        # The largest lines a Lua number holds exactly: 2**53 - 1 nano-units, or tokens.
        pytest.param(("cost",), 9_007_199.254740991, id="largest-cost"),
        pytest.param(("tokens",), 2**53 - 1, id="largest-tokens"),
    ],
)
async def test_any_finite_positive_limit_up_to_2_to_53_is_accepted(
    world: World, store: aioredis.Redis, kinds: tuple[str, ...], value: float
) -> None:
    for kind in kinds:
        status, b = await call(
            world.proxy, "PUT", "/org/acme", budget(limit_kind=kind, limit=value)
        )
        assert status == 200, b
        assert b["limit"] == value and type(b["limit"]) is type(value)
        assert b["spend"]["status"] == "ok"
        stored = json.loads(await store.hget("bp:{o:acme}:budgets", "o:org"))
        assert all(isinstance(line["at"], int) for line in stored["lines"])
        assert max(line["at"] for line in stored["lines"]) <= 2**53 - 1


async def test_optional_fields_accept_null(world: World) -> None:
    status, b = await call(
        world.proxy, "PUT", "/org/acme", budget(webhook_url=None, webhook_secret=None, owner="org")
    )
    assert status == 200, b
    assert b["alert_webhook_url"] is None


@pytest.mark.parametrize("scope", ["apikey", "org"])
async def test_delete_with_a_bad_owner_is_400_and_deletes_nothing(world: World, scope: str) -> None:
    p = world.proxy
    path = f"/apikey/{world.acme_member.id}" if scope == "apikey" else "/org/acme"
    _, before = await call(p, "PUT", path, budget())
    for owner in ("admin", "ORG", ""):
        status, body = await call(p, "DELETE", f"{path}?owner={owner}")
        assert status == 400, (owner, body)
        assert_error(body, "invalid_request_error", "owner")
    assert await call(p, "GET", path) == (200, {"object": "list", "data": [before]})


async def test_unknown_ids_are_404(world: World) -> None:
    p = world.proxy
    for method, path, body in (
        ("GET", "/apikey/key_doesnotexist", None),
        ("PUT", "/apikey/key_doesnotexist", budget()),
        ("DELETE", "/apikey/key_doesnotexist", None),
        ("GET", "/apikey/key_doesnotexist/events", None),
        ("GET", "/org/no-such-org", None),
        ("PUT", "/org/no-such-org", budget()),
        ("DELETE", "/org/no-such-org", None),
        ("GET", "/org/no-such-org/events", None),
    ):
        status, error = await call(p, method, path, body)
        assert status == 404, (method, path, error)
        assert_error(error)
    # Nothing was created for them.
    assert (await call(p, "GET", ""))[1]["data"] == []


async def test_wrong_method_and_missing_key(world: World) -> None:
    p = world.proxy
    status, body = await call(p, "POST", "/org/acme", budget())
    assert status == 405
    assert_error(body)
    async with p.session.get(p.url + BASE + "/org/acme") as response:
        assert response.status == 401
        assert_error(await response.json(), "authentication_error")
    status, body = await call(p, "GET", "/org/acme", key="sk-bp-not-a-key")
    assert status == 401
    assert_error(body, "authentication_error")


# --- permissions ------------------------------------------------------------------------


async def test_cluster_admin_manages_every_budget_both_owners(world: World) -> None:
    p = world.proxy
    _, other_admin = await p.create_key("ops", role="cluster_admin")
    for key in (p.admin_key, other_admin):
        for path in ("/org/acme", f"/apikey/{world.globex_member.id}", "/org/globex"):
            for owner in ("org", "cluster"):
                status, b = await call(p, "PUT", path, budget(owner=owner), key=key)
                assert status == 200, (path, owner, b)
                assert (await call(p, "GET", path, key=key))[0] == 200
                assert (await call(p, "GET", path + "/events", key=key))[0] == 200
                status, _ = await call(p, "DELETE", f"{path}?owner={owner}", key=key)
                assert status == 200


async def test_org_admin_writes_owner_org_for_its_org_and_keys_only(world: World) -> None:
    p, admin = world.proxy, world.acme_admin
    for path in ("/org/acme", f"/apikey/{world.acme_member.id}", f"/apikey/{admin.id}"):
        # The operator's ceiling: readable, not writable.
        _, ceiling = await call(p, "PUT", path, budget(owner="cluster", limit=5))
        status, own = await call(p, "PUT", path, budget(limit=50), key=admin)
        assert status == 200, own
        assert own["owner"] == "org"
        status, body = await call(p, "PUT", path, budget(owner="cluster", limit=1), key=admin)
        assert status == 403, body
        assert_error(body, "permission_error")
        status, body = await call(p, "DELETE", f"{path}?owner=cluster", key=admin)
        assert status == 403, body
        assert_error(body, "permission_error")
        status, listing = await call(p, "GET", path, key=admin)
        assert status == 200
        assert sorted(listing["data"], key=lambda b: b["owner"]) == [ceiling, own]
        assert (await call(p, "GET", path + "/events", key=admin))[0] == 200
        status, deleted = await call(p, "DELETE", f"{path}?owner=org", key=admin)
        assert status == 200 and deleted["deleted"] is True
        # The ceiling survived both attempts, unchanged.
        assert (await call(p, "GET", path))[1]["data"] == [ceiling]


async def test_other_orgs_ids_are_404_never_403(world: World) -> None:
    """An org admin or member of acme cannot tell globex's ids from ids that do not exist."""
    p = world.proxy
    _, theirs = await call(p, "PUT", f"/apikey/{world.globex_member.id}", budget())
    _, their_org = await call(p, "PUT", "/org/globex", budget())
    for caller in (world.acme_admin, world.acme_member):
        for existing, missing in (
            (f"/apikey/{world.globex_member.id}", "/apikey/key_0000000000000000"),
            (f"/apikey/{world.globex_admin.id}", "/apikey/key_ffffffffffffffff"),
            ("/org/globex", "/org/initech"),
        ):
            for method, suffix, body in (
                ("GET", "", None),
                ("PUT", "", budget()),
                ("PUT", "", budget(owner="cluster")),
                ("DELETE", "", None),
                ("DELETE", "?owner=cluster", None),
                ("GET", "/events", None),
            ):
                seen = await call(p, method, existing + suffix, body, key=caller)
                unknown = await call(p, method, missing + suffix, body, key=caller)
                assert seen[0] == unknown[0] == 404, (caller, method, existing, seen, unknown)
                assert_error(seen[1])
                assert (seen[1]["error"]["type"], seen[1]["error"]["code"]) == (
                    unknown[1]["error"]["type"],
                    unknown[1]["error"]["code"],
                )
    assert (await call(p, "GET", f"/apikey/{world.globex_member.id}"))[1]["data"] == [theirs]
    assert (await call(p, "GET", "/org/globex"))[1]["data"] == [their_org]


async def test_member_reads_only_its_own_key_budgets(world: World) -> None:
    p, me, colleague = world.proxy, world.acme_member, world.acme_other
    _, mine = await call(p, "PUT", f"/apikey/{me.id}", budget())
    _, ceiling = await call(p, "PUT", f"/apikey/{me.id}", budget(owner="cluster"))
    _, theirs = await call(p, "PUT", f"/apikey/{colleague.id}", budget())
    _, org = await call(p, "PUT", "/org/acme", budget())

    status, listing = await call(p, "GET", f"/apikey/{me.id}", key=me)
    assert status == 200
    assert sorted(listing["data"], key=lambda b: b["owner"]) == [ceiling, mine]
    assert (await call(p, "GET", f"/apikey/{me.id}/events", key=me))[0] == 200
    # Writing its own budgets: 403, for either owner; nothing changes.
    for method, path, body in (
        ("PUT", f"/apikey/{me.id}", budget(limit=10**9)),
        ("PUT", f"/apikey/{me.id}", budget(owner="cluster", limit=10**9)),
        ("DELETE", f"/apikey/{me.id}", None),
        ("DELETE", f"/apikey/{me.id}?owner=cluster", None),
        ("PUT", "/org/acme", budget(limit=10**9)),
        ("DELETE", "/org/acme", None),
        ("GET", "/org/acme", None),
        ("GET", "/org/acme/events", None),
    ):
        status, body = await call(p, method, path, body, key=me)
        assert status == 403, (method, path, body)
        assert_error(body, "permission_error")
    # A colleague's key and another org: 404.
    for method, path, body in (
        ("GET", f"/apikey/{colleague.id}", None),
        ("PUT", f"/apikey/{colleague.id}", budget()),
        ("DELETE", f"/apikey/{colleague.id}", None),
        ("GET", f"/apikey/{colleague.id}/events", None),
        ("GET", "/org/globex", None),
        ("GET", f"/apikey/{world.globex_member.id}", None),
    ):
        status, body = await call(p, method, path, body, key=me)
        assert status == 404, (method, path, body)
        assert_error(body)
    # The list endpoint shows a member its own key's budgets only.
    status, listing = await call(p, "GET", "", key=me)
    assert status == 200
    assert sorted(listing["data"], key=lambda b: b["owner"]) == [ceiling, mine]
    # Nothing changed.
    assert (await call(p, "GET", f"/apikey/{me.id}"))[1]["data"] == listing["data"]
    assert (await call(p, "GET", f"/apikey/{colleague.id}"))[1]["data"] == [theirs]
    assert (await call(p, "GET", "/org/acme"))[1]["data"] == [org]


async def test_list_endpoint_visibility_per_role(world: World) -> None:
    p = world.proxy
    made: dict[str, str] = {}
    for name, path, owner in (
        ("acme-org", "/org/acme", "org"),
        ("acme-ceiling", "/org/acme", "cluster"),
        ("acme-admin-key", f"/apikey/{world.acme_admin.id}", "org"),
        ("acme-member", f"/apikey/{world.acme_member.id}", "cluster"),
        ("acme-other", f"/apikey/{world.acme_other.id}", "org"),
        ("globex-org", "/org/globex", "org"),
        ("globex-member", f"/apikey/{world.globex_member.id}", "org"),
    ):
        status, b = await call(p, "PUT", path, budget(owner=owner))
        assert status == 200
        made[b["id"]] = name

    async def visible(key: Key | str) -> set[str]:
        status, listing = await call(p, "GET", "", key=key)
        assert status == 200 and listing["object"] == "list"
        return {made[b["id"]] for b in listing["data"]}

    assert await visible(p.admin_key) == set(made.values())
    acme = {"acme-org", "acme-ceiling", "acme-admin-key", "acme-member", "acme-other"}
    assert await visible(world.acme_admin) == acme
    assert await visible(world.globex_admin) == {"globex-org", "globex-member"}
    assert await visible(world.acme_member) == {"acme-member"}
    assert await visible(world.acme_other) == {"acme-other"}
    assert await visible(world.globex_member) == {"globex-member"}


# --- the spend gauge --------------------------------------------------------------------


async def test_budget_created_mid_window_shows_the_windows_real_spend(
    world: World, store: aioredis.Redis
) -> None:
    p, member = world.proxy, world.acme_member
    used = await chat(p, member, 100) + await chat(p, member, 50)
    cost, tokens = await redis_spend(store, "acme", f"k:{member.id}", DAY)
    assert tokens == used and cost > 0

    status, b = await call(p, "PUT", f"/apikey/{member.id}", budget(limit=1000))
    assert status == 200
    assert b["spend"] == {
        "window": DAY,
        "cost_spent_nano": str(cost),
        "cost_spent": float(Decimal(cost) / NANO),
        "tokens_spent": str(tokens),
        "pct": round(tokens / 1000 * 100, 2),
        "status": "ok",
        "reset_at": "2026-11-25T00:00:00Z",
    }
    # A cost budget on the org over the same spend: pct in currency.
    limit = 0.01
    status, org = await call(
        p, "PUT", "/org/acme", budget(period="weekly", limit_kind="cost", limit=limit)
    )
    org_cost, org_tokens = await redis_spend(store, "acme", "o", WEEK)
    assert (org_cost, org_tokens) == (cost, tokens)
    assert org["spend"]["window"] == WEEK
    assert org["spend"]["cost_spent_nano"] == str(cost)
    assert org["spend"]["tokens_spent"] == str(tokens)
    assert org["spend"]["pct"] == round(float(Decimal(cost) / NANO / Decimal("0.01") * 100), 2)

    # Editing re-evaluates at once: a limit below spend is blocked, a higher one is ok again.
    status, b = await call(p, "PUT", f"/apikey/{member.id}", budget(limit=tokens - 1))
    assert b["spend"]["status"] == "blocked"
    assert b["spend"]["pct"] == round(tokens / (tokens - 1) * 100, 2)
    _, b = await call(p, "PUT", f"/apikey/{member.id}", budget(limit=tokens))
    assert b["spend"]["status"] == "blocked"  # spend reached the line exactly
    _, b = await call(p, "PUT", f"/apikey/{member.id}", budget(limit=tokens + 1))
    assert b["spend"]["status"] == "ok"
    # A block line below 100 %, and one past the limit.
    _, b = await call(
        p,
        "PUT",
        f"/apikey/{member.id}",
        budget(limit=2 * tokens, thresholds=[{"pct": 50, "action": "block"}]),
    )
    assert (b["spend"]["pct"], b["spend"]["status"]) == (50.0, "blocked")
    _, b = await call(
        p,
        "PUT",
        f"/apikey/{member.id}",
        budget(limit=tokens // 2, thresholds=[{"pct": 300, "action": "block"}]),
    )
    assert b["spend"]["status"] == "ok" and b["spend"]["pct"] > 100
    # Alert-only budgets never show blocked, however far past the limit.
    _, b = await call(
        p,
        "PUT",
        f"/apikey/{member.id}",
        budget(limit=1, thresholds=[{"pct": 100, "action": "alert"}]),
    )
    assert b["spend"]["status"] == "ok" and b["spend"]["pct"] == tokens * 100
    # Other keys of the org have spent nothing.
    _, other = await call(p, "PUT", f"/apikey/{world.acme_other.id}", budget())
    assert other["spend"]["tokens_spent"] == "0" and other["spend"]["cost_spent_nano"] == "0"


async def test_gauge_follows_spend_as_requests_settle(world: World, store: aioredis.Redis) -> None:
    p, member = world.proxy, world.acme_member
    _, b = await call(p, "PUT", "/org/acme", budget(period="monthly", limit=10_000))
    assert b["spend"]["tokens_spent"] == "0"
    used = 0
    for max_tokens in (10, 20, 30):
        used += await chat(p, member, max_tokens)
        _, listing = await call(p, "GET", "/org/acme")
        [now] = listing["data"]
        assert now["id"] == b["id"]
        assert now["spend"]["tokens_spent"] == str(used)
        cost, tokens = await redis_spend(store, "acme", "o", MONTH)
        assert now["spend"]["cost_spent_nano"] == str(cost) and tokens == used
        assert now["spend"]["pct"] == round(used / 10_000 * 100, 2)


# --- events -----------------------------------------------------------------------------


async def events(p: Proxy, path: str, key: Key | str | None = None) -> list[dict[str, Any]]:
    status, body = await call(p, "GET", path + "/events", key=key)
    assert status == 200, body
    assert set(body) == {"object", "data"} and body["object"] == "list"
    for e in body["data"]:
        assert_event_shape(e)
    data: list[dict[str, Any]] = body["data"]
    return data


async def test_settle_records_alert_and_block_events_newest_first(
    world: World, store: aioredis.Redis
) -> None:
    p, member = world.proxy, world.acme_member
    clock = p.clock
    path = f"/apikey/{member.id}"
    _, b = await call(
        p,
        "PUT",
        path,
        budget(
            limit=300,
            thresholds=[{"pct": 25, "action": "alert"}, {"pct": 90, "action": "block"}],
        ),
    )
    assert await events(p, path) == []
    first = await chat(p, member, 88)  # 100 tokens: past 25 %
    clock.advance(1.5)
    second = await chat(p, member, 158)  # 170 more: 270 = 90 %, the block line
    assert first == 100 and second == 170

    alert, blocked = reversed(await events(p, path))
    assert alert["type"] == "threshold_alert" and blocked["type"] == "blocked"
    assert (alert["pct"], blocked["pct"]) == (25, 90)
    assert alert["budget_id"] == blocked["budget_id"] == b["id"]
    assert alert["period_key"] == blocked["period_key"] == DAY
    assert (alert["spend_snapshot"], blocked["spend_snapshot"]) == ("100", "270")
    assert alert["limit_snapshot"] == blocked["limit_snapshot"] == "300"
    assert datetime.fromisoformat(alert["created_at"]).timestamp() == NOON
    assert datetime.fromisoformat(blocked["created_at"]).timestamp() == NOON + 1.5
    assert alert["id"] != blocked["id"]
    # The org had no budget: its events list stays empty; another key's too.
    assert await events(p, "/org/acme") == []
    assert await events(p, f"/apikey/{world.acme_other.id}") == []
    # Org admins and the member itself read the key's events.
    assert await events(p, path, world.acme_admin) == await events(p, path)
    assert await events(p, path, member) == await events(p, path)


async def test_cost_event_snapshots_are_decimal_currency(
    world: World, store: aioredis.Redis
) -> None:
    p, member = world.proxy, world.acme_member
    _, b = await call(
        p,
        "PUT",
        "/org/acme",
        budget(
            period="weekly",
            limit_kind="cost",
            limit=0.0015,
            thresholds=[{"pct": 50, "action": "alert"}, {"pct": 200, "action": "block"}],
        ),
    )
    await chat(p, member, 100)
    cost, _ = await redis_spend(store, "acme", "o", WEEK)
    assert cost > 750_000  # past 50 % of 0.0015
    [event] = await events(p, "/org/acme")
    assert event["type"] == "threshold_alert" and event["pct"] == 50
    assert event["period_key"] == WEEK and event["budget_id"] == b["id"]
    assert Decimal(event["spend_snapshot"]) == Decimal(cost) / NANO
    assert event["limit_snapshot"] == "0.0015"
    # apikey events are per key: this org-level crossing is not among them.
    assert await events(p, f"/apikey/{member.id}") == []


async def test_each_threshold_fires_once_per_window_even_across_edits(
    world: World, store: aioredis.Redis
) -> None:
    p, member = world.proxy, world.acme_member
    path = "/org/acme"
    alert50 = {"pct": 50, "action": "alert"}
    _, b = await call(p, "PUT", path, budget(limit=200, thresholds=[alert50]))
    spent = await chat(p, member, 100)  # 112 of 200: past 50 %
    assert [e["pct"] for e in await events(p, path)] == [50]
    # More spend, and edits that keep the threshold crossed: no second alert.
    spent += await chat(p, member, 10)
    for limit in (150, 220, 200):
        status, edited = await call(p, "PUT", path, budget(limit=limit, thresholds=[alert50]))
        assert status == 200 and edited["id"] == b["id"]
    spent += await chat(p, member, 10)
    assert [e["pct"] for e in await events(p, path)] == [50]
    # A new threshold that the current spend has already crossed fires once, at the edit.
    block = {"pct": 60, "action": "block"}
    status, edited = await call(p, "PUT", path, budget(limit=200, thresholds=[alert50, block]))
    assert edited["spend"]["status"] == "blocked"
    newest, oldest = await events(p, path)
    assert (newest["type"], newest["pct"], newest["spend_snapshot"]) == ("blocked", 60, str(spent))
    assert oldest["pct"] == 50
    await call(p, "PUT", path, budget(limit=200, thresholds=[alert50, block]))
    await call(p, "PUT", path, budget(limit=100, thresholds=[block, alert50]))
    assert len(await events(p, path)) == 2
    # The next window starts over: the same thresholds fire again, once.
    p.clock.advance(86400)
    await call(p, "PUT", path, budget(limit=200, thresholds=[alert50]))
    assert len(await events(p, path)) == 2  # nothing spent yet in the new day
    await chat(p, member, 100)
    await chat(p, member, 100)
    newest, *rest = await events(p, path)
    assert len(rest) == 2
    assert (newest["type"], newest["pct"], newest["period_key"]) == (
        "threshold_alert",
        50,
        windows_at(NOON + 86400).daily,
    )


async def test_deleted_budget_stops_alerting(world: World) -> None:
    p, member = world.proxy, world.acme_member
    path = f"/apikey/{member.id}"
    await call(p, "PUT", path, budget(limit=100, thresholds=[{"pct": 10, "action": "alert"}]))
    await call(p, "DELETE", path)
    await chat(p, member, 50)
    assert await events(p, path) == []
