"""The per-request usage records: each org's stream ``bp:{o:<org>}:usage``, appended by the
ledger scripts (``append_usage`` in ``gateway/lease.lua``) with every charge and capped at
about 10,000 entries — recent requests, not an archive (the JSON access log is the record of
every request). Read newest first, with the stream id as the paging cursor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from proxy.store.connection import Redis, org_prefix

_STREAM_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")
_NUMBERS = {
    "in": "input_tokens",
    "cached": "input_cached_tokens",
    "out": "output_tokens",
    "reasoning": "reasoning_tokens",
    "cache_write": "cache_write_tokens",
    "cache_write_1h": "cache_write_1h_tokens",
    "status": "status",
}
_FLAGS = {"reported": "reported", "client_gone": "client_gone", "reclaimed": "reclaimed"}


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


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def public_record(stream_id: str, fields: dict[str, str]) -> dict[str, Any]:
    millis = int(stream_id.split("-", 1)[0])
    cost = max(_int(fields.get("cost_nano")), 0)
    record: dict[str, Any] = {
        "id": stream_id,
        "object": "usage.request",
        "request_id": fields.get("rid") or None,
        "created_at": millis // 1000,
        "created_at_ms": millis,
        "api_key_id": fields.get("kid") or None,
        "external_user_id": fields.get("user") or None,
        "model": fields.get("model") or None,
        "endpoint": fields.get("endpoint") or None,
    }
    for name, public in _NUMBERS.items():
        record[public] = _int(fields.get(name))
    record["cost_nano"] = str(cost)
    record["cost"] = cost / 1_000_000_000
    for name, public in _FLAGS.items():
        record[public] = fields.get(name) == "1"
    record["late"] = fields.get("late") == "1"
    record["upstream"] = fields.get("upstream") or None
    return record


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
    key = org_prefix(org_id) + "usage"
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
