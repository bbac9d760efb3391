"""The clients: closed loop (next request when the answer arrives) or open loop (due on a
fixed ``--rate`` schedule, late starts counted), for a fixed time or number of requests."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import aiohttp

from proxy.catalog.pricing import (
    Price,
    cost_nano,
)
from proxy.tools.loadtest.plan import LATE_START_S, MAX_DURATION_S, WAKE_EARLY_S, Plan
from proxy.tools.loadtest.tally import (
    KeyUsage,
    Tally,
    anthropic_usage_of_stream,
    count,
    error_code,
    usage_of_body,
    usage_of_stream,
)


class Runner:
    """The load itself: ``concurrency`` coroutines taking request numbers until the plan ends."""

    def __init__(self, plan: Plan, price: Price | None, progress_every: float = 0.0) -> None:
        self.plan = plan
        self.price = price
        self._progress_every = progress_every
        self.tally = Tally(per_key=[KeyUsage() for _ in plan.keys])
        self._url = plan.url.rstrip("/") + plan.path
        self._bodies = (plan.body(False), plan.body(True))
        self._headers = [plan.headers(key) for key in plan.keys]
        self._stop = False
        self._next = 0
        self._started = 0.0
        self._limit_s = 0.0
        self._deadline = 0.0
        self._stopped: asyncio.Future[None] | None = None

    def stop(self) -> None:
        """Graceful: no new requests; those in flight finish and are counted."""
        self._stop = True
        self.tally.interrupted = True
        # Clients waiting for a fixed-rate slot (up to concurrency / rate ahead) end now.
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    def _ticket(self) -> int | None:
        """The next request number, or None once the plan is done. With a rate, a request due
        at or after the deadline is never issued, however early a client asks for it."""
        if self._stop or time.perf_counter() >= self._deadline:
            return None
        n = self._next
        if self.plan.requests is not None and n >= self.plan.requests:
            return None
        if self.plan.rate is not None and n / self.plan.rate >= self._limit_s:
            return None
        self._next = n + 1
        return n

    async def run(self) -> Tally:
        plan = self.plan
        connector = aiohttp.TCPConnector(limit=plan.concurrency, limit_per_host=0)
        timeout = aiohttp.ClientTimeout(total=plan.timeout)
        self._stopped = asyncio.get_running_loop().create_future()
        if self._stop:
            self._stopped.set_result(None)
        started = self._started = time.perf_counter()
        self._limit_s = plan.duration or MAX_DURATION_S
        self._deadline = started + self._limit_s
        progress = (
            asyncio.create_task(self._progress(self._progress_every))
            if self._progress_every > 0
            else None
        )
        try:
            async with aiohttp.ClientSession(
                connector=connector, timeout=timeout, auto_decompress=False
            ) as session:
                await asyncio.gather(*(self._client(session) for _ in range(plan.concurrency)))
        finally:
            if progress is not None:
                progress.cancel()
        self.tally.elapsed = time.perf_counter() - started
        return self.tally

    async def _progress(self, every: float) -> None:
        """A line on stderr every ``every`` seconds while the load runs (stdout keeps the
        report alone): elapsed, answers so far and the rate of the last interval."""
        tally = self.tally
        last_done, last_at = 0, self._started
        while True:
            await asyncio.sleep(every)
            now = time.perf_counter()
            done = sum(tally.statuses.values()) + sum(tally.transport_errors.values())
            refused = tally.statuses.get(429, 0)
            failed = done - tally.statuses.get(200, 0) - refused
            rate = (done - last_done) / max(now - last_at, 1e-9)
            if self.plan.requests is not None:
                where = f"{now - self._started:5.1f} s  {done:,}/{self.plan.requests:,} answered"
            else:
                where = f"{now - self._started:5.1f}/{self._limit_s:g} s  {done:,} answered"
            print(
                f"loadtest: {where} ({rate:,.0f} req/s)  ok {tally.statuses.get(200, 0):,}"
                f"  refused {refused:,}  failed {failed:,}",
                file=sys.stderr,
                flush=True,
            )
            last_done, last_at = done, now

    async def _client(self, session: aiohttp.ClientSession) -> None:
        rate = self.plan.rate
        stopped = self._stopped
        assert stopped is not None
        while (n := self._ticket()) is not None:
            due: float | None = None
            if rate is not None:
                due = self._started + n / rate
                delay = due - WAKE_EARLY_S - time.perf_counter()
                if delay > 0:
                    # A timed wait that Ctrl-C (``stop``) cuts short; no polling.
                    await asyncio.wait((stopped,), timeout=delay)
                    if self._stop:
                        return
            index = n % len(self._headers)
            stream = self.plan.streamed(n)
            await self._one(session, index, stream, due)

    async def _one(
        self, session: aiohttp.ClientSession, index: int, stream: bool, due: float | None
    ) -> None:
        """Send one request and tally it. Latency counts from ``due`` when the request had a
        scheduled time: a request that went out late (all clients busy) was waiting on the
        system under test, so hiding that wait would be coordinated omission."""
        tally = self.tally
        first_byte = 0.0
        start = time.perf_counter()
        tally.sent += 1
        if due is not None:
            tally.last_send = start - self._started
            if start - due > LATE_START_S:
                tally.late_starts += 1
            # Sent ahead of time (the early wake-up): latency counts from the actual send.
            start = min(start, due)
        try:
            async with session.post(
                self._url, data=self._bodies[stream], headers=self._headers[index]
            ) as response:
                status = response.status
                if stream and status == 200:
                    parts = bytearray()
                    async for chunk in response.content.iter_any():
                        if not first_byte:
                            first_byte = time.perf_counter() - start
                        parts += chunk
                    data = bytes(parts)
                else:
                    data = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            tally.transport_errors[type(exc).__name__] += 1
            return
        elapsed = time.perf_counter() - start
        tally.statuses[status] += 1
        tally.latency_all.append(elapsed)
        if status != 200:
            tally.reasons[error_code(status, data)] += 1
            return
        if stream:
            tally.latency_streamed.append(elapsed)
            tally.first_byte_streamed.append(first_byte or elapsed)
            anthropic = self.plan.api == "anthropic"
            usage = anthropic_usage_of_stream(data) if anthropic else usage_of_stream(data)
        else:
            tally.latency_buffered.append(elapsed)
            usage = usage_of_body(data)
        if usage is None:
            tally.usage_missing += 1
            return
        key = tally.per_key[index]
        key.requests += 1
        if self.plan.api == "anthropic":
            self._add_anthropic(key, usage)
            return
        prompt = count(usage.get("prompt_tokens"))
        completion = count(usage.get("completion_tokens"))
        details = usage.get("prompt_tokens_details")
        cached = count(details.get("cached_tokens")) if isinstance(details, dict) else 0
        key.prompt_tokens += prompt
        key.completion_tokens += completion
        key.cached_tokens += cached
        if self.price is not None:
            key.cost_nano += cost_nano(self.price, prompt, completion, cached)

    def _add_anthropic(self, key: KeyUsage, usage: dict[str, Any]) -> None:
        """Anthropic's ``input_tokens`` exclude cache reads and writes: the prompt is all three."""
        read = count(usage.get("cache_read_input_tokens"))
        writes = count(usage.get("cache_creation_input_tokens"))
        creation = usage.get("cache_creation")
        one_hour = (
            min(count(creation.get("ephemeral_1h_input_tokens")), writes)
            if isinstance(creation, dict)
            else 0
        )
        prompt = count(usage.get("input_tokens")) + read + writes
        completion = count(usage.get("output_tokens"))
        key.prompt_tokens += prompt
        key.completion_tokens += completion
        key.cached_tokens += read
        key.cache_write_tokens += writes
        if self.price is not None:
            key.cost_nano += cost_nano(
                self.price, prompt, completion, read, writes - one_hour, one_hour
            )


# --- reconciliation through the admin and budget APIs --------------------------------------------
