"""Usage counters: the layout the ledger writes (``add_usage`` in ``lua/usage_counters.lua``) and
how reports read it.

Every charge — a settle, a reclaimed lease, the late correction of a reclaimed charge, a
malformed lease's settle — adds to its org's counters in the same script that adds the spend,
so a report over a window equals the budget gauge of that window to the nano, and no report
scans per-request records.

Layout, per org (all in the org's hash slot): one hash per bucket width and bucket start (UTC
epoch seconds), ``bp:{o:<org>}:usage:m:<start>`` (minutes), ``usage:h:<start>`` (hours) and
``usage:d:<start>`` (days). A field per combination ``<key id>\\x1f<model>\\x1f<endpoint>\\x1f<end
user>`` holds ``"requests input cached output cost_nano"``; a field with a fifth part is a
spill of that combination (a sum past 2^53 - 1 continues there) and is added to it. Fields
starting with ``\\x1f`` index the bucket's end users. Each bucket expires its retention after
its end; past ``end_user_cap`` distinct end users in a bucket, the others are ``(other)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from proxy.config import UsageConfig
from proxy.ledger.keys import USAGE_SEP, counter_key
from proxy.store.client import Redis

log = logging.getLogger(__name__)

Width = Literal["1m", "1h", "1d"]
WIDTHS: dict[Width, int] = {"1m": 60, "1h": 3600, "1d": 86400}
SEP = USAGE_SEP
OTHER = "(other)"
"""The end user of usage recorded past a bucket's end-user cap."""

REPORT_ENDPOINTS: dict[str, frozenset[str]] = {
    "completions": frozenset(
        {
            "chat/completions",
            "completions",
            "messages",
            # Bedrock's runtime API (proxy.dialects.bedrock)
            "converse",
            "converse-stream",
            "invoke",
            "invoke-with-response-stream",
            # Gemini's (proxy.dialects.gemini)
            "generateContent",
            "streamGenerateContent",
        }
    ),
    "embeddings": frozenset({"embeddings", "embedContent", "batchEmbedContents"}),
    "moderations": frozenset({"moderations"}),
    "responses": frozenset({"responses"}),
}
"""Which of the proxy's endpoints each bucketed report counts (Anthropic's Messages, Bedrock's
Converse and InvokeModel and Gemini's generateContent are chat completions;
``messages/count_tokens`` and ``countTokens`` are free and in no bucketed report, only in
costs)."""

FREE_ENDPOINTS = frozenset({"messages/count_tokens", "countTokens"})
"""Relayed, never charged, not a model request: in no report, costs included (which counted
them as requests that /usage/completions did not, so the two disagreed)."""

_READ_BATCH = 500


@dataclass(frozen=True, slots=True)
class Combo:
    """One combination of dimensions a bucket counts separately."""

    org_id: str
    key_id: str
    model: str
    endpoint: str
    end_user: str | None


@dataclass(slots=True)
class Counts:
    requests: int = 0
    input_tokens: int = 0
    """Cached input included (as OpenAI counts it)."""
    cached_tokens: int = 0
    output_tokens: int = 0
    cost_nano: int = 0

    def add(self, other: Counts) -> None:
        self.requests += other.requests
        self.input_tokens += other.input_tokens
        self.cached_tokens += other.cached_tokens
        self.output_tokens += other.output_tokens
        self.cost_nano += other.cost_nano


@dataclass(frozen=True, slots=True)
class Span:
    """One counter hash: a width and the start of its bucket."""

    width: Width
    start: int

    @property
    def end(self) -> int:
        return self.start + WIDTHS[self.width]


def bucket_key(org_id: str, span: Span) -> str:
    return counter_key(org_id, span.width, span.start)


def align(moment: int, width: Width) -> int:
    return moment - moment % WIDTHS[width]


def parse_bucket(org_id: str, raw: dict[str, str]) -> dict[Combo, Counts]:
    """A bucket hash's combinations; spills are added to their combination."""
    found: dict[Combo, Counts] = {}
    for name, value in raw.items():
        if name.startswith(SEP):
            continue  # the end-user index
        parts = name.split(SEP)
        numbers = value.split(" ")
        if len(parts) < 4 or len(numbers) != 5:
            log.warning("usage counter field unreadable in org %s: %r", org_id, name[:80])
            continue
        try:
            counts = Counts(*(int(n) for n in numbers))
        except ValueError:
            log.warning("usage counter value unreadable in org %s: %r", org_id, value[:80])
            continue
        combo = Combo(org_id, parts[0], parts[1], parts[2], parts[3] or None)
        found.setdefault(combo, Counts()).add(counts)
    return found


