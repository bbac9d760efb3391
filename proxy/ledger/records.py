"""One request's usage record: what settle appends to its org's usage stream.

The same type is written by the request path (``pipeline.settle``), carried by a spooled
settle (as field/value pairs, the stream entry's own shape, so spool files written by earlier
versions replay unchanged) and read back by the usage API (``usage_records``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Pairs = list[str | int]
"""A stream entry's field/value pairs, flattened (what XADD and the spool take)."""


def _int(value: str | int | None) -> int:
    if isinstance(value, int):
        return value
    try:
        return int(value or 0)
    except ValueError:
        return 0


@dataclass(slots=True)  # per request: not frozen (a frozen __init__ costs several times more)
class UsageRecord:
    rid: str
    kid: str
    user: str | None = None
    """The end user named by X-On-Behalf-Of (as sent, not its tag)."""
    model: str = ""
    endpoint: str = ""
    input_tokens: int = 0
    """Cached input included (as OpenAI counts it)."""
    output_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0
    cost_nano: int = 0
    reported: bool = False
    """Whether the upstream reported the usage (else it was counted here)."""
    status: int = 0
    client_gone: bool = False
    upstream: str | None = None
    usage_model: str = ""
    """The bounded name the usage counters file it under (``ModelRoute.counted_as``) when it
    differs from ``model`` (a name a pattern matched): a client cannot mint counter fields."""
    released: bool = False
    """A reservation given back unused (the request was never forwarded)."""
    reclaimed: bool = False
    """Written by the scripts only: a dead proxy's lease, charged its whole reservation."""
    late: bool = False
    """Written by the scripts only: the settle that corrected a reclaimed charge."""

    def pairs(self) -> Pairs:
        """The stream entry, field names as the stream has always had them."""
        pairs: Pairs = [
            "rid", self.rid,
            "kid", self.kid,
            "user", self.user or "",
            "model", self.model,
            "endpoint", self.endpoint,
            "in", self.input_tokens,
            "out", self.output_tokens,
            "cached", self.cached_tokens,
            "cache_write", self.cache_write_tokens,
            "cache_write_1h", self.cache_write_1h_tokens,
            "reasoning", self.reasoning_tokens,
            "cost_nano", self.cost_nano,
            "reported", int(self.reported),
            "status", self.status,
            "client_gone", int(self.client_gone),
            "upstream", self.upstream or "",
        ]  # fmt: skip
        if self.usage_model and self.usage_model != self.model:
            pairs += ["usage_model", self.usage_model]
        if self.released:
            pairs += ["released", 1]
        return pairs

    @classmethod
    def from_fields(cls, fields: Mapping[str, str | int | None]) -> UsageRecord:
        """A stream entry (or a spooled settle's pairs) read back; absent numbers are 0."""
        return cls(
            rid=str(fields.get("rid") or ""),
            kid=str(fields.get("kid") or ""),
            user=str(fields.get("user") or "") or None,
            model=str(fields.get("model") or ""),
            endpoint=str(fields.get("endpoint") or ""),
            input_tokens=_int(fields.get("in")),
            output_tokens=_int(fields.get("out")),
            cached_tokens=_int(fields.get("cached")),
            cache_write_tokens=_int(fields.get("cache_write")),
            cache_write_1h_tokens=_int(fields.get("cache_write_1h")),
            reasoning_tokens=_int(fields.get("reasoning")),
            cost_nano=_int(fields.get("cost_nano")),
            reported=str(fields.get("reported")) == "1",
            status=_int(fields.get("status")),
            client_gone=str(fields.get("client_gone")) == "1",
            upstream=str(fields.get("upstream") or "") or None,
            usage_model=str(fields.get("usage_model") or ""),
            released=str(fields.get("released")) == "1",
            reclaimed=str(fields.get("reclaimed")) == "1",
            late=str(fields.get("late")) == "1",
        )

    @classmethod
    def from_pairs(cls, pairs: Sequence[str | int]) -> UsageRecord:
        return cls.from_fields({str(k): v for k, v in zip(pairs[::2], pairs[1::2], strict=False)})


def counters_of(pairs: Sequence[str | int], tokens: int) -> tuple[int, int, int, str, str, str]:
    """What the usage counters need of a record's pairs, on every settle (so without building
    a ``UsageRecord``): input, cached input and output tokens, model, endpoint, end user.
    Input + output is the settle's ``tokens``, also for a record that does not split them
    (spooled by an earlier version)."""
    fields = dict(zip(pairs[::2], pairs[1::2], strict=False))
    out = _int(fields.get("out"))
    given = fields.get("in")
    return (
        _int(given) if given is not None else max(tokens - out, 0),
        _int(fields.get("cached")),
        out,
        str(fields.get("usage_model") or fields.get("model", "")),
        str(fields.get("endpoint", "")),
        str(fields.get("user", "")),
    )
