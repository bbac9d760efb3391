"""Key lifecycle (issue 23, item 6): expiry (a clear 401, the record kept for audit),
metadata, last use, and rotation with a grace period that keeps limits, budgets and spend."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis
from conftest import Proxy, budget, eventually
from helpers import chat_status, user_messages

HELLO = {"model": "gpt-4o-mini", "messages": user_messages("hello")}


async def _chat(proxy: Proxy, key: str) -> tuple[int, Any]:
    async with proxy.session.post(
        proxy.url + "/v1/chat/completions", json=HELLO, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        return response.status, await response.json()


async def test_an_expired_key_is_refused_with_key_expired_and_kept(proxy: Proxy) -> None:
    kid, key = await proxy.create_key("acme", expires_at=int(proxy.clock()) + 100)
    assert (await _chat(proxy, key))[0] == 200
    proxy.clock.advance(101)
    status, refused = await _chat(proxy, key)
    assert status == 401, refused
    assert refused["error"]["code"] == "key_expired"
    assert "expired at" in refused["error"]["message"]
    status, record = await proxy.admin("GET", f"/api/v1/keys/{kid}")
    assert (status, record["status"]) == (200, "expired")
    assert record["expires_at"] == int(proxy.clock()) - 1
    _, listing = await proxy.admin("GET", "/api/v1/keys?org_id=acme")
    assert kid in [k["id"] for k in listing["data"]]  # kept for audit
    # An admin can extend it; then it works again.
    status, changed = await proxy.admin("PATCH", f"/api/v1/keys/{kid}", {"expires_at": None})
    assert (status, changed["status"], changed["expires_at"]) == (200, "active", None)
    assert (await _chat(proxy, key))[0] == 200


async def test_expires_at_in_the_past_is_a_400(proxy: Proxy) -> None:
    status, body = await proxy.admin(
        "POST", "/api/v1/keys", {"org_id": "acme", "expires_at": int(proxy.clock()) - 1}
    )
    assert status == 400 and body["error"]["param"] == "expires_at"


async def test_metadata_is_a_small_string_map(proxy: Proxy) -> None:
    kid, _ = await proxy.create_key("acme", metadata={"team": "search", "ticket": "OPS-12"})
    _, record = await proxy.admin("GET", f"/api/v1/keys/{kid}")
    assert record["metadata"] == {"team": "search", "ticket": "OPS-12"}
    status, changed = await proxy.admin(
        "PATCH", f"/api/v1/keys/{kid}", {"metadata": {"team": "ads"}}
    )
    assert (status, changed["metadata"]) == (200, {"team": "ads"})
    too_many = {f"k{i}": "v" for i in range(17)}
    for bad in (too_many, {"k": "v" * 513}, {"k": 1}, {"": "v"}):
        status, _ = await proxy.admin("POST", "/api/v1/keys", {"org_id": "acme", "metadata": bad})
        assert status == 400, bad


async def test_last_used_at_is_kept(proxy: Proxy) -> None:
    kid, key = await proxy.create_key("acme")
    _, record = await proxy.admin("GET", f"/api/v1/keys/{kid}")
    assert record["last_used_at"] is None
    assert await chat_status(proxy.session, proxy.url, key, HELLO) == 200

    async def used() -> Any:
        _, record = await proxy.admin("GET", f"/api/v1/keys/{kid}")
        return record["last_used_at"]

    assert await eventually(used, what="last_used_at") == int(proxy.clock())


@pytest.mark.parametrize("grace", [0, 300])
async def test_rotation_keeps_the_id_budgets_and_spend(
    proxy: Proxy, store: aioredis.Redis, grace: int
) -> None:
    kid, old = await proxy.create_key("acme", limits={"rpm": 1000})
    path = f"/api/v1/llm/budgets/apikey/{kid}"
    status, _ = await proxy.admin("PUT", path, budget(limit=100_000, period="monthly"))
    assert status == 200
    assert (await _chat(proxy, old))[0] == 200
    _, before = await proxy.admin("GET", path)
    status, rotated = await proxy.admin(
        "POST", f"/api/v1/keys/{kid}/rotate", {"grace_seconds": grace}
    )
    assert status == 200, rotated
    new = rotated["key"]
    assert new != old and rotated["id"] == kid and rotated["limits"]["rpm"] == 1000
    assert rotated["rotated_at"] == int(proxy.clock())
    assert (await _chat(proxy, new))[0] == 200
    status, answer = await _chat(proxy, old)
    if grace:
        assert status == 200
        assert rotated["previous_valid_until"] == int(proxy.clock()) + grace
        proxy.clock.advance(grace + 1)
        status, answer = await _chat(proxy, old)
    assert status == 401, answer
    assert (await _chat(proxy, new))[0] == 200
    _, after = await proxy.admin("GET", path)
    assert _used(after) > _used(before) > 0  # one budget, spent by both secrets


def _used(budget_answer: dict[str, Any]) -> int:
    return int(budget_answer["data"][0]["spend"]["tokens_spent"])


async def test_a_revoked_key_cannot_be_rotated(proxy: Proxy) -> None:
    kid, _ = await proxy.create_key("acme")
    await proxy.admin("DELETE", f"/api/v1/keys/{kid}")
    status, body = await proxy.admin("POST", f"/api/v1/keys/{kid}/rotate", {})
    assert (status, body["error"]["code"]) == (400, "key_revoked")


async def test_last_used_at_is_written_at_most_once_a_minute_per_process() -> None:
    """Kept cheaply: one write per key and process a minute, never one per request."""
    import asyncio
    from unittest import mock

    from proxy.gateway.auth import TOUCH_EVERY, Authenticator
    from proxy.ledger.api_keys import Identity

    keys = mock.AsyncMock()
    keys.identity.return_value = Identity("key_1", "acme", "member")
    auth = Authenticator(keys, cache_ttl=1.0)
    with mock.patch("proxy.gateway.auth.time.monotonic") as monotonic:
        monotonic.return_value = 1000.0
        for _ in range(50):
            await auth.identify_key("sk-bp-x")
        await asyncio.sleep(0)
        assert keys.touch.await_count == 1
        monotonic.return_value = 1000.0 + TOUCH_EVERY
        await auth.identify_key("sk-bp-x")
        await asyncio.sleep(0)
        assert keys.touch.await_count == 2
