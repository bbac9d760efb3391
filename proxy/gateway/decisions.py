"""How an admission decision looks in HTTP: 429 bodies and the headers on admitted answers.

Rate-limit headers follow OpenAI (``x-ratelimit-*``, resets written like ``1s``, ``6m0s``,
``12ms``) and the IETF draft (``RateLimit-Policy`` / ``RateLimit``), for the tightest limit.
Budget refusals say ``x-should-retry: false`` so the official SDKs stop retrying, and explain
themselves: the binding budget, what the request would reserve, what is left and when the
window resets, in the message, in ``x-budget-*`` headers and as ``error.budget``.

One meaning on admitted and refused answers alike: ``x-ratelimit-reset-*`` and the ``t`` of
``RateLimit`` are the time until the limit's bucket has drained completely (the whole limit
is available again), as OpenAI defines them; ``Retry-After`` / ``retry-after-ms`` (refusals
only) the time until this request would be admitted. ``RateLimit-Policy`` always carries the
limit's window as ``w`` (seconds).
"""

from __future__ import annotations

import math
from typing import Literal

from proxy.dialects.base import Dialect
from proxy.errors import ApiError, bad_request
from proxy.ledger.admission import Admitted, BudgetRefused, RateLimited
from proxy.ledger.keys import budget_key_id, budget_scope
from proxy.ledger.windows import Period, Windows, rfc3339

_WINDOW_SECONDS = {"rps": 1, "rpm": 60, "rph": 3600, "rpd": 86400, "tpm": 60}
_REQUEST_WINDOWS_MS = (1000, 60_000, 3_600_000, 86_400_000)
_LIMIT_WORDS = {
    "rps": "requests per second",
    "rpm": "requests per minute",
    "rph": "requests per hour",
    "rpd": "requests per day",
    "tpm": "tokens per minute",
    "concurrency": "concurrent requests",
}
# The SDKs retry 429s on their own; past this wait a retry only burns the client's time.
_MAX_USEFUL_RETRY_SECONDS = 60


def openai_duration(ms: int) -> str:
    """OpenAI's reset format (Go durations): ``12ms``, ``1s``, ``1.5s``, ``6m0s``, ``1m1.5s``."""
    ms = max(ms, 0)
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if not hours and not minutes:
        return seconds
    return (f"{hours}h" if hours else "") + f"{minutes}m{seconds}"


def nano_to_major(nano: int) -> str:
    whole, frac = divmod(nano, 1_000_000_000)
    return f"{whole}.{frac:09d}".rstrip("0").rstrip(".") if frac else str(whole)


def request_window_ms(limit: int, remaining: int, reset_ms: int) -> int | None:
    """Which window (per second, minute, hour or day) the tightest request limit of an
    admission has, read back from what the admit script reports about its bucket.

    After the request the bucket holds ``after`` requests (at least 1), with
    ``remaining = floor(limit - after)`` and ``reset_ms = ceil(after * window / limit)``. The
    windows differ by 24x or more, and ``after`` is known within a factor of 2, so at most
    one window fits; None when none does (then the policy goes without ``w``).
    """
    low, high = max(limit - remaining - 1, 1), limit - remaining
    slack = 1e-9 * max(limit, 1)
    fits = [
        window
        for window in _REQUEST_WINDOWS_MS
        if (reset_ms - 1) * limit / window <= high + slack
        and reset_ms * limit / window >= low - slack
    ]
    return fits[0] if len(fits) == 1 else None


def admitted_headers(decision: Admitted) -> dict[str, str]:
    headers: dict[str, str] = {}
    policy: list[str] = []
    state: list[str] = []
    if decision.request_limit is not None:
        reset = openai_duration(decision.request_reset_ms)
        headers["x-ratelimit-limit-requests"] = str(decision.request_limit)
        headers["x-ratelimit-remaining-requests"] = str(max(decision.request_remaining, 0))
        headers["x-ratelimit-reset-requests"] = reset
        seconds = math.ceil(decision.request_reset_ms / 1000)
        window = request_window_ms(
            decision.request_limit, decision.request_remaining, decision.request_reset_ms
        )
        w = f";w={window // 1000}" if window else ""
        policy.append(f'"requests";q={decision.request_limit}{w}')
        state.append(f'"requests";r={max(decision.request_remaining, 0)};t={seconds}')
    if decision.token_limit is not None:
        headers["x-ratelimit-limit-tokens"] = str(decision.token_limit)
        headers["x-ratelimit-remaining-tokens"] = str(max(decision.token_remaining, 0))
        headers["x-ratelimit-reset-tokens"] = openai_duration(decision.token_reset_ms)
        seconds = math.ceil(decision.token_reset_ms / 1000)
        policy.append(f'"tokens";q={decision.token_limit};w=60')
        state.append(f'"tokens";r={max(decision.token_remaining, 0)};t={seconds}')
    if policy:
        headers["RateLimit-Policy"] = ", ".join(policy)
        headers["RateLimit"] = ", ".join(state)
    if decision.budget_remaining is not None:
        cost = decision.budget_unit == "c"
        remaining = max(decision.budget_remaining, 0)
        headers["x-budget-remaining"] = nano_to_major(remaining) if cost else str(remaining)
        headers["x-budget-kind"] = "cost" if cost else "tokens"
        headers["x-budget-window"] = decision.budget_window
        headers["x-budget-scope"] = budget_scope(decision.budget_field)
    if decision.clamped_cap is not None:
        headers["x-budget-clamped-max-tokens"] = str(decision.clamped_cap)
    return headers


