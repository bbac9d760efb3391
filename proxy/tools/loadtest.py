"""``llm-proxy loadtest``: drive a deployment with concurrent clients, then reconcile spend.

N client coroutines share one pooled aiohttp session and send chat completions (or, with
``--api anthropic``, Anthropic Messages requests) over M keys, buffered or streamed, for a
fixed time or a fixed number of requests (both capped, so a run always ends by itself). By
default each client sends its next request when the previous answer arrives (closed loop:
latency at saturation, mostly queueing); with ``--rate`` requests are due on a fixed schedule
instead (open loop), so two deployments can be compared at the same load.
The report gives throughput, latency percentiles, status counts and rejections by
``error.code``, and checks the accounting end to end: the tokens and cost the upstream reported
(its ``usage``, incl. the final usage chunk of streams) against what the proxy recorded (the
spend the budget API shows for each key, read before and after the run).

Reading spend needs an admin key (``--admin-key`` or ``PROXY_ADMIN_KEY``): it maps keys to their
ids and, for a key with no budget, adds a temporary alert-only budget so the spend is visible
(removed afterwards). Without one the run is reported unreconciled. The client is meant to be
cheap (request bodies built once, only usage-bearing stream chunks parsed) because it usually
shares the machine with what it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import sys
import time
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

import aiohttp

from proxy.config import PriceConfig
from proxy.gateway.pricing import (
    Price,
    cost_nano,
    lookup_price,
    price_from_config,
    with_cache_writes,
)
from proxy.tools.mock import WORDS

MAX_DURATION_S = 3600.0
"""Longest run, also the time cap of a ``--requests`` run: the tool must stop by itself."""
MAX_REQUESTS = 1_000_000
MAX_CONCURRENCY = 2048
MAX_CREATED_KEYS = 1000
MAX_PROMPT_TOKENS = 500_000
MAX_RATE = 100_000.0
LATE_START_S = 0.001
"""A fixed-rate request sent later than this after its scheduled time counts as a late start."""
WAKE_EARLY_S = 0.001
"""Event-loop timers are only as fine as a millisecond (epoll rounds the wait up, uvloop to the
nearest ms): waking this much early keeps timer noise out of the late starts."""
CHAT_PATH = "/v1/chat/completions"
MESSAGES_PATH = "/v1/messages"
Api = Literal["openai", "anthropic"]
ADMIN_KEY_ENV = "PROXY_ADMIN_KEY"
_CHAT_FRAMING_TOKENS = 7
"""One user message costs its text + 4 framing tokens + 3 reply-priming tokens."""
_USAGE_NULL = re.compile(rb'"usage"\s*:\s*null')
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


class LoadtestError(Exception):
    """A setup problem the user must fix; reported in one line, exit status 2."""


@dataclass(frozen=True)
class LoadKey:
    secret: str
    key_id: str | None = None


@dataclass(frozen=True)
class Plan:
    """What to send, how hard and for how long."""

    url: str
    keys: tuple[LoadKey, ...]
    concurrency: int = 16
    duration: float | None = 10.0
    requests: int | None = None
    stream_ratio: float = 0.0
    model: str = "gpt-4o-mini"
    max_tokens: int = 16
    prompt: str = ""
    timeout: float = 60.0
    rate: float | None = None
    """Requests per second on a fixed schedule (open loop); None: closed loop."""
    api: Api = "openai"
    """``anthropic``: POST /v1/messages with the key as ``x-api-key``."""

    def __post_init__(self) -> None:
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise LoadtestError(f"--concurrency must be 1..{MAX_CONCURRENCY}")
        if (self.duration is None) == (self.requests is None):
            raise LoadtestError("give exactly one of --duration and --requests")
        if self.duration is not None and not 0 < self.duration <= MAX_DURATION_S:
            raise LoadtestError(f"--duration must be in (0, {MAX_DURATION_S:g}] seconds")
        if self.requests is not None and not 1 <= self.requests <= MAX_REQUESTS:
            raise LoadtestError(f"--requests must be 1..{MAX_REQUESTS}")
        if not 0.0 <= self.stream_ratio <= 1.0:
            raise LoadtestError("--stream-ratio must be between 0 and 1")
        if self.max_tokens < 1:
            raise LoadtestError("--max-tokens must be positive")
        if self.timeout <= 0:
            raise LoadtestError("--timeout must be positive")
        if self.rate is not None:
            # Written so that NaN fails too.
            if not 0 < self.rate <= MAX_RATE:
                raise LoadtestError(f"--rate must be in (0, {MAX_RATE:g}] requests per second")
            if self.requests is not None and (self.requests - 1) / self.rate >= MAX_DURATION_S:
                raise LoadtestError(
                    f"--requests {self.requests} at --rate {self.rate:g} would take longer "
                    f"than the {MAX_DURATION_S:g} s a run may last"
                )

    def body(self, stream: bool) -> bytes:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": self.prompt}],
            "max_tokens": self.max_tokens,
        }
        if stream:
            body["stream"] = True
            if self.api == "openai":
                # Without it the proxy keeps the usage chunk to itself: nothing to reconcile.
                body["stream_options"] = {"include_usage": True}
        return json.dumps(body, separators=(",", ":")).encode()

    @property
    def path(self) -> str:
        return MESSAGES_PATH if self.api == "anthropic" else CHAT_PATH

    def headers(self, key: LoadKey) -> dict[str, str]:
        if self.api == "anthropic":
            return {
                "x-api-key": key.secret,
                "anthropic-version": "2023-06-01",
                "Content-Type": "application/json",
            }
        return {"Authorization": f"Bearer {key.secret}", "Content-Type": "application/json"}

    def streamed(self, n: int) -> bool:
        """Request n is streamed: spreads exactly round(ratio * count) streams evenly."""
        r = self.stream_ratio
        return math.floor((n + 1) * r) > math.floor(n * r)


def synthetic_prompt(tokens: int) -> str:
    """Text of one-token words sized so the whole chat prompt is ~``tokens`` tokens."""
    words = max(tokens - _CHAT_FRAMING_TOKENS, 1)
    laps, rest = divmod(words, len(WORDS))
    return ("".join(WORDS) * laps + "".join(WORDS[:rest])).lstrip()


@dataclass
class KeyUsage:
    """What the upstream reported for one key's successful requests."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_nano: int = 0
    cache_write_tokens: int = 0
    """Anthropic: prompt tokens written to the cache (5-minute and 1-hour)."""

    def add(self, other: KeyUsage) -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cached_tokens += other.cached_tokens
        self.cost_nano += other.cost_nano
        self.cache_write_tokens += other.cache_write_tokens

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Tally:
    """Raw results; latencies in seconds, kept compactly (a long run has many)."""

    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    transport_errors: Counter[str] = field(default_factory=Counter)
    latency_all: array[float] = field(default_factory=lambda: array("d"))
    latency_buffered: array[float] = field(default_factory=lambda: array("d"))
    latency_streamed: array[float] = field(default_factory=lambda: array("d"))
    first_byte_streamed: array[float] = field(default_factory=lambda: array("d"))
    usage_missing: int = 0
    per_key: list[KeyUsage] = field(default_factory=list)
    elapsed: float = 0.0
    interrupted: bool = False
    late_starts: int = 0
    """Fixed rate only: requests sent more than ``LATE_START_S`` after their scheduled time."""
    last_send: float = 0.0
    """Fixed rate only: when the last request went out, in seconds since the start."""


