"""Rate limits end to end: exact admitted counts per limit (a burst of exactly N, then one more
per T/N as the bucket drains), tokens per minute with refunds,
concurrency slots that never leak, org limits and role defaults, the headers clients read, what
the official ``openai`` SDK does with a 429, and validation of the limits themselves.

Time is the proxy's injected ``FakeClock`` (frozen unless a test moves it), so "exactly N, then
one per T/N" is asserted to the millisecond; only the multi-process tests run on the real clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import helpers
import openai
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from conftest import (
    ADMIN_KEY,
    FakeClock,
    Proxy,
    ProxyProcess,
    eventually,
    start_proxy_process,
    write_config,
)
from helpers import Reply, auth, post_chat, user_messages

from proxy.tools.mock import RECEIVED

ORG = "acme"
OTHER_ORG = "globex"
P = "bp:{o:acme}:"
CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
MESSAGES = user_messages("hello there")
# Midday UTC: far from the end of every spend window, so budget answers carry no Retry-After.
START = datetime(2026, 11, 24, 12, 0, tzinfo=UTC).timestamp()
WINDOW_SECONDS = {"rps": 1, "rpm": 60, "rph": 3600, "rpd": 86400}
LIMIT_WORDS = {
    "rps": "requests per second",
    "rpm": "requests per minute",
    "rph": "requests per hour",
    "rpd": "requests per day",
}
RATE_HEADER_PREFIXES = ("x-ratelimit-", "ratelimit")

StartProxy = Callable[..., Awaitable[Proxy]]


# --- helpers -------------------------------------------------------------------------------


def chat_body(max_tokens: int = 10, stream: bool = False) -> dict[str, Any]:
    return helpers.chat_body(MODEL, MESSAGES, max_tokens, stream)


async def chat(
    session: aiohttp.ClientSession,
    base_url: str,
    key: str,
    *,
    max_tokens: int = 10,
    headers: Mapping[str, str] | None = None,
    stream: bool = False,
) -> Reply:
    """This module's request: ``MODEL``, ``MESSAGES``, ``max_tokens``."""
    return await post_chat(session, base_url, key, chat_body(max_tokens, stream), headers)


async def burst(
    session: aiohttp.ClientSession, base_url: str, key: str, n: int, **kwargs: Any
) -> list[Reply]:
    """``n`` requests at once."""
    return list(await asyncio.gather(*(chat(session, base_url, key, **kwargs) for _ in range(n))))


def statuses(answers: list[Reply]) -> Counter[int]:
    return Counter(answer.status for answer in answers)


async def open_stream(
    session: aiohttp.ClientSession, base_url: str, key: str, *, delay_ms: int, tokens: int
) -> aiohttp.ClientResponse:
    """A streamed request kept open by the caller; the mock trickles ``tokens`` chunks out
    ``delay_ms`` apart, so an admitted one stays in flight for about tokens times delay."""
    return await session.post(
        base_url + CHAT,
        json=chat_body(max_tokens=200, stream=True),
        headers=auth(
            key,
            **{"x-mock-chunk-delay-ms": str(delay_ms), "x-mock-output-tokens": str(tokens)},
        ),
    )


async def open_streams(
    session: aiohttp.ClientSession,
    base_url: str,
    key: str,
    n: int,
    *,
    delay_ms: int,
    tokens: int,
) -> tuple[list[aiohttp.ClientResponse], list[dict[str, Any]]]:
    """``n`` streams at once: the admitted responses (still open) and the refusals' errors."""
    responses = await asyncio.gather(
        *(open_stream(session, base_url, key, delay_ms=delay_ms, tokens=tokens) for _ in range(n))
    )
    admitted = [r for r in responses if r.status == 200]
    errors: list[dict[str, Any]] = []
    for response in responses:
        if response.status != 200:
            assert response.status == 429, await response.text()
            errors.append((await response.json())["error"])
            response.release()
    return admitted, errors


def rate_headers(headers: Mapping[str, str]) -> list[str]:
    return [name for name in headers if name.lower().startswith(RATE_HEADER_PREFIXES)]


async def in_flight(store: aioredis.Redis, key_id: str) -> dict[str, int]:
    """The key's live reservations: concurrency slots ``n``, tokens ``t``, cost ``c``."""
    raw = await store.hgetall(P + "infl:k:" + key_id)  # type: ignore[misc]
    return {name: int(raw.get(name, 0)) for name in ("n", "t", "c")}


async def no_slots_held(store: aioredis.Redis, key_id: str) -> None:
    async def released() -> bool:
        return await in_flight(store, key_id) == {"n": 0, "t": 0, "c": 0}

    await eventually(released, what=f"the slots of {key_id} to be released")
    assert await store.zcard(P + "leases") == 0