def with_dialect_limits(
    dialect: Dialect, decision: Admitted, now: float, headers: dict[str, str]
) -> dict[str, str]:
    """An admitted answer's limits again, in the dialect's own header names (if it has any)."""
    if decision.request_limit is not None:
        dialect.limit_headers(
            headers,
            "requests",
            decision.request_limit,
            decision.request_remaining,
            decision.request_reset_ms,
            now,
        )
    if decision.token_limit is not None:
        dialect.limit_headers(
            headers,
            "tokens",
            decision.token_limit,
            decision.token_remaining,
            decision.token_reset_ms,
            now,
        )
    return headers


def dialect_refusal_headers(dialect: Dialect, decision: RateLimited, now: float) -> dict[str, str]:
    """The refusing limit in the dialect's own header names (if it has any)."""
    headers: dict[str, str] = {}
    if decision.limit_name in _WINDOW_SECONDS:
        tpm = decision.limit_name == "tpm"
        kind: Literal["requests", "tokens"] = "tokens" if tpm else "requests"
        retry_ms = decision.retry_after_ms if decision.retry_after_ms >= 0 else None
        dialect.limit_headers(headers, kind, decision.limit, 0, retry_ms, now)
    return headers


def rate_limited_error(decision: RateLimited, cost: int = 1) -> ApiError:
    """``cost``: what the refused request would have taken from the limit (1 request, or its
    reserved tokens for ``tpm``), to tell when the bucket is whole again."""
    words = _LIMIT_WORDS.get(decision.limit_name, decision.limit_name)
    kind = "tokens" if decision.limit_name == "tpm" else "requests"
    who = {"key": "API key", "end_user": "end user"}.get(decision.scope, "organization")
    headers: dict[str, str] = {}
    if decision.limit_name == "tpm" and decision.retry_after_ms < 0:
        message = (
            f"Rate limit exceeded: this request reserves more tokens than the {who}'s limit of "
            f"{decision.limit} {words}; lower max_tokens or the prompt size."
        )
        headers["x-should-retry"] = "false"
    else:
        retry_ms = decision.retry_after_ms if decision.retry_after_ms >= 0 else 1000
        retry_s = max(1, math.ceil(retry_ms / 1000))
        message = (
            f"Rate limit exceeded: the {who}'s limit of {decision.limit} {words} is reached "
            f"({decision.current} in use). Try again in {retry_s}s."
        )
        headers["Retry-After"] = str(retry_s)
        headers["retry-after-ms"] = str(retry_ms)
        headers["x-should-retry"] = "true" if retry_s <= _MAX_USEFUL_RETRY_SECONDS else "false"
    if decision.limit_name in _WINDOW_SECONDS:
        suffix = "tokens" if kind == "tokens" else "requests"
        window_s = _WINDOW_SECONDS[decision.limit_name]
        full_ms = _drained_ms(decision, cost, window_s * 1000)
        headers[f"x-ratelimit-limit-{suffix}"] = str(decision.limit)
        headers[f"x-ratelimit-remaining-{suffix}"] = "0"
        headers[f"x-ratelimit-reset-{suffix}"] = openai_duration(full_ms)
        headers["RateLimit-Policy"] = f'"{suffix}";q={decision.limit};w={window_s}'
        headers["RateLimit"] = f'"{suffix}";r=0;t={math.ceil(full_ms / 1000)}'
    return ApiError(
        429, message, type=kind, code="rate_limit_exceeded", param=None, headers=headers
    )