def _error_code(status: int, data: bytes) -> str:
    try:
        error = json.loads(data).get("error")
        # Anthropic's errors carry no code: their type (rate_limit_error, …) stands in.
        code = (error.get("code") or error.get("type")) if isinstance(error, dict) else None
    except (ValueError, AttributeError):
        code = None
    return code if isinstance(code, str) and code else f"http_{status}"


def _usage_of_stream(data: bytes) -> dict[str, Any] | None:
    """The last chunk that carries usage; only such chunks are parsed."""
    for line in reversed(data.splitlines()):
        if not line.startswith(b"data:") or b'"usage"' not in line or _USAGE_NULL.search(line):
            continue
        try:
            usage = json.loads(line[5:]).get("usage")
        except (ValueError, AttributeError):
            continue
        if isinstance(usage, dict):
            return usage
    return None


def _anthropic_usage_of_stream(data: bytes) -> dict[str, Any] | None:
    """``message_start``'s usage (input and cache counts) updated by every ``message_delta``
    (the output, cumulative); None when the stream never reported its final usage."""
    usage: dict[str, Any] = {}
    final = False
    for line in data.splitlines():
        if not line.startswith(b"data:") or b'"usage"' not in line:
            continue
        try:
            event = json.loads(line[5:])
        except ValueError:
            continue
        if event.get("type") == "message_start":
            usage.update((event.get("message") or {}).get("usage") or {})
        elif event.get("type") == "message_delta" and isinstance(event.get("usage"), dict):
            usage.update({k: v for k, v in event["usage"].items() if v is not None})
            final = True
    return usage if final else None


