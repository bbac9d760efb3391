"""Settles batched per org: the settles of one org handed over in one turn of the event loop
go to Redis in one script call.

Why: a settle's own work in Redis is small next to what every script call costs (reading the
command, finding the script, setting up Lua); under load several requests of an org finish in
the same loop turn (their upstream answers arrive in one poll), and ``lua/settle_batch.lua``
settles them in one call. Nothing waits on purpose: the call leaves at the end of the turn, as
a lone call would (the pipelined link sends a turn's calls together anyway), so batching adds
no latency. An earlier version also held an org's settles while its previous call was in
flight: batches were ~14 settles, but each settle waited up to a round trip more, which added
~0.6 ms at the same load (docs/benchmark.md).

Exactness: each item is the very settle a lone call would run (``settle_one.lua``), in arrival
order, idempotent by request id; a batch whose reply is lost fails every item with the same
error, so each goes to the spool and is replayed (a replay of a settle that landed is a no-op).
Read-your-writes holds as before: a request's settle is awaited before its handler returns, so
its spend is in Redis before the client has the whole answer.

The calls run in a task of their own per org, so a client that goes away while its settle
waits cancels only its own wait, never the settle nor the others in the batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from redis.exceptions import ResponseError

if TYPE_CHECKING:  # the spool's record type only: the ledger does not import the gateway
    from proxy.gateway.settle_spool import SettleRequest

MAX_BATCH = 32
"""Settles per call at most: bounds the time one script holds Redis (about 40 µs a settle)."""

RunOne = Callable[["SettleRequest"], Awaitable[int]]
RunMany = Callable[[str, list["SettleRequest"]], Awaitable[list[int | str | bytes]]]


class SettleBatcher:
    def __init__(self, run_one: RunOne, run_many: RunMany, max_batch: int = MAX_BATCH) -> None:
        self._run_one = run_one
        self._run_many = run_many
        self._max = max_batch
        self._waiting: dict[str, list[tuple[SettleRequest, asyncio.Future[int]]]] = {}
        self._sending: set[asyncio.Task[None]] = set()
        self.calls = 0
        """Script calls made (a lone settle or a batch): what the benchmark counts."""

    def __len__(self) -> int:
        return sum(len(items) for items in self._waiting.values())

    async def settle(self, req: SettleRequest) -> int:
        """The settle's result, as ``lua/settle.lua`` returns it; raises what its call raised
        (the caller spools a settle Redis did not take)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int] = loop.create_future()
        waiting = self._waiting.get(req.org_id)
        if waiting is None:
            self._waiting[req.org_id] = [(req, done)]
            loop.call_soon(self._flush, req.org_id)
        else:
            waiting.append((req, done))
        return await done

    def _flush(self, org_id: str) -> None:
        """At the end of the loop turn the org's first settle came in: what came in with it
        leaves together (in calls of at most ``max_batch``)."""
        items = self._waiting.pop(org_id)
        for at in range(0, len(items), self._max):
            task = asyncio.ensure_future(self._send(org_id, items[at : at + self._max]))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(
        self, org_id: str, items: list[tuple[SettleRequest, asyncio.Future[int]]]
    ) -> None:
        self.calls += 1
        try:
            if len(items) == 1:
                results: list[int | str | bytes] = [await self._run_one(items[0][0])]
            else:
                results = await self._run_many(org_id, [req for req, _ in items])
        except asyncio.CancelledError:
            for _, done in items:
                done.cancel()
            raise
        except Exception as exc:  # every waiter gets it, and spools its settle
            for _, done in items:
                if not done.done():
                    done.set_exception(exc)
            return
        for (_, done), result in zip(items, results, strict=True):
            if done.done():  # its client left: the settle ran all the same
                continue
            if isinstance(result, int):
                done.set_result(result)
            else:
                text = result.decode() if isinstance(result, bytes) else str(result)
                done.set_exception(ResponseError(text))

    async def wait_idle(self) -> None:
        """Until every settle handed over has had its call (at shutdown)."""
        while self._sending or self._waiting:
            await asyncio.gather(*self._sending, asyncio.sleep(0), return_exceptions=True)
