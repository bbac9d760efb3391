"""The ledger against records and numbers that once broke it (issue 11, items 1-2).

Lua numbers are doubles that Redis receives as text: ``-0`` and ``1e+17`` are rejected by
HINCRBY, a script error keeps its earlier writes, and one lease that could not be released
used to make every admission of its org fail. These tests drive the real proxy and Redis into
each of those corners and check the books afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest
import redis.asyncio as aioredis
from conftest import Proxy, eventually, usage_record
from helpers import user_messages

from proxy.config import ModelConfig, PriceConfig, UpstreamConfig
from proxy.gateway.lease_sweeper import sweep_once
from proxy.gateway.state import GATEWAY

P = "bp:{o:acme}:"
MESSAGES = user_messages("hello there")


async def no_reservation_left(store: aioredis.Redis) -> None:
    async def released() -> bool:
        return await store.zcard(P + "leases") == 0 and not [
            k async for k in store.scan_iter(P + "infl:*")
        ]

    await eventually(released, what="every lease released and no in-flight counter left")


async def post(proxy: Proxy, key: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with proxy.session.post(
        proxy.url + path, json=body, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        return response.status, await response.json(content_type=None)


# --- item 1: zero reservations settle, and nothing can wedge an org ---------------------------


async def test_an_empty_embedding_input_settles_and_the_org_keeps_working(
    proxy: Proxy, store: aioredis.Redis
) -> None:
    _kid, key = await proxy.create_key()
    client = proxy.openai(key)
    result = await client.embeddings.create(model="text-embedding-3-small", input="")
    assert result.usage.total_tokens == 0
    await no_reservation_left(store)
    records = [usage_record(f) for _, f in await store.xrange(P + "usage")]
    assert [(r["in"], r["out"], r["cost_nano"]) for r in records] == [(0, 0, 0)]
    # Long after any lease could have expired, every key of the org is still served.
    proxy.clock.advance(3600)
    other = proxy.openai((await proxy.create_key())[1])
    chat = await other.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert chat.usage is not None and chat.usage.total_tokens > 0
    await no_reservation_left(store)


async def test_a_free_model_settles_and_is_recorded_at_zero_cost(
    start_proxy: Callable[..., Any], store: aioredis.Redis, mock_upstream: Any
) -> None:
    free = ModelConfig(name="local-llama", upstream="mock", price=PriceConfig(input=0, output=0))
    proxy: Proxy = await start_proxy(
        upstreams=[
            UpstreamConfig(
                name="mock", base_url=str(mock_upstream.make_url("/v1")), api_key_env=None
            )
        ],
        models=[free],
    )
    _kid, key = await proxy.create_key()
    client = proxy.openai(key)
    for stream in (False, True):
        if stream:
            chunks = await client.chat.completions.create(
                model="local-llama",
                messages=MESSAGES,
                stream=True,  # type: ignore[arg-type]
            )
            async for _ in chunks:
                pass
        else:
            await client.chat.completions.create(model="local-llama", messages=MESSAGES)
    await no_reservation_left(store)
    records = [usage_record(f) for _, f in await store.xrange(P + "usage")]
    assert len(records) == 2 and all(r["cost_nano"] == 0 and r["out"] > 0 for r in records)


async def test_an_unreadable_lease_is_set_aside_not_in_the_way(
    proxy: Proxy, store: aioredis.Redis
) -> None:
    kid, key = await proxy.create_key(limits={"concurrency": 5})
    # Records no script wrote: garbage numbers, a missing key id, a number past 2^53.
    now_ms = int(proxy.clock() * 1000)
    await store.hset(P + "lease:req_bad1", mapping={"k": kid, "c": "-0", "t": "abc", "r": ""})
    await store.hset(P + "lease:req_bad2", mapping={"c": "5", "t": "5"})
    await store.hset(P + "lease:req_bad3", mapping={"k": kid, "c": "1e+17", "t": "1e400"})
    await store.zadd(P + "leases", {"req_bad1": 0, "req_bad2": 0, "req_bad3": now_ms - 1})
    client = proxy.openai(key)
    chat = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert chat.usage is not None
    await no_reservation_left(store)
    # Kept for an operator, with the reason, out of the expiry index.
    stuck = await store.zrange(P + "leases:stuck", 0, -1)
    assert sorted(stuck) == ["req_bad1", "req_bad2", "req_bad3"]
    assert set((await store.hgetall(P + "leases:stuck:why")).values()) == {"malformed"}
    assert await store.exists(P + "lease:req_bad1") == 1
    # The sweeper reports them (log and metric) on every pass.
    _, set_aside = await sweep_once(proxy.app[GATEWAY])
    assert set_aside == 3


async def test_corrupt_in_flight_counters_are_rebuilt_from_the_live_leases(
    proxy: Proxy, store: aioredis.Redis
) -> None:
    kid, key = await proxy.create_key(limits={"concurrency": 1})
    await store.hset(P + "infl:o", mapping={"n": "x", "c": "-0", "t": "1e+17"})
    await store.hset(P + f"infl:k:{kid}", mapping={"n": "7"})  # would refuse at concurrency 1
    client = proxy.openai(key)
    chat = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert chat.usage is not None
    await no_reservation_left(store)


async def test_a_reclaimed_zero_reservation_is_charged_zero(
    proxy: Proxy, store: aioredis.Redis
) -> None:
    """A dead proxy's lease reserving nothing (an empty embedding) is reclaimed cleanly."""
    kid, _key = await proxy.create_key()
    now_ms = int(proxy.clock() * 1000)
    await store.hset(
        P + "lease:req_dead",
        mapping={"k": kid, "c": "0", "t": "0", "r": "", "pi": "0", "m": "m", "e": "embeddings"},
    )
    await store.zadd(P + "leases", {"req_dead": now_ms - 1})
    await store.hset(P + f"infl:k:{kid}", mapping={"n": "1", "c": "0", "t": "0"})
    await store.hset(P + "infl:o", mapping={"n": "1", "c": "0", "t": "0"})
    reclaimed, set_aside = await sweep_once(proxy.app[GATEWAY])
    assert (reclaimed, set_aside) == (1, 0)
    await no_reservation_left(store)
    records = [usage_record(f) for _, f in await store.xrange(P + "usage")]
    assert [(r["rid"], r["cost_nano"], r["reclaimed"]) for r in records] == [("req_dead", 0, "1")]