def _usage_of_body(data: bytes) -> dict[str, Any] | None:
    try:
        usage = json.loads(data).get("usage")
    except (ValueError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


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
            tally.reasons[_error_code(status, data)] += 1
            return
        if stream:
            tally.latency_streamed.append(elapsed)
            tally.first_byte_streamed.append(first_byte or elapsed)
            anthropic = self.plan.api == "anthropic"
            usage = _anthropic_usage_of_stream(data) if anthropic else _usage_of_stream(data)
        else:
            tally.latency_buffered.append(elapsed)
            usage = _usage_of_body(data)
        if usage is None:
            tally.usage_missing += 1
            return
        key = tally.per_key[index]
        key.requests += 1
        if self.plan.api == "anthropic":
            self._add_anthropic(key, usage)
            return
        prompt = _count(usage.get("prompt_tokens"))
        completion = _count(usage.get("completion_tokens"))
        details = usage.get("prompt_tokens_details")
        cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else 0
        key.prompt_tokens += prompt
        key.completion_tokens += completion
        key.cached_tokens += cached
        if self.price is not None:
            key.cost_nano += cost_nano(self.price, prompt, completion, cached)

    def _add_anthropic(self, key: KeyUsage, usage: dict[str, Any]) -> None:
        """Anthropic's ``input_tokens`` exclude cache reads and writes: the prompt is all three."""
        read = _count(usage.get("cache_read_input_tokens"))
        writes = _count(usage.get("cache_creation_input_tokens"))
        creation = usage.get("cache_creation")
        one_hour = (
            min(_count(creation.get("ephemeral_1h_input_tokens")), writes)
            if isinstance(creation, dict)
            else 0
        )
        prompt = _count(usage.get("input_tokens")) + read + writes
        completion = _count(usage.get("output_tokens"))
        key.prompt_tokens += prompt
        key.completion_tokens += completion
        key.cached_tokens += read
        key.cache_write_tokens += writes
        if self.price is not None:
            key.cost_nano += cost_nano(
                self.price, prompt, completion, read, writes - one_hour, one_hour
            )


# --- reconciliation through the admin and budget APIs --------------------------------------------


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


def percentiles(values: Sequence[float]) -> dict[str, float] | None:
    """Nearest-rank percentiles in milliseconds."""
    if not values:
        return None
    ordered = sorted(values)
    n = len(ordered)

    def rank(p: float) -> float:
        return round(ordered[max(math.ceil(p / 100 * n) - 1, 0)] * 1000, 3)

    return {
        "count": n,
        "mean": round(sum(ordered) / n * 1000, 3),
        "p50": rank(50),
        "p90": rank(90),
        "p99": rank(99),
        "max": round(ordered[-1] * 1000, 3),
    }


def build_report(
    plan: Plan, tally: Tally, price: Price | None, reconciliation: dict[str, Any]
) -> dict[str, Any]:
    total = KeyUsage()
    for usage in tally.per_key:
        total.add(usage)
    completed = sum(tally.statuses.values())
    elapsed = tally.elapsed or 1e-9
    achieved: float | None = None
    if plan.rate is not None:
        # Sends per second over the sending window, one slot per request: on schedule, the rate.
        achieved = round(tally.sent / (tally.last_send + 1 / plan.rate), 2) if tally.sent else 0.0
    return {
        "target": plan.url,
        "model": plan.model,
        "concurrency": plan.concurrency,
        "keys": len(plan.keys),
        "stream_ratio": plan.stream_ratio,
        "max_tokens": plan.max_tokens,
        "limit": {"duration_s": plan.duration} if plan.duration else {"requests": plan.requests},
        "interrupted": tally.interrupted,
        "requests": tally.sent,
        "responses": completed,
        "elapsed_s": round(tally.elapsed, 3),
        "rps": round(completed / elapsed, 2),
        "ok_rps": round(tally.statuses.get(200, 0) / elapsed, 2),
        "rate": plan.rate,
        "achieved_rate": achieved,
        "late_starts": tally.late_starts if plan.rate is not None else None,
        "latency_ms": {
            "all": percentiles(tally.latency_all),
            "ok_buffered": percentiles(tally.latency_buffered),
            "ok_streamed": percentiles(tally.latency_streamed),
            "streamed_first_byte": percentiles(tally.first_byte_streamed),
        },
        "status": {str(k): v for k, v in sorted(tally.statuses.items())},
        "rejections": dict(tally.reasons.most_common()),
        "transport_errors": dict(tally.transport_errors.most_common()),
        "usage": {
            "prompt_tokens": total.prompt_tokens,
            "completion_tokens": total.completion_tokens,
            "cached_tokens": total.cached_tokens,
            "tokens": total.tokens,
            "cost_nano": total.cost_nano if price is not None else None,
            "responses_without_usage": tally.usage_missing,
        },
        "price_nano_per_1m": (
            None
            if price is None
            else {
                "input": price.input_nano_per_m,
                "cached_input": price.cached_input_nano_per_m,
                "output": price.output_nano_per_m,
                "source": price.source,
            }
        ),
        "reconciliation": reconciliation,
    }


def _fmt_latency(row: dict[str, float] | None) -> str:
    if row is None:
        return "-"
    return "p50 {p50:.1f}  p90 {p90:.1f}  p99 {p99:.1f}  max {max:.1f}  (n={count})".format(**row)


def _money(nano: int | None) -> str:
    return "-" if nano is None else f"{Decimal(nano) / 1_000_000_000:.9f}"


def render(report: dict[str, Any]) -> str:
    """The report for people; ``--json`` writes the same data for machines."""
    lines = [
        f"llm-proxy loadtest → {report['target']}  model {report['model']}  "
        f"{report['concurrency']} clients, {report['keys']} key(s), "
        f"{report['stream_ratio']:.0%} streamed, max_tokens {report['max_tokens']}",
        f"requests   {report['requests']} sent, {report['responses']} answered in "
        f"{report['elapsed_s']:.2f} s → {report['rps']:.1f} req/s "
        f"({report['ok_rps']:.1f} req/s with 200)"
        + ("  [interrupted]" if report["interrupted"] else ""),
    ]
    if report["rate"] is not None:
        late = report["late_starts"]
        lines.append(
            f"rate       target {report['rate']:.1f} req/s, achieved {report['achieved_rate']:.1f} "
            "req/s, "
            + (
                f"{late} request(s) started late (all clients busy, or this client short of "
                "CPU); latency counts from the scheduled time"
                if late
                else "every request started on time"
            )
        )
    lines.append("latency ms")
    for name, row in report["latency_ms"].items():
        lines.append(f"  {name:<20} {_fmt_latency(row)}")
    status = "  ".join(f"{k}: {v}" for k, v in report["status"].items()) or "-"
    lines.append(f"status     {status}")
    if report["rejections"]:
        lines.append(
            "rejections " + "  ".join(f"{k}: {v}" for k, v in report["rejections"].items())
        )
    if report["transport_errors"]:
        lines.append(
            "client errors " + "  ".join(f"{k}: {v}" for k, v in report["transport_errors"].items())
        )
    usage = report["usage"]
    lines.append(
        f"usage      upstream reported {usage['tokens']} tokens "
        f"({usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion), "
        f"cost {_money(usage['cost_nano'])}"
    )
    rec = report["reconciliation"]
    if rec["status"] == "skipped":
        lines.append(f"reconcile  skipped: {rec['reason']}")
    else:
        lines.append(
            f"reconcile  {rec['status'].upper()} over {rec['keys']} key(s): tokens upstream "
            f"{rec['upstream']['tokens']} / proxy {rec['proxy']['tokens']}; cost upstream "
            f"{_money(rec['upstream']['cost_nano'])} / proxy {_money(rec['proxy']['cost_nano'])}"
        )
        lines.extend(f"           note: {note}" for note in rec["notes"])
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("PROXY_URL", "http://127.0.0.1:8080"),
        help="proxy base URL (env PROXY_URL)",
    )
    parser.add_argument("--key", action="append", default=[], help="API key to load (repeat)")
    parser.add_argument("--keys-file", help="file with one API key per line ('#' comments)")
    parser.add_argument(
        "--create-keys", type=int, default=0, metavar="M", help="mint M keys (needs --admin-key)"
    )
    parser.add_argument("--org", help="org of created keys; narrows key-id lookup")
    parser.add_argument(
        "--admin-key", help=f"admin key for creating keys and reconciling (env {ADMIN_KEY_ENV})"
    )
    parser.add_argument("-c", "--concurrency", type=int, default=16, help="concurrent clients")
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument(
        "--duration", type=float, help=f"seconds to run (default 10, max {MAX_DURATION_S:g})"
    )
    limit.add_argument("--requests", type=int, help=f"requests to send (max {MAX_REQUESTS})")
    parser.add_argument(
        "--rate",
        type=float,
        metavar="R",
        help="send R requests/s on a fixed schedule (open loop; latency counts from each "
        "request's scheduled time) instead of each client sending when its last answer arrives",
    )
    parser.add_argument(
        "--stream-ratio", type=float, default=0.0, help="share of streamed requests, 0..1"
    )
    parser.add_argument(
        "--api",
        choices=("openai", "anthropic"),
        default="openai",
        help="openai: POST /v1/chat/completions; anthropic: POST /v1/messages (x-api-key)",
    )
    parser.add_argument("--model", default="gpt-4o-mini")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument(
        "--prompt-tokens", type=int, default=32, help="approximate prompt size in tokens"
    )
    parser.add_argument("--prompt-file", help="use this file's text as the prompt instead")
    parser.add_argument(
        "--price",
        help="model price per 1M tokens as INPUT,OUTPUT[,CACHED_INPUT] for the cost check "
        "(default: the genai-prices database, as the proxy uses without a configured price)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (s)")
    parser.add_argument("--json", dest="json_path", metavar="FILE", help="write the report here")
    parser.add_argument(
        "--progress",
        type=float,
        default=5.0,
        metavar="S",
        help="a progress line on stderr every S seconds while it runs (0: none; default 5)",
    )