class AttemptCounter:
    """httpx event hooks for the openai SDK: counts the HTTP attempts it makes, and on a 429
    moves the proxy's clock by the wait the SDK is about to sleep, as real time would."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.attempts = 0
        self.clock = clock

    async def on_request(self, request: Any) -> None:
        self.attempts += 1

    async def on_response(self, response: Any) -> None:
        if self.clock is not None and response.status_code == 429:
            self.clock.advance(int(response.headers["retry-after-ms"]) / 1000)

    def client(self, proxy: Proxy, key: str, max_retries: int) -> openai.AsyncOpenAI:
        http_client = openai.DefaultAsyncHttpxClient(
            event_hooks={"request": [self.on_request], "response": [self.on_response]}
        )
        return proxy.openai(key, max_retries=max_retries, http_client=http_client)


# --- 1. exact admitted counts per window ----------------------------------------------------


@pytest.mark.parametrize(("name", "limit"), [("rps", 5), ("rpm", 7), ("rph", 9), ("rpd", 11)])
async def test_exactly_the_limit_is_admitted_per_window(
    start_proxy: StartProxy, name: str, limit: int
) -> None:
    clock = FakeClock(START)
    proxy = await start_proxy(clock=clock)
    _, key = await proxy.create_key(ORG, limits={name: limit})
    window = WINDOW_SECONDS[name]

    # One request's share of the window: the bucket drains one request per interval.
    interval_ms = math.ceil(window * 1000 / limit)

    first = await burst(proxy.session, proxy.url, key, 50)
    assert statuses(first) == {200: limit, 429: 50 - limit}
    retry_s = math.ceil(interval_ms / 1000)
    for answer in first:
        if answer.status == 429:
            assert answer.error["code"] == "rate_limit_exceeded"
            assert answer.error["type"] == "requests"
            assert f"limit of {limit} {LIMIT_WORDS[name]}" in answer.error["message"]
            assert answer.headers["retry-after-ms"] == str(interval_ms)
            assert answer.headers["Retry-After"] == str(retry_s)
            assert answer.headers["x-should-retry"] == ("true" if retry_s <= 60 else "false")
    assert len(proxy.received()) == limit  # refusals never reach the upstream

    # Half a millisecond in: the proxy's clock is read in whole milliseconds (truncated), and
    # START + n / 1000 may land a hair below n ms in floating point.
    clock.now = START + (interval_ms - 1 + 0.5) / 1000
    almost = await burst(proxy.session, proxy.url, key, 5)
    assert statuses(almost) == {429: 5}
    assert all(answer.headers["retry-after-ms"] == "1" for answer in almost)

    clock.now = START + (interval_ms + 0.5) / 1000
    one_more = await burst(proxy.session, proxy.url, key, 5)
    assert statuses(one_more) == {200: 1, 429: 4}

    # A whole window later the bucket has drained completely: a full burst again, no more.
    clock.now += window
    second = await burst(proxy.session, proxy.url, key, 50)
    assert statuses(second) == {200: limit, 429: 50 - limit}
    assert len(proxy.received()) == 2 * limit + 1


async def test_the_bucket_drains_continuously_and_never_resets(start_proxy: StartProxy) -> None:
    clock = FakeClock(START)
    proxy = await start_proxy(clock=clock)
    _, key = await proxy.create_key(ORG, limits={"rpm": 4})  # one request per 15 s

    assert statuses(await burst(proxy.session, proxy.url, key, 6)) == {200: 4, 429: 2}
    clock.now = START + 30
    half = await burst(proxy.session, proxy.url, key, 4)
    assert statuses(half) == {200: 2, 429: 2}  # two intervals drained: two slots

    # Where a fixed window would start afresh with 4, only what drained since is free.
    clock.now = START + 60
    later = await burst(proxy.session, proxy.url, key, 4)
    assert statuses(later) == {200: 2, 429: 2}
    for answer in later:
        if answer.status == 429:
            assert answer.headers["Retry-After"] == "15"
            assert "Try again in 15s." in answer.error["message"]


async def test_a_lowered_limit_applies_to_the_next_request(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(clock=FakeClock(START))
    key_id, key = await proxy.create_key(ORG, limits={"rpm": 10})
    assert statuses(await burst(proxy.session, proxy.url, key, 3)) == {200: 3}

    status, body = await proxy.admin("PATCH", f"/api/v1/keys/{key_id}", {"limits": {"rpm": 2}})
    assert status == 200, body
    assert body["limits"]["rpm"] == 2
    refused = await chat(proxy.session, proxy.url, key)
    assert refused.status == 429
    assert "limit of 2 requests per minute" in refused.error["message"]

    status, body = await proxy.admin("PATCH", f"/api/v1/keys/{key_id}", {"limits": {"rpm": None}})
    assert status == 200, body
    assert body["limits"]["rpm"] is None
    assert statuses(await burst(proxy.session, proxy.url, key, 20)) == {200: 20}


async def test_rate_limit_state_is_one_small_hash_per_scope_whatever_the_traffic(
    start_proxy: StartProxy, store: aioredis.Redis
) -> None:
    """A bucket is a number, not a log: 300 admitted requests leave two hashes of a few fields
    (one per scope), each expiring once it has had time to drain."""
    proxy = await start_proxy(clock=FakeClock(START))
    limits = {"rps": 10**6, "rpm": 10**6, "rpd": 10**9, "tpm": 10**9}
    await proxy.admin("PUT", f"/api/v1/orgs/{ORG}/limits", limits)
    key_id, key = await proxy.create_key(ORG, limits=limits)

    for _ in range(3):
        assert statuses(await burst(proxy.session, proxy.url, key, 100)) == {200: 100}

    rate_keys = sorted([k async for k in store.scan_iter(match=P + "rl:*")])
    assert rate_keys == [P + "rl:k:" + key_id, P + "rl:o"]
    for rate_key in rate_keys:
        state = await store.hgetall(rate_key)  # type: ignore[misc]
        assert set(state) == {"at", "rps", "rpm", "rpd", "tpm"}
        assert float(state["rpm"]) == 300  # frozen clock: nothing drained yet
        assert 0 < await store.pttl(rate_key) <= 86_400_000 + 1000  # the longest window
    used = [k async for k in store.scan_iter(match=P + "*") if "tpm" in k or "rl:" in k]
    assert len(used) == 2


async def test_a_refund_after_the_limit_was_removed_leaves_no_stale_level(
    start_proxy: StartProxy, store: aioredis.Redis
) -> None:
    proxy = await start_proxy(clock=FakeClock(START))
    key_id, key = await proxy.create_key(ORG, limits={"rpm": 100, "tpm": 5000})
    slow = asyncio.ensure_future(
        chat(proxy.session, proxy.url, key, max_tokens=400, headers={"x-mock-latency-ms": "700"})
    )
    rate_key = P + "rl:k:" + key_id

    async def reserved() -> bool:
        return float(await store.hget(rate_key, "tpm") or 0) > 400  # type: ignore[misc]

    await eventually(reserved, what="the slow request's reservation")
    await proxy.admin("PATCH", f"/api/v1/keys/{key_id}", {"limits": {"tpm": None}})
    assert (await chat(proxy.session, proxy.url, key)).status == 200  # drops the tpm level
    assert (await slow).status == 200  # settles: its refund has no level to go back to
    assert set(await store.hgetall(rate_key)) == {"at", "rpm"}  # type: ignore[misc]

    # Put back, the limit starts from an empty bucket, not from a refund credited to nothing.
    await proxy.admin("PATCH", f"/api/v1/keys/{key_id}", {"limits": {"tpm": 5000}})
    answer = await chat(proxy.session, proxy.url, key, max_tokens=400)
    reserve = 5000 - int(answer.headers["x-ratelimit-remaining-tokens"])
    assert 400 < reserve < 420


# --- 2. several processes, one Redis ---------------------------------------------------------


async def start_processes(config: Path, tmp_path: Path, n: int) -> list[ProxyProcess]:
    return list(
        await asyncio.gather(
            *(start_proxy_process(config, tmp_path / f"proxy-{i}.log") for i in range(n))
        )
    )


async def stop_processes(processes: list[ProxyProcess]) -> None:
    await asyncio.gather(*(asyncio.to_thread(process.stop) for process in processes))


async def create_key_at(
    session: aiohttp.ClientSession, base_url: str, limits: dict[str, int]
) -> tuple[str, str]:
    async with session.post(
        base_url + "/api/v1/keys",
        json={"org_id": ORG, "limits": limits},
        headers=auth(ADMIN_KEY),
    ) as response:
        body = await response.json()
        assert response.status == 201, body
        return body["id"], body["key"]


@pytest.mark.slow
async def test_two_processes_sharing_redis_admit_exactly_the_limit(
    tmp_path: Path, redis_url: str, mock_upstream: TestServer
) -> None:
    config = write_config(tmp_path / "proxy.toml", str(mock_upstream.make_url("/v1")), redis_url)
    processes = await start_processes(config, tmp_path, 2)
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            # Per hour, not per minute: on the real clock the bucket must not drain a slot
            # (one per 3 minutes) while the burst is in flight.
            _, key = await create_key_at(session, processes[0].url, {"rph": 20})
            answers = await asyncio.gather(
                *(chat(session, processes[i % 2].url, key) for i in range(200))
            )
            assert statuses(list(answers)) == {200: 20, 429: 180}
            assert len(mock_upstream.app[RECEIVED]) == 20
    finally:
        await stop_processes(processes)


# --- 3. tokens per minute --------------------------------------------------------------------


async def test_tokens_per_minute_reserves_then_refunds_at_settle(start_proxy: StartProxy) -> None:
    clock = FakeClock(START)
    proxy = await start_proxy(clock=clock)
    _, key = await proxy.create_key(ORG, limits={"tpm": 1000})
    short = {"x-mock-output-tokens": "3"}

    first = await chat(proxy.session, proxy.url, key, max_tokens=400, headers=short)
    assert first.status == 200
    assert first.headers["x-ratelimit-limit-tokens"] == "1000"
    # Admitted by its reservation: the prompt estimate plus max_tokens.
    reserve = 1000 - int(first.headers["x-ratelimit-remaining-tokens"])
    assert 400 < reserve < 420
    # The bucket drains 1000 tokens a minute: this reservation is gone after reserve * 60 ms.
    assert first.headers["x-ratelimit-reset-tokens"] == f"{reserve * 60 / 1000:g}s"
    used = [first.body["usage"]["total_tokens"]]
    assert used[0] < 20

    # Without the refund only two reservations of ~410 would fit in the minute; with it, each
    # settled request only keeps what it used.
    for _ in range(9):
        answer = await chat(proxy.session, proxy.url, key, max_tokens=400, headers=short)
        assert answer.status == 200
        assert int(answer.headers["x-ratelimit-remaining-tokens"]) == 1000 - sum(used) - reserve
        used.append(answer.body["usage"]["total_tokens"])
    assert 10 * reserve > 1000

    # A minute after START the bucket has drained everything the first ten left in it.
    clock.now = START + 60
    answer = await chat(proxy.session, proxy.url, key, max_tokens=400, headers=short)
    assert int(answer.headers["x-ratelimit-remaining-tokens"]) == 1000 - reserve


async def test_tokens_per_minute_counts_reservations_in_flight(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(clock=FakeClock(START))
    _, key = await proxy.create_key(ORG, limits={"tpm": 1000})
    slow = {"x-mock-output-tokens": "3", "x-mock-latency-ms": "1500"}

    answers = await burst(proxy.session, proxy.url, key, 6, max_tokens=400, headers=slow)
    assert statuses(answers) == {200: 2, 429: 4}
    admitted = [a for a in answers if a.status == 200]
    reserve = 1000 - max(int(a.headers["x-ratelimit-remaining-tokens"]) for a in admitted)
    assert 1000 // reserve == 2
    for answer in answers:
        if answer.status == 429:
            assert answer.error["type"] == "tokens"
            assert answer.error["code"] == "rate_limit_exceeded"
            assert "limit of 1000 tokens per minute" in answer.error["message"]
            # Until the two reservations have drained far enough for a third to fit.
            retry_ms = (3 * reserve - 1000) * 60
            assert answer.headers["retry-after-ms"] == str(retry_ms)
            assert answer.headers["Retry-After"] == str(math.ceil(retry_ms / 1000))
            assert answer.headers["x-should-retry"] == "true"
            assert answer.headers["x-ratelimit-limit-tokens"] == "1000"
            assert answer.headers["x-ratelimit-remaining-tokens"] == "0"

    # Both have settled (their answers arrived): only their actual usage still counts.
    used = sum(a.body["usage"]["total_tokens"] for a in admitted)
    after = await chat(proxy.session, proxy.url, key, max_tokens=400)
    assert after.status == 200
    assert int(after.headers["x-ratelimit-remaining-tokens"]) == 1000 - used - reserve


async def test_a_request_larger_than_tokens_per_minute_is_refused_for_good(
    start_proxy: StartProxy,
) -> None:
    proxy = await start_proxy(clock=FakeClock(START))
    _, key = await proxy.create_key(ORG, limits={"tpm": 1000})

    answer = await chat(proxy.session, proxy.url, key, max_tokens=1000)
    assert answer.status == 429
    assert answer.error["type"] == "tokens"
    assert answer.error["code"] == "rate_limit_exceeded"
    assert "reserves more tokens than the API key's limit of 1000" in answer.error["message"]
    assert answer.headers["x-should-retry"] == "false"
    assert "Retry-After" not in answer.headers
    assert len(proxy.received()) == 0

    # The refusal reserved nothing: a request that fits still gets the whole minute's tokens.
    fits = await chat(proxy.session, proxy.url, key, max_tokens=500)
    assert fits.status == 200
    assert 1000 - int(fits.headers["x-ratelimit-remaining-tokens"]) < 520


# --- 4. concurrency ---------------------------------------------------------------------------


async def test_concurrency_limit_holds_and_slots_always_come_back(
    start_proxy: StartProxy, store: aioredis.Redis
) -> None:
    proxy = await start_proxy(clock=FakeClock(START))
    key_id, key = await proxy.create_key(ORG, limits={"concurrency": 3})
    session, url = proxy.session, proxy.url

    # 20 at once: exactly 3 in flight, the rest refused at once.
    admitted, errors = await open_streams(session, url, key, 20, delay_ms=300, tokens=2)
    assert len(admitted) == 3
    assert len(errors) == 17
    for error in errors:
        assert error["code"] == "rate_limit_exceeded"
        assert error["type"] == "requests"
        assert "limit of 3 concurrent requests is reached (3 in use)" in error["message"]
    assert (await in_flight(store, key_id))["n"] == 3

    # Released on completion.
    for response in admitted:
        text = await response.text()
        assert "[DONE]" in text
        response.release()
    await no_slots_held(store, key_id)

    # Released when the client hangs up mid-stream.
    admitted, errors = await open_streams(session, url, key, 6, delay_ms=100, tokens=200)
    assert (len(admitted), len(errors)) == (3, 3)
    for response in admitted:
        assert (await response.content.readline()).startswith(b"data: ")
        response.close()
    await no_slots_held(store, key_id)

    # Released on upstream errors, buffered and streamed: more errors than slots, no 429.
    for stream in (False, True, False, True, False):
        failed = await chat(session, url, key, stream=stream, headers={"x-mock-status": "500"})
        assert failed.status == 500
        assert (await in_flight(store, key_id))["n"] == 0

    # Released when the upstream drops the stream half-way.
    broken_streams = [
        await session.post(
            url + CHAT,
            json=chat_body(stream=True),
            headers=auth(key, **{"x-mock-fail-after-chunks": "1"}),
        )
        for _ in range(4)
    ]
    for response in broken_streams:
        assert response.status == 200
        assert b"[DONE]" not in await response.read()
        response.release()
    await no_slots_held(store, key_id)

    # Still exactly 3, never more and never fewer.
    admitted, errors = await open_streams(session, url, key, 5, delay_ms=200, tokens=2)
    assert (len(admitted), len(errors)) == (3, 2)
    for response in admitted:
        assert "[DONE]" in await response.text()
        response.release()
    await no_slots_held(store, key_id)


@pytest.mark.slow
async def test_slots_of_a_killed_process_are_reclaimed_after_the_lease(
    tmp_path: Path,
    redis_url: str,
    mock_upstream: TestServer,
    start_proxy: StartProxy,
    store: aioredis.Redis,
) -> None:
    config = write_config(
        tmp_path / "proxy.toml",
        str(mock_upstream.make_url("/v1")),
        redis_url,
        limits="lease_seconds = 1",
    )
    [process] = await start_processes(config, tmp_path, 1)
    try:
        async with aiohttp.ClientSession() as session:
            key_id, key = await create_key_at(session, process.url, {"concurrency": 2})
            streams, errors = await open_streams(
                session, process.url, key, 2, delay_ms=100, tokens=300
            )
            assert (len(streams), len(errors)) == (2, 0)
            # A live stream renews its lease: well past lease_seconds it still holds its slot.
            opened = time.monotonic()
            while time.monotonic() - opened < 1.6:
                assert (await streams[0].content.readline()) != b""
            third = await chat(session, process.url, key)
            assert third.status == 429
            assert "concurrent requests" in third.error["message"]

            process.process.kill()
            await asyncio.to_thread(process.process.wait)
            for response in streams:
                response.close()
    finally:
        await stop_processes([process])
    assert (await in_flight(store, key_id))["n"] == 2  # nobody settled them

    # Another proxy, later than the dead one's leases: the next admission reclaims them.
    clock = FakeClock(time.time() + 2)
    proxy = await start_proxy(clock=clock)
    answer = await chat(proxy.session, proxy.url, key)
    assert answer.status == 200
    await no_slots_held(store, key_id)

    # And the limit is still exactly 2.
    admitted, errors = await open_streams(proxy.session, proxy.url, key, 4, delay_ms=200, tokens=2)
    assert (len(admitted), len(errors)) == (2, 2)
    for response in admitted:
        assert "[DONE]" in await response.text()
        response.release()
    await no_slots_held(store, key_id)


async def test_a_slow_buffered_request_keeps_its_slot_past_the_lease(
    start_proxy: StartProxy, store: aioredis.Redis
) -> None:
    clock = FakeClock(START)
    # The clock jumps past the lease below; the sweeper (which would see it expired before the
    # renewal catches up) runs only at start here.
    proxy = await start_proxy(clock=clock, limits={"lease_seconds": 1, "sweep_seconds": 3600})
    key_id, key = await proxy.create_key(ORG, limits={"concurrency": 1})

    slow = asyncio.create_task(
        chat(proxy.session, proxy.url, key, headers={"x-mock-latency-ms": "2000"})
    )

    async def admitted() -> bool:
        return (await in_flight(store, key_id))["n"] == 1

    await eventually(admitted, what="the slow request to be admitted")
    clock.advance(5)  # the request has now been in flight longer than lease_seconds

    async def renewed() -> bool:
        leases = await store.zrange(P + "leases", 0, -1, withscores=True)
        return bool(leases) and all(expiry > clock.now * 1000 for _, expiry in leases)

    # A live proxy keeps its request's lease ahead of the clock; give it a moment to do so.
    with contextlib.suppress(AssertionError):
        await eventually(renewed, within=1.0, what="the live request's lease to be renewed")
    second = await chat(proxy.session, proxy.url, key)
    assert (await slow).status == 200
    assert second.status == 429


async def test_a_stream_the_upstream_broke_reaches_the_client_broken(
    start_proxy: StartProxy, store: aioredis.Redis
) -> None:
    proxy = await start_proxy(clock=FakeClock(START))
    key_id, key = await proxy.create_key(ORG, limits={"concurrency": 1})
    client = proxy.openai(key)
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-mock-fail-after-chunks": "2"},
    )
    # Talking to the upstream directly, the SDK raises APIConnectionError here; through the
    # proxy an error event does as well (APIError), a clean end of stream does not.
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    await no_slots_held(store, key_id)


# --- 5. org limits and role defaults ----------------------------------------------------------


async def test_org_limits_are_shared_by_its_keys_and_no_one_else(
    start_proxy: StartProxy,
) -> None:
    proxy = await start_proxy(clock=FakeClock(START))
    status, body = await proxy.admin("PUT", f"/api/v1/orgs/{ORG}/limits", {"rpm": 4})
    assert status == 200, body
    assert body["limits"]["rpm"] == 4
    _, key_a = await proxy.create_key(ORG)
    _, key_b = await proxy.create_key(ORG)
    _, outsider = await proxy.create_key(OTHER_ORG)
    session, url = proxy.session, proxy.url

    both = await asyncio.gather(burst(session, url, key_a, 20), burst(session, url, key_b, 20))
    assert statuses(both[0] + both[1]) == {200: 4, 429: 36}
    refused = next(a for a in both[0] + both[1] if a.status == 429)
    assert "the organization's limit of 4 requests per minute" in refused.error["message"]
    assert refused.headers["x-ratelimit-limit-requests"] == "4"

    assert statuses(await burst(session, url, outsider, 20)) == {200: 20}

    status, body = await proxy.admin("GET", f"/api/v1/orgs/{ORG}/limits")
    assert status == 200
    assert body["limits"] == {
        "rps": None,
        "rpm": 4,
        "rph": None,
        "rpd": None,
        "tpm": None,
        "concurrency": None,
    }

    first = next(a for a in both[0] + both[1] if a.status == 200)
    assert first.headers["x-ratelimit-limit-requests"] == "4"

    # Replacing the org's limits with none lifts them.
    status, _ = await proxy.admin("PUT", f"/api/v1/orgs/{ORG}/limits", {})
    assert status == 200
    assert statuses(await burst(session, url, key_a, 10)) == {200: 10}


async def test_org_concurrency_and_tokens_are_shared_by_its_keys(
    start_proxy: StartProxy, store: aioredis.Redis
) -> None:
    proxy = await start_proxy(clock=FakeClock(START))
    status, _ = await proxy.admin(
        "PUT", f"/api/v1/orgs/{ORG}/limits", {"concurrency": 2, "tpm": 1000}
    )
    assert status == 200
    id_a, key_a = await proxy.create_key(ORG)
    id_b, key_b = await proxy.create_key(ORG)
    session, url = proxy.session, proxy.url

    # Tokens per minute of the org: what key A used is gone for key B too.
    short = {"x-mock-output-tokens": "3"}
    answer_a = await chat(session, url, key_a, max_tokens=400, headers=short)
    assert answer_a.headers["x-ratelimit-limit-tokens"] == "1000"
    reserve = 1000 - int(answer_a.headers["x-ratelimit-remaining-tokens"])
    answer_b = await chat(session, url, key_b, max_tokens=400, headers=short)
    used_a = answer_a.body["usage"]["total_tokens"]
    assert int(answer_b.headers["x-ratelimit-remaining-tokens"]) == 1000 - used_a - reserve

    # Concurrency of the org: two slots for both keys together.
    opened = await asyncio.gather(
        open_streams(session, url, key_a, 3, delay_ms=150, tokens=2),
        open_streams(session, url, key_b, 3, delay_ms=150, tokens=2),
    )
    admitted = opened[0][0] + opened[1][0]
    errors = opened[0][1] + opened[1][1]
    assert (len(admitted), len(errors)) == (2, 4)
    assert all("organization's limit of 2 concurrent" in e["message"] for e in errors)
    for response in admitted:
        assert "[DONE]" in await response.text()
        response.release()
    await no_slots_held(store, id_a)
    await no_slots_held(store, id_b)


async def test_org_and_key_limits_both_apply_and_the_tightest_is_reported(
    start_proxy: StartProxy,
) -> None:
    proxy = await start_proxy(clock=FakeClock(START))
    await proxy.admin("PUT", f"/api/v1/orgs/{ORG}/limits", {"rpm": 10})
    _, key = await proxy.create_key(ORG, limits={"rpm": 3})

    first = await chat(proxy.session, proxy.url, key)
    assert first.headers["x-ratelimit-limit-requests"] == "3"
    assert first.headers["x-ratelimit-remaining-requests"] == "2"
    answers = await burst(proxy.session, proxy.url, key, 5)
    assert statuses(answers) == {200: 2, 429: 3}
    refused = next(a for a in answers if a.status == 429)
    assert "the API key's limit of 3 requests per minute" in refused.error["message"]


async def test_role_defaults_apply_when_the_key_has_no_limit_of_its_own(
    start_proxy: StartProxy,
) -> None:
    proxy = await start_proxy(clock=FakeClock(START), limits={"defaults": {"member": {"rpm": 3}}})
    plain_id, plain = await proxy.create_key(ORG)
    _, own = await proxy.create_key(ORG, limits={"rpm": 6})
    _, admin = await proxy.create_key(ORG, role="org_admin")
    session, url = proxy.session, proxy.url

    answers = await burst(session, url, plain, 10)
    assert statuses(answers) == {200: 3, 429: 7}
    assert all(a.headers["x-ratelimit-limit-requests"] == "3" for a in answers)
    assert statuses(await burst(session, url, own, 10)) == {200: 6, 429: 4}
    assert statuses(await burst(session, url, admin, 10)) == {200: 10}

    # Giving the key its own limit overrides the default at once; clearing it restores it.
    await proxy.admin("PATCH", f"/api/v1/keys/{plain_id}", {"limits": {"rpm": 5}})
    assert statuses(await burst(session, url, plain, 10)) == {200: 2, 429: 8}
    await proxy.admin("PATCH", f"/api/v1/keys/{plain_id}", {"limits": {"rpm": None}})
    refused = await chat(session, url, plain)
    assert refused.status == 429
    assert "limit of 3 requests per minute" in refused.error["message"]


# --- 6. headers ---------------------------------------------------------------------------


async def test_admitted_answers_carry_rate_limit_headers(start_proxy: StartProxy) -> None:
    clock = FakeClock(START)
    proxy = await start_proxy(clock=clock)
    _, key = await proxy.create_key(ORG, limits={"rpm": 5})

    # One request every 1.5 s against a bucket that drains one per 12 s: the level after each
    # admission is 1 + 0.875 * index, and the reset is the time to drain it completely.
    expected_resets = ["12s", "22.5s", "33s", "43.5s", "54s"]
    for index, reset in enumerate(expected_resets):
        answer = await chat(proxy.session, proxy.url, key)
        assert answer.status == 200
        remaining = 4 - index
        assert answer.headers["x-ratelimit-limit-requests"] == "5"
        assert answer.headers["x-ratelimit-remaining-requests"] == str(remaining)
        assert answer.headers["x-ratelimit-reset-requests"] == reset
        assert answer.headers["RateLimit-Policy"] == '"requests";q=5;w=60'
        seconds = math.ceil((1 + 0.875 * index) * 12)
        assert answer.headers["RateLimit"] == f'"requests";r={remaining};t={seconds}'
        assert "x-ratelimit-limit-tokens" not in answer.headers
        clock.advance(1.5)

    refused = await chat(proxy.session, proxy.url, key)  # at START + 7.5, level 4.375
    assert refused.status == 429
    assert refused.headers["retry-after-ms"] == "4500"
    assert refused.headers["Retry-After"] == "5"
    assert refused.headers["x-should-retry"] == "true"
    assert refused.headers["x-ratelimit-limit-requests"] == "5"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert "Try again in 5s." in refused.error["message"]
    # Issue 11 item 7: one meaning on admitted and refused answers. The reset is when the
    # bucket is empty (4.375 requests drained at one per 12 s), not the retry time; the
    # policy names its window on both.
    assert refused.headers["x-ratelimit-reset-requests"] == "52.5s"
    assert refused.headers["RateLimit-Policy"] == '"requests";q=5;w=60'
    assert refused.headers["RateLimit"] == '"requests";r=0;t=53'


async def test_no_rate_limit_headers_without_limits(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(clock=FakeClock(START))
    _, key = await proxy.create_key(ORG)

    answers = await burst(proxy.session, proxy.url, key, 30)
    assert statuses(answers) == {200: 30}
    for answer in answers:
        assert rate_headers(answer.headers) == []
    streamed = await chat(proxy.session, proxy.url, key, stream=True)
    assert streamed.status == 200
    assert rate_headers(streamed.headers) == []


async def test_streamed_answers_carry_the_headers_too(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(clock=FakeClock(START))
    _, key = await proxy.create_key(ORG, limits={"rps": 2, "tpm": 5000})

    answer = await chat(proxy.session, proxy.url, key, stream=True)
    assert answer.status == 200
    assert answer.headers["x-ratelimit-limit-requests"] == "2"
    assert answer.headers["x-ratelimit-remaining-requests"] == "1"
    assert answer.headers["x-ratelimit-reset-requests"] == "500ms"
    assert answer.headers["x-ratelimit-limit-tokens"] == "5000"
    assert answer.headers["RateLimit-Policy"] == '"requests";q=2;w=1, "tokens";q=5000;w=60'
    assert answer.headers["RateLimit"].startswith('"requests";r=1;t=1, "tokens";r=')


# --- 7. the official openai client ------------------------------------------------------------


async def test_openai_client_sees_rate_limit_error_with_the_proxys_message(
    start_proxy: StartProxy,
) -> None:
    proxy = await start_proxy(clock=FakeClock(START))
    _, key = await proxy.create_key(ORG, limits={"rpm": 2})
    client = proxy.openai(key)
    for _ in range(2):
        await client.chat.completions.create(model=MODEL, messages=MESSAGES)

    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    err = caught.value
    assert err.status_code == 429
    assert err.code == "rate_limit_exceeded"
    assert err.type == "requests"
    assert "limit of 2 requests per minute" in err.message
    assert isinstance(err.body, dict)
    assert "limit of 2 requests per minute" in err.body["message"]
    assert err.response.headers["retry-after"] == "30"  # one of 2 per minute drains in 30 s


async def test_openai_client_retries_a_per_second_refusal_and_succeeds(
    start_proxy: StartProxy,
) -> None:
    clock = FakeClock(START)
    proxy = await start_proxy(clock=clock)
    _, key = await proxy.create_key(ORG, limits={"rps": 1})
    counter = AttemptCounter(clock)
    client = counter.client(proxy, key, max_retries=2)

    await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    clock.now = START + 0.75
    counter.attempts = 0
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=MESSAGES,
    )
    # First attempt: 429 with retry-after-ms 250 and x-should-retry true; the SDK waited that
    # long (the hook moved the proxy's clock by it) and its retry got in.
    assert raw.http_response.status_code == 200
    assert counter.attempts == 2
    assert clock.now == START + 1


async def test_openai_client_does_not_retry_a_per_day_refusal(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(clock=FakeClock(START))
    _, key = await proxy.create_key(ORG, limits={"rpd": 1})
    counter = AttemptCounter()
    client = counter.client(proxy, key, max_retries=2)
    await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    counter.attempts = 0

    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert counter.attempts == 1  # refused once, never retried
    headers = caught.value.response.headers
    assert headers["x-should-retry"] == "false"
    assert headers["retry-after"] == "86400"
    assert "limit of 1 requests per day" in caught.value.message


async def test_openai_client_does_not_retry_budget_exhaustion(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(clock=FakeClock(START))
    key_id, key = await proxy.create_key(ORG)
    status, body = await proxy.admin(
        "PUT",
        f"/api/v1/llm/budgets/apikey/{key_id}",
        {
            "period": "daily",
            "limit_kind": "tokens",
            "limit": 100,
            "thresholds": [{"pct": 100, "action": "block"}],
        },
    )
    assert status == 200, body
    counter = AttemptCounter()
    client = counter.client(proxy, key, max_retries=2)

    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=400,
        )
    assert counter.attempts == 1
    assert caught.value.code == "budget_exceeded"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(proxy.received()) == 0


# --- 8. validation and cost of refusals -------------------------------------------------------

BAD_LIMITS: list[tuple[str, Any]] = [
    ("rpm", 0),
    ("rpm", -1),
    ("rpm", "10"),
    ("rpm", 1.5),
    ("rpm", True),
    ("tpm", 0),
    ("concurrency", -3),
    ("burst", 5),
]


@pytest.mark.parametrize(("field", "value"), BAD_LIMITS)
async def test_invalid_key_limits_are_refused_naming_the_field(
    proxy: Proxy, field: str, value: Any
) -> None:
    status, body = await proxy.admin(
        "POST", "/api/v1/keys", {"org_id": ORG, "limits": {field: value}}
    )
    assert status == 400, body
    assert body["error"]["param"] == f"limits.{field}"
    assert body["error"]["type"] == "invalid_request_error"
    status, listing = await proxy.admin("GET", f"/api/v1/keys?org_id={ORG}")
    assert status == 200
    assert listing["data"] == []  # nothing was created

    key_id, _ = await proxy.create_key(ORG, limits={"rpm": 7})
    status, body = await proxy.admin("PATCH", f"/api/v1/keys/{key_id}", {"limits": {field: value}})
    assert status == 400, body
    assert body["error"]["param"] == f"limits.{field}"
    status, record = await proxy.admin("GET", f"/api/v1/keys/{key_id}")
    assert record["limits"]["rpm"] == 7


@pytest.mark.parametrize(("field", "value"), BAD_LIMITS)
async def test_invalid_org_limits_are_refused_naming_the_field(
    proxy: Proxy, field: str, value: Any
) -> None:
    path = f"/api/v1/orgs/{ORG}/limits"
    status, _ = await proxy.admin("PUT", path, {"rpm": 9})
    assert status == 200
    status, body = await proxy.admin("PUT", path, {field: value})
    assert status == 400, body
    assert body["error"]["param"] == field
    status, current = await proxy.admin("GET", path)
    assert current["limits"]["rpm"] == 9  # unchanged


async def test_only_cluster_admins_set_org_limits(proxy: Proxy) -> None:
    _, org_admin = await proxy.create_key(ORG, role="org_admin")
    _, member = await proxy.create_key(ORG)
    path = f"/api/v1/orgs/{ORG}/limits"

    status, body = await proxy.admin("PUT", path, {"rpm": 1}, key=org_admin)
    assert status == 403, body
    status, body = await proxy.admin("GET", path, key=org_admin)
    assert status == 200
    assert body["limits"]["rpm"] is None  # the refused PUT changed nothing
    status, _ = await proxy.admin("PUT", f"/api/v1/orgs/{OTHER_ORG}/limits", {}, key=org_admin)
    assert status == 404
    status, _ = await proxy.admin("GET", path, key=member)
    assert status == 403
    status, _ = await proxy.admin("PUT", path, {"rpm": 1}, key=member)
    assert status == 403


async def test_refused_requests_cost_nothing(
    start_proxy: StartProxy, store: aioredis.Redis
) -> None:
    proxy = await start_proxy(clock=FakeClock(START))
    key_id, key = await proxy.create_key(ORG, limits={"rpm": 2})
    budget_path = f"/api/v1/llm/budgets/apikey/{key_id}"
    status, body = await proxy.admin(
        "PUT",
        budget_path,
        {
            "period": "daily",
            "limit_kind": "tokens",
            "limit": 1_000_000,
            "thresholds": [{"pct": 50, "action": "alert"}],
        },
    )
    assert status == 200, body

    answers = await burst(proxy.session, proxy.url, key, 10)
    assert statuses(answers) == {200: 2, 429: 8}
    used = sum(a.body["usage"]["total_tokens"] for a in answers if a.status == 200)

    status, body = await proxy.admin("GET", budget_path)
    assert status == 200
    [budget] = body["data"]
    assert budget["spend"]["tokens_spent"] == str(used)
    assert len(proxy.received()) == 2
    await no_slots_held(store, key_id)


async def test_a_refusal_by_one_limit_uses_none_of_the_others(
    start_proxy: StartProxy, store: aioredis.Redis
) -> None:
    proxy = await start_proxy(clock=FakeClock(START))
    key_id, key = await proxy.create_key(ORG, limits={"rpm": 5, "concurrency": 1})
    session, url = proxy.session, proxy.url

    [holder], errors = await open_streams(session, url, key, 1, delay_ms=150, tokens=3)
    assert errors == []
    refused = await burst(session, url, key, 10)
    assert statuses(refused) == {429: 10}
    assert all("concurrent requests" in a.error["message"] for a in refused)
    assert "[DONE]" in await holder.text()
    holder.release()
    await no_slots_held(store, key_id)

    # The ten refusals took none of the minute's five requests: four are left after the one
    # that held the slot.
    answers = [await chat(session, url, key) for _ in range(5)]
    assert [a.status for a in answers] == [200, 200, 200, 200, 429]
    remaining = [a.headers["x-ratelimit-remaining-requests"] for a in answers[:4]]
    assert remaining == ["3", "2", "1", "0"]
    assert "limit of 5 requests per minute" in answers[4].error["message"]