def retained(span: Span, now: float, usage: UsageConfig) -> bool:
    """Whether the ledger still keeps (and still writes) this bucket."""
    return span.end + usage.keep_seconds(span.width) > now


def cover(start: int, end: int, now: float, usage: UsageConfig) -> list[Span]:
    """Buckets whose union is ``[start, end)`` widened to whole minutes: the coarsest that fit,
    finer ones at the edges. Where minutes (or hours) are no longer kept, an edge widens to the
    enclosing hour (or day). Nothing outside what is kept can hold usage, so the range is first
    clipped to it (a range from 1970 to the year 5000 costs what the retained days cost)."""
    position = max(align(start, "1m"), align(int(now) - usage.keep_seconds("1d"), "1d"))
    stop = min(-(-end // 60) * 60, align(int(now), "1d") + 2 * WIDTHS["1d"])  # clocks may differ
    spans: list[Span] = []
    while position < stop:
        for width in ("1d", "1h"):
            span = Span(width, position)  # type: ignore[arg-type]
            if position % WIDTHS[span.width] == 0 and span.end <= stop:
                if retained(span, now, usage):
                    break
        else:
            span = Span("1m", position)
            if not retained(span, now, usage):
                span = Span("1h", align(position, "1h"))
                if not retained(span, now, usage):
                    span = Span("1d", align(position, "1d"))
        spans.append(span)
        position = span.end
    return spans


def buckets(start: int, end: int, width: Width) -> Iterator[Span]:
    """The aligned buckets of one width that overlap ``[start, end)``."""
    position = align(start, width)
    while position < end:
        yield Span(width, position)
        position += WIDTHS[width]


class UsageCounters:
    """Reads counter hashes, pipelined in batches."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def read(
        self, orgs: Sequence[str], spans: Sequence[Span]
    ) -> dict[Span, dict[Combo, Counts]]:
        """Each span's combinations over the given orgs."""
        wanted = [(org, span) for span in spans for org in orgs]
        result: dict[Span, dict[Combo, Counts]] = {span: {} for span in spans}
        for offset in range(0, len(wanted), _READ_BATCH):
            batch = wanted[offset : offset + _READ_BATCH]
            pipe = self._redis.pipeline(transaction=False)
            for org, span in batch:
                pipe.hgetall(bucket_key(org, span))
            for (org, span), raw in zip(batch, await pipe.execute(), strict=True):
                if raw:
                    result[span].update(parse_bucket(org, raw))
        return result


@dataclass(frozen=True)
class Selection:
    """Which usage a report counts. ``None`` means no restriction on that dimension."""

    endpoints: frozenset[str] | None = None
    models: frozenset[str] | None = None
    end_users: frozenset[str] | None = None
    key_ids: frozenset[str] | None = None
    nothing: bool = False
    """A filter no usage can match (e.g. platform user ids, which the proxy has none of)."""

    def admits(self, combo: Combo) -> bool:
        if self.nothing:
            return False
        if self.endpoints is not None and combo.endpoint not in self.endpoints:
            return False
        if self.models is not None and combo.model not in self.models:
            return False
        if self.end_users is not None and combo.end_user not in self.end_users:
            return False
        return self.key_ids is None or combo.key_id in self.key_ids


Dimension = Literal[
    "model", "api_key_id", "org_id", "external_user_id", "team_id", "user_id", "background"
]


def dimension(combo: Combo, name: str) -> str | bool | None:
    """A combination's value of a report dimension. Teams and platform users do not exist in
    the proxy (null); nothing is a background response (the proxy does not relay polling)."""
    if name == "model":
        return combo.model
    if name == "api_key_id":
        return combo.key_id
    if name == "org_id":
        return combo.org_id
    if name == "external_user_id":
        return combo.end_user
    if name == "background":
        return False
    return None


@dataclass
class Group:
    values: tuple[str | bool | None, ...]
    counts: Counts = field(default_factory=Counts)


def aggregate(
    combos: Iterable[tuple[Combo, Counts]], selection: Selection, group_by: Sequence[str]
) -> list[Group]:
    """Sums per distinct combination of the grouped dimensions, largest cost first."""
    groups: dict[tuple[str | bool | None, ...], Group] = {}
    for combo, counts in combos:
        if not selection.admits(combo):
            continue
        values = tuple(dimension(combo, name) for name in group_by)
        group = groups.get(values)
        if group is None:
            group = groups[values] = Group(values)
        group.counts.add(counts)
    return sorted(
        groups.values(),
        key=lambda g: (-g.counts.cost_nano, [("" if v is None else str(v)) for v in g.values]),
    )
