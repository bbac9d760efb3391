"""Typed script arguments: the one place where a call's values become a script's KEYS and
ARGV, in the order the script reads them (``lua/admit.lua``, ``lua/settle.lua``,
``lua/reclaim.lua``). Callers fill in named fields; nothing else assembles a positional list.

Per request: slots, not frozen (a frozen dataclass's ``__init__`` costs several times more).
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.ledger.keys import org_prefix
from proxy.ledger.records import Pairs, counters_of
from proxy.ledger.windows import Windows, iso_millis
from proxy.store.scripts import ScriptArg

NO_LIMITS = ("",) * 6


@dataclass(slots=True)
class ClampTerms:
    """How far a request's output cap may be lowered, and what its reservation costs then:
    ``cost(output) = ceil((input_cost + output * output_rate) / 1e6)`` in nano-units, the same
    formula that priced the reservation (rates are nano-units per 1M tokens)."""

    choices: int
    cap: int
    """The cap per choice the reservation was made with."""
    lowest: int
    """The lowest cap per choice a clamped request may get (below ``cap``)."""
    input_cost: int
    output_rate: int

    def arg(self) -> str:
        """One script argument, parsed only when a budget is squeezed: the script's numbers
        are doubles, so the products are split where each part stays exact."""
        a_q, a_r = divmod(self.input_cost, 1_000_000)
        r_q, r_r = divmod(self.output_rate, 1_000_000)
        return f"{self.choices} {self.cap} {self.lowest} {a_q} {a_r} {r_q} {r_r}"


@dataclass(slots=True)
class AdmitArgs:
    org_id: str
    now: float
    """Seconds since the epoch (the proxy's clock: scripts never ask Redis for the time)."""
    request_id: str
    key_id: str
    reserve_tokens: int
    reserve_cost_nano: int
    lease_ms: int
    windows: Windows
    role_limits: tuple[str, ...]
    """The key's role defaults: rps, rpm, rph, rpd, tpm, concurrency ("" = none)."""
    usage_policy: str
    """``UsageConfig.lua_policy()``: how long counters are kept, the end-user cap."""
    prompt_tokens: int = 0
    model: str = ""
    endpoint: str = ""
    end_user: str = ""
    end_user_tag: str = ""
    """``keys.end_user_tag`` of the end user ("" = none)."""
    clamp: ClampTerms | None = None
    clamp_asked: bool = False
    dry_run: bool = False
    end_user_cap: int = 0
    """Distinct end users the org may name this month (0 = no cap)."""

    def keys(self) -> list[str]:
        return [org_prefix(self.org_id)]

    def argv(self) -> list[ScriptArg]:
        w = self.windows
        return [
            int(self.now * 1000),
            self.request_id,
            self.key_id,
            self.reserve_tokens,
            self.reserve_cost_nano,
            self.lease_ms,
            w.daily,
            w.weekly,
            w.monthly,
            *self.role_limits,
            *w.ttls(self.now),
            iso_millis(self.now),
            self.prompt_tokens,
            self.model,
            self.endpoint,
            self.end_user,
            self.end_user_tag,
            ("d" if self.dry_run else "") + ("c" if self.clamp_asked else ""),
            self.clamp.arg() if self.clamp is not None else "",
            self.usage_policy,
            self.end_user_cap,
        ]


@dataclass(slots=True)
class SettleArgs:
    """Spend goes to the windows (and usage buckets) of the moment the request ended (``at``),
    also when a spooled settle is replayed later; only their expiry is reckoned from ``now``."""

    org_id: str
    at: float
    now: float
    request_id: str
    key_id: str
    tokens: int
    cost_nano: int
    windows: Windows
    """The windows of ``at``."""
    record: Pairs
    """The usage record's field/value pairs (``UsageRecord.pairs()``), appended as they are."""
    usage_policy: str

    def keys(self) -> list[str]:
        return [org_prefix(self.org_id)]

    def argv(self) -> list[ScriptArg]:
        w = self.windows
        return [
            int(self.at * 1000),
            self.request_id,
            self.key_id,
            self.tokens,
            self.cost_nano,
            w.daily,
            w.weekly,
            w.monthly,
            *w.ttls(self.now),
            iso_millis(self.at),
            *counters_of(self.record, self.tokens),
            self.usage_policy,
            int(self.now * 1000),
            *self.record,
        ]


def settle_batch_argv(items: list[SettleArgs]) -> list[ScriptArg]:
    """``lua/settle_batch.lua``'s ARGV: the count, then each item's length and its argv."""
    argv: list[ScriptArg] = [len(items)]
    for item in items:
        one = item.argv()
        argv.append(len(one))
        argv.extend(one)
    return argv


@dataclass(slots=True)
class ReclaimArgs:
    org_id: str
    now: float
    windows: Windows
    limit: int
    """At most this many leases per call (bounded work)."""
    usage_policy: str

    def keys(self) -> list[str]:
        return [org_prefix(self.org_id)]

    def argv(self) -> list[ScriptArg]:
        w = self.windows
        return [
            int(self.now * 1000),
            w.daily,
            w.weekly,
            w.monthly,
            *w.ttls(self.now),
            iso_millis(self.now),
            self.limit,
            self.usage_policy,
        ]