def _read_keys(args: argparse.Namespace) -> list[LoadKey]:
    secrets = list(args.key)
    if args.keys_file:
        try:
            text = Path(args.keys_file).read_text()
        except OSError as exc:
            raise LoadtestError(f"cannot read --keys-file: {exc}") from exc
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                secrets.append(line)
    return [LoadKey(secret) for secret in secrets]


def _prompt(args: argparse.Namespace) -> str:
    if args.prompt_file:
        try:
            return Path(args.prompt_file).read_text()
        except OSError as exc:
            raise LoadtestError(f"cannot read --prompt-file: {exc}") from exc
    if not 1 <= args.prompt_tokens <= MAX_PROMPT_TOKENS:
        raise LoadtestError(f"--prompt-tokens must be 1..{MAX_PROMPT_TOKENS}")
    return synthetic_prompt(args.prompt_tokens)


def _price(args: argparse.Namespace) -> Price | None:
    if not args.price:
        if getattr(args, "api", "openai") == "anthropic":
            found = lookup_price(args.model, "anthropic")
            return None if found is None else with_cache_writes(found)
        return lookup_price(args.model)
    parts = args.price.split(",")
    if len(parts) not in (2, 3):
        raise LoadtestError("--price takes INPUT,OUTPUT or INPUT,OUTPUT,CACHED_INPUT")
    try:
        values = [Decimal(p.strip()) for p in parts]
        config = PriceConfig(
            input=values[0], output=values[1], cached_input=values[2] if len(values) > 2 else None
        )
    except (InvalidOperation, ValueError) as exc:
        raise LoadtestError(f"--price: {exc}") from exc
    price = price_from_config(config)
    return with_cache_writes(price) if getattr(args, "api", "openai") == "anthropic" else price


