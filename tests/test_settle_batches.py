"""SettleBatcher without Redis: settles of one org handed over in one loop turn go together, a
later turn's go in a call of their own (never waiting for an earlier call), and what a waiter
that leaves, a failed call and an item Redis refused do to the others."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from proxy.gateway.settle_spool import SettleRequest
from proxy.ledger.settle_batches import SettleBatcher


async def turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def req(rid: str, org: str = "o1") -> SettleRequest:
    return SettleRequest(
        org_id=org, request_id=rid, key_id="k", tokens=1, cost_nano=1, at=0.0, usage_record=[]
    )


class FakeRedis:
    """Records every call; each takes one loop turn (a gate while ``hold`` is set)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.hold = asyncio.Event()
        self.hold.set()
        self.fail: BaseException | None = None
        self.refuse: set[str] = set()

    async def one(self, r: SettleRequest) -> int:
        self.calls.append((r.org_id, [r.request_id]))
        await self.hold.wait()
        if self.fail is not None:
            raise self.fail
        return 0

    async def many(self, org: str, reqs: list[SettleRequest]) -> list[int | str | bytes]:
        self.calls.append((org, [r.request_id for r in reqs]))
        await self.hold.wait()
        if self.fail is not None:
            raise self.fail
        return [b"settle: bad" if r.request_id in self.refuse else 1 for r in reqs]


async def test_one_turns_settles_go_together_and_never_wait_for_an_earlier_call() -> None:
    redis = FakeRedis()
    batcher = SettleBatcher(redis.one, redis.many, max_batch=3)
    redis.hold.clear()
    first = asyncio.ensure_future(batcher.settle(req("r1")))
    await turns()
    assert redis.calls == [("o1", ["r1"])]
    rest = [asyncio.ensure_future(batcher.settle(req(f"r{i}"))) for i in range(2, 7)]
    other_org = asyncio.ensure_future(batcher.settle(req("x1", org="o2")))
    await turns()
    # Sent while r1's call is still unanswered: nothing waits for an earlier call.
    assert redis.calls == [
        ("o1", ["r1"]),
        ("o1", ["r2", "r3", "r4"]),  # at most max_batch to a call, in arrival order
        ("o1", ["r5", "r6"]),
        ("o2", ["x1"]),
    ]
    redis.hold.set()
    assert await first == 0
    assert await asyncio.gather(*rest) == [1] * 5
    assert await other_org == 0
    assert batcher.calls == 4 and len(batcher) == 0


async def test_a_waiter_that_leaves_does_not_cancel_the_batch() -> None:
    redis = FakeRedis()
    batcher = SettleBatcher(redis.one, redis.many)
    redis.hold.clear()
    first = asyncio.ensure_future(batcher.settle(req("r1")))
    await turns()
    leaving = asyncio.ensure_future(batcher.settle(req("r2")))
    staying = asyncio.ensure_future(batcher.settle(req("r3")))
    await turns()
    leaving.cancel()
    redis.hold.set()
    assert await first == 0 and await staying == 1
    assert leaving.cancelled()
    assert redis.calls[-1] == ("o1", ["r2", "r3"])  # the left client's settle ran all the same


async def test_a_failed_call_fails_every_item_and_a_refused_item_only_itself() -> None:
    redis = FakeRedis()
    batcher = SettleBatcher(redis.one, redis.many)
    redis.hold.clear()
    first = asyncio.ensure_future(batcher.settle(req("r1")))
    await turns()
    batch = [asyncio.ensure_future(batcher.settle(req(f"r{i}"))) for i in (2, 3)]
    await turns()
    redis.fail = RedisConnectionError("gone")
    redis.hold.set()
    for waiter in (first, *batch):
        with pytest.raises(RedisConnectionError):
            await waiter
    redis.fail = None
    redis.refuse = {"r5"}
    redis.hold.clear()
    lone = asyncio.ensure_future(batcher.settle(req("r4")))
    await turns()
    refused = asyncio.ensure_future(batcher.settle(req("r5")))
    fine = asyncio.ensure_future(batcher.settle(req("r6")))
    await turns()
    redis.hold.set()
    assert await lone == 0 and await fine == 1
    with pytest.raises(ResponseError, match="settle: bad"):
        await refused
    await batcher.wait_idle()
