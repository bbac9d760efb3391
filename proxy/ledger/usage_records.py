"""The per-request usage records (``records.UsageRecord``): each org's stream
``bp:{o:<org>}:usage``, appended by the ledger scripts (``append_usage`` in
``lua/usage_counters.lua``) with every charge and capped at about 10,000 entries — recent
requests, not an archive (the JSON access log is the record of every request). Read newest
first, with the stream id as the paging cursor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from proxy.ledger.keys import org_key
from proxy.ledger.records import UsageRecord
from proxy.store.client import Redis

_STREAM_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")
_MAX_ID_PART = 2**64 - 1


def valid_stream_id(value: str) -> bool:
    """A cursor Redis takes as an exclusive bound: both parts fit 64 bits, and it is not
    ``0-0`` (nothing comes before it, so Redis refuses ``(0-0`` as "Invalid stream ID")."""
    if not _STREAM_ID.match(value):
        return False
    ms, seq = (int(part) for part in value.split("-"))
    return ms <= _MAX_ID_PART and seq <= _MAX_ID_PART and (ms, seq) != (0, 0)


@dataclass(frozen=True)
class RecordFilter:
    key_id: str | None = None
    end_user: str | None = None
    model: str | None = None

    def admits(self, fields: dict[str, str]) -> bool:
        if self.key_id is not None and fields.get("kid") != self.key_id:
            return False
        if self.end_user is not None and fields.get("user") != self.end_user:
            return False
        return self.model is None or fields.get("model") == self.model


@dataclass(frozen=True)
class RecordPage:
    records: list[dict[str, Any]]
    next_id: str | None
    """Where the next (older) page starts, exclusive; None when the stream is exhausted."""


def public_record(stream_id: str, fields: dict[str, str]) -> dict[str, Any]:
    millis = int(stream_id.split("-", 1)[0])
    r = UsageRecord.from_fields(fields)
    cost = max(r.cost_nano, 0)
    return {
        "id": stream_id,
        "object": "usage.request",
        "request_id": r.rid or None,
        "created_at": millis // 1000,
        "created_at_ms": millis,
        "api_key_id": r.kid or None,
        "external_user_id": r.user,
        "model": r.model or None,
        "endpoint": r.endpoint or None,
        "input_tokens": r.input_tokens,
        "input_cached_tokens": r.cached_tokens,
        "output_tokens": r.output_tokens,
        "reasoning_tokens": r.reasoning_tokens,
        "cache_write_tokens": r.cache_write_tokens,
        "cache_write_1h_tokens": r.cache_write_1h_tokens,
        "status": r.status,
        "cost_nano": str(cost),
        "cost": cost / 1_000_000_000,
        "reported": r.reported,
        "client_gone": r.client_gone,
        "reclaimed": r.reclaimed,
        "late": r.late,
        "upstream": r.upstream,
    }


async def recent(
    redis: Redis,
    org_id: str,
    *,
    limit: int,
    before: str | None,
    since_ms: int | None,
    until_ms: int | None,
    selection: RecordFilter,
    scan_most: int,
) -> RecordPage:
    """Newest first: up to ``limit`` matching records older than ``before``, looking at no
    more than ``scan_most`` entries (a selective filter returns a short page and a cursor,
    never an unbounded scan)."""
    key = org_key(org_id, "usage")
    if until_ms is not None and until_ms <= 0:
        return RecordPage([], None)  # nothing was recorded before 1970
    top = f"({before}" if before else ("+" if until_ms is None else str(until_ms - 1))
    bottom = "-" if since_ms is None else str(since_ms)
    found: list[dict[str, Any]] = []
    scanned = 0
    last: str | None = None
    while len(found) < limit and scanned < scan_most:
        batch = min(max(limit - len(found), 100), scan_most - scanned)
        entries = await redis.xrevrange(key, max=top, min=bottom, count=batch)
        if not entries:
            return RecordPage(found, None)
        for stream_id, fields in entries:
            scanned += 1
            last = stream_id
            if selection.admits(fields):
                found.append(public_record(stream_id, fields))
                if len(found) == limit:
                    break
        if len(entries) < batch and len(found) < limit:
            return RecordPage(found, None)
        top = f"({last}"
    more = await redis.xrevrange(key, max=f"({last}", min=bottom, count=1) if last else []
    return RecordPage(found, last if more else None)