# --- item 2: huge integers are refused before any script sees them -----------------------------


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/chat/completions", "max_tokens", 10**13),
        ("/v1/chat/completions", "max_completion_tokens", 10**13),
        ("/v1/chat/completions", "n", 10**13),
        ("/v1/completions", "best_of", 10**13),
        ("/v1/responses", "max_output_tokens", 10**13),
        ("/v1/chat/completions", "max_tokens", 2**64),
    ],
)
async def test_huge_integers_are_a_400_naming_the_param_and_consume_nothing(
    proxy: Proxy, store: aioredis.Redis, path: str, field: str, value: int
) -> None:
    _kid, key = await proxy.create_key(limits={"rpm": 5})
    if path.endswith("responses"):
        body: dict[str, Any] = {"model": "gpt-4o", "input": "hi"}
    elif path.endswith("/completions") and "chat" not in path:
        body = {"model": "gpt-4o", "prompt": "hi"}
    else:
        body = {"model": "gpt-4o", "messages": MESSAGES}
    for _ in range(6):
        status, answer = await post(proxy, key, path, {**body, field: value})
        assert status == 400, answer
        assert answer["error"]["param"] == field
    assert len(proxy.received()) == 0, "refused requests reached the upstream"
    # Six refusals later the rpm=5 key still has its whole minute: nothing was consumed.
    client = proxy.openai(key)
    for _ in range(5):
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    await no_reservation_left(store)


async def test_a_worst_case_past_the_exact_range_is_refused_before_admission(
    start_proxy: Callable[..., Any], store: aioredis.Redis, mock_upstream: Any
) -> None:
    dear = ModelConfig(name="dear", upstream="mock", price=PriceConfig(input=1000, output=100000))
    proxy: Proxy = await start_proxy(
        upstreams=[
            UpstreamConfig(
                name="mock", base_url=str(mock_upstream.make_url("/v1")), api_key_env=None
            )
        ],
        models=[dear],
    )
    _kid, key = await proxy.create_key(limits={"rpm": 1})
    body = {"model": "dear", "messages": MESSAGES, "max_tokens": 10**9, "n": 128}
    status, answer = await post(proxy, key, "/v1/chat/completions", body)
    assert status == 400, answer
    assert answer["error"]["code"] == "reservation_too_large"
    assert answer["error"]["param"] == "max_tokens"
    fits = {**body, "n": 1, "max_tokens": 1000}
    status, answer = await post(proxy, key, "/v1/chat/completions", fits)
    assert status == 200, answer
    await no_reservation_left(store)


async def test_the_openai_sdk_gets_a_bad_request_error_for_a_huge_cap(
    proxy: Proxy,
) -> None:
    _, key = await proxy.create_key()
    client = proxy.openai(key)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            max_tokens=10**15,  # type: ignore[arg-type]
        )
    assert caught.value.body["param"] == "max_tokens"  # type: ignore[index]


async def test_admission_refuses_out_of_range_reservations_itself(proxy: Proxy) -> None:
    """Defence in depth: a caller that skipped the request checks cannot push an inexact
    number into the script either."""
    from proxy.ledger.api_keys import Identity

    gw = proxy.app[GATEWAY]
    with pytest.raises(ValueError):
        await gw.admission.admit(Identity("key_x", "acme", "member"), "req_x", 2**53, 0)