def _drained_ms(decision: RateLimited, cost: int, window_ms: int) -> int:
    """Until the bucket is empty. The script's retry time is when ``cost`` more fits, i.e.
    when the level has drained to ``limit - cost``; draining that much more takes
    ``(limit - cost) * window / limit``. A request that never fits (cost above the limit)
    has no retry time: the level itself, rounded up to whole units, is drained instead."""
    limit = max(decision.limit, 1)
    if decision.retry_after_ms >= 0 and cost <= limit:
        return decision.retry_after_ms + math.ceil((limit - cost) * window_ms / limit)
    return math.ceil(max(decision.current, 0) * window_ms / limit)


def period_of(window: str) -> Period:
    if "W" in window:
        return "weekly"
    return "daily" if window.count("-") == 2 else "monthly"


def _amount(value: int, unit: str) -> str:
    """An amount in the budget's unit as a decimal string: tokens, or major currency units."""
    return nano_to_major(value) if unit == "c" else str(value)


def _words(value: int, unit: str) -> str:
    return f"{_amount(value, unit)} currency units" if unit == "c" else f"{value} tokens"


def budget_error(
    decision: BudgetRefused,
    windows: Windows,
    now: float,
    *,
    org_id: str = "",
    end_user: str | None = None,
) -> ApiError:
    """Names the budget that refused, what this request would reserve, what is left of the
    line and when the window resets — in the message, the ``x-budget-*`` headers and
    ``error.budget`` (amounts as decimal strings in the budget's unit, like event snapshots)."""
    period = period_of(decision.window)
    scope = decision.scope
    owner = "operator ceiling (owner cluster)" if decision.owner == "cluster" else "self-budget"
    scope_id = {
        "apikey": budget_key_id(decision.field),
        "external_user": end_user or "",
    }.get(scope, org_id)
    which = {
        "apikey": f"the {period} budget of this API key",
        "org": f"the {period} budget of this organization",
        "external_user": f"the {period} budget of end user '{end_user}'",
        "external_user_default": f"the {period} default budget for each end user, here "
        f"'{end_user}',",
    }[scope]
    unit = decision.unit
    reset_at = rfc3339(windows.end(period))
    if decision.why == "blocked":
        reason = "has reached its block line"
    else:
        reason = "would be exceeded by this request's worst case (prompt + max output tokens)"
    message = (
        f"Budget exceeded: {which} ({owner}, window {decision.window}) {reason}. This request "
        f"reserves {_words(decision.reserved, unit)}; {_amount(decision.left, unit)} of "
        f"{_words(decision.line, unit)} are left (used or in flight: "
        f"{_words(decision.spent, unit)}). The window resets at {reset_at}."
    )
    headers = {
        "x-should-retry": "false",
        "x-budget-scope": scope,
        "x-budget-owner": decision.owner,
        "x-budget-kind": "cost" if unit == "c" else "tokens",
        "x-budget-window": decision.window,
        "x-budget-reset": reset_at,
        "x-budget-remaining": _amount(decision.left, unit),
        "x-budget-reserved": _amount(decision.reserved, unit),
    }
    left = windows.seconds_left(period, now)
    if 0 < left <= 60:
        headers["Retry-After"] = str(math.ceil(left))
    details: dict[str, str | None] = {
        "scope": scope,
        "scope_id": scope_id,
        "owner": decision.owner,
        "period": period,
        "window": decision.window,
        "limit_kind": "cost" if unit == "c" else "tokens",
        "reason": decision.why,
        "line": _amount(decision.line, unit),
        "used": _amount(decision.spent, unit),
        "reserved": _amount(decision.reserved, unit),
        "remaining": _amount(decision.left, unit),
        "reset_at": reset_at,
    }
    if scope in ("external_user", "external_user_default"):
        details["target_id"] = end_user
    return ApiError(
        429,
        message,
        type="insufficient_quota",
        code="budget_exceeded",
        headers=headers,
        details={"budget": details},
    )


def end_user_required() -> ApiError:
    return bad_request(
        "This organization requires every request to name its end user in X-On-Behalf-Of.",
        param="X-On-Behalf-Of",
        code="on_behalf_of_required",
    )


def end_users_capped(cap: int, retry_after: float) -> ApiError:
    """Retry-After: when the month (UTC) rolls over and the count starts afresh; ids already
    seen this month are still served meanwhile."""
    return ApiError(
        429,
        f"This organization has named {cap} distinct end users in X-On-Behalf-Of this month, "
        "its cap (limits.max_end_users_per_month); requests for end users already seen this "
        "month are still served.",
        type="rate_limit_error",
        code="end_user_limit",
        param="X-On-Behalf-Of",
        headers={"Retry-After": str(max(int(retry_after) + 1, 1)), "x-should-retry": "false"},
    )