async def run_loadtest(args: argparse.Namespace) -> dict[str, Any]:
    """Set up keys and reconciliation, run the load, and return the report."""
    admin_key = args.admin_key or os.environ.get(ADMIN_KEY_ENV)
    keys = _read_keys(args)
    if not 0 <= args.create_keys <= MAX_CREATED_KEYS:
        raise LoadtestError(f"--create-keys must be 0..{MAX_CREATED_KEYS}")
    if args.create_keys and not admin_key:
        raise LoadtestError(f"--create-keys needs --admin-key (or {ADMIN_KEY_ENV})")
    if not keys and not args.create_keys:
        raise LoadtestError("no API keys: give --key, --keys-file or --create-keys")
    duration = args.duration
    if duration is None and args.requests is None:
        duration = 10.0
    # An OpenAI-style base URL (".../v1") is accepted as well as the proxy's own.
    url = args.url.rstrip("/").removesuffix("/v1")
    plan = Plan(
        url=url,
        keys=tuple(keys),
        concurrency=args.concurrency,
        duration=duration,
        requests=args.requests,
        stream_ratio=args.stream_ratio,
        model=args.model,
        max_tokens=args.max_tokens,
        prompt=_prompt(args),
        timeout=args.timeout,
        rate=args.rate,
        api=args.api,
    )
    price = _price(args)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        admin = AdminClient(session, url, admin_key) if admin_key else None
        created: list[LoadKey] = []
        reconciler: Reconciler | None = None
        try:
            if admin is not None and args.create_keys:
                created = await admin.create_keys(args.create_keys, args.org)
                plan = dataclasses.replace(plan, keys=(*plan.keys, *created))
            key_ids: list[str | None] = []
            if admin is not None:
                key_ids = await admin.resolve_ids(plan.keys, args.org)
                reconciler = Reconciler(admin)
                await reconciler.prepare([k for k in key_ids if k is not None])
            runner = Runner(plan, price, max(getattr(args, "progress", 0.0) or 0.0, 0.0))
            with _graceful_interrupt(runner):
                tally = await runner.run()
            if reconciler is None:
                reconciliation: dict[str, Any] = {
                    "status": "skipped",
                    "reason": f"no admin key (--admin-key or {ADMIN_KEY_ENV}) to read spend",
                }
            elif not reconciler.key_ids:
                reconciliation = {"status": "skipped", "reason": "no key id could be found"}
            else:
                after = await reconciler.settled()
                reconciliation = reconcile(tally, key_ids, reconciler.before, after, price)
                if reconciler.temporary:
                    reconciliation["notes"].append(
                        f"temporary alert-only budgets on {len(reconciler.temporary)} key(s) "
                        "made spend readable; removed again"
                    )
        finally:
            if reconciler is not None:
                await reconciler.cleanup()
            if admin is not None:
                for key in created:
                    assert key.key_id is not None
                    with contextlib.suppress(LoadtestError):
                        await admin.revoke(key.key_id)
    report = build_report(plan, tally, price, reconciliation)
    if created:
        report["created_keys"] = [k.key_id for k in created]
    return report


@contextlib.contextmanager
def _graceful_interrupt(runner: Runner) -> Iterator[None]:
    """First Ctrl-C ends the run and still reports; a second one stops at once."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGINT, runner.stop)
    except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(args: argparse.Namespace) -> None:
    """Exit status: 0 done, 1 reconciliation mismatch, 2 setup error."""
    try:
        report = _run(run_loadtest(args))
    except LoadtestError as exc:
        print(f"llm-proxy loadtest: {exc}", file=sys.stderr)
        sys.exit(2)
    print(render(report))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
    sys.exit(1 if report["reconciliation"]["status"] == "mismatch" else 0)
