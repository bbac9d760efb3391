"""How admission decisions read over HTTP: reset durations, rate-limit headers and 429 bodies.

These are the strings clients and SDKs parse (``x-ratelimit-*``, ``Retry-After``,
``x-should-retry``, the OpenAI error object), so they are pinned down exactly.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

import pytest

from proxy.errors import ApiError
from proxy.gateway.decisions import (
    admitted_headers,
    budget_error,
    nano_to_major,
    openai_duration,
    rate_limited_error,
    request_window_ms,
)
from proxy.ledger.admission import Admitted, BudgetRefused, RateLimited
from proxy.ledger.windows import windows_at

RATE_HEADER_PREFIXES = ("x-ratelimit-", "ratelimit")


def admitted(**fields: Any) -> Admitted:
    """An admission with no limits and no budget, overridden by ``fields``."""
    base: dict[str, Any] = {
        "request_limit": None,
        "request_remaining": -1,
        "request_reset_ms": -1,
        "token_limit": None,
        "token_remaining": -1,
        "token_reset_ms": -1,
        "budget_remaining": None,
        "budget_line": None,
        "budget_unit": "",
        "budget_window": "",
        "budget_field": "",
    }
    base.update(fields)
    return Admitted(**base)


def limited(
    name: str, limit: int, retry_after_ms: int, scope: str = "key", current: int = 0
) -> RateLimited:
    return RateLimited(
        scope=scope,
        limit_name=name,
        limit=limit,
        retry_after_ms=retry_after_ms,
        current=current or limit,
    )


def body_of(error: ApiError) -> dict[str, Any]:
    """The JSON a client receives for this error."""
    response = error.response()
    assert response.status == error.status
    assert response.content_type == "application/json"
    assert isinstance(response.body, bytes)
    data: dict[str, Any] = json.loads(response.body)
    return data


# --- openai_duration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0ms"),
        (1, "1ms"),
        (12, "12ms"),
        (999, "999ms"),
        (1000, "1s"),
        (1500, "1.5s"),
        (1234, "1.234s"),
        (59_999, "59.999s"),
        (60_000, "1m0s"),
        (360_000, "6m0s"),
        (3_600_000, "1h0m0s"),
        (3_723_000, "1h2m3s"),
        (86_400_000, "24h0m0s"),
    ],
)
def test_openai_duration_formats_like_openai(ms: int, text: str) -> None:
    assert openai_duration(ms) == text


def test_openai_duration_never_negative() -> None:
    assert openai_duration(-5) == "0ms"


def test_nano_to_major_is_exact_decimal() -> None:
    assert nano_to_major(0) == "0"
    assert nano_to_major(1) == "0.000000001"
    assert nano_to_major(1_500_000_000) == "1.5"
    assert nano_to_major(2_000_000_000) == "2"


# --- admitted_headers -----------------------------------------------------------------------


def test_no_limits_and_no_budget_means_no_rate_headers() -> None:
    assert admitted_headers(admitted()) == {}


def test_request_limit_headers() -> None:
    # 5 per minute, 1.625 requests in the bucket after this one: empty in 19.5 s.
    headers = admitted_headers(
        admitted(request_limit=5, request_remaining=3, request_reset_ms=19_500)
    )
    assert headers == {
        "x-ratelimit-limit-requests": "5",
        "x-ratelimit-remaining-requests": "3",
        "x-ratelimit-reset-requests": "19.5s",
        "RateLimit-Policy": '"requests";q=5;w=60',
        "RateLimit": '"requests";r=3;t=20',
    }


def test_token_limit_headers() -> None:
    headers = admitted_headers(admitted(token_limit=1000, token_remaining=590, token_reset_ms=12))
    assert headers == {
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "590",
        "x-ratelimit-reset-tokens": "12ms",
        "RateLimit-Policy": '"tokens";q=1000;w=60',
        "RateLimit": '"tokens";r=590;t=1',
    }


def test_request_and_token_limits_together_list_both_policies() -> None:
    headers = admitted_headers(
        admitted(
            request_limit=7,
            request_remaining=0,
            request_reset_ms=360_000,
            token_limit=5000,
            token_remaining=4000,
            token_reset_ms=60_000,
        )
    )
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "6m0s"
    assert headers["x-ratelimit-reset-tokens"] == "1m0s"
    assert headers["RateLimit-Policy"] == '"requests";q=7, "tokens";q=5000;w=60'
    assert headers["RateLimit"] == '"requests";r=0;t=360, "tokens";r=4000;t=60'


def test_remaining_is_never_shown_negative() -> None:
    headers = admitted_headers(
        admitted(
            request_limit=1,
            request_remaining=-1,
            request_reset_ms=1000,
            token_limit=10,
            token_remaining=-3,
            token_reset_ms=1000,
        )
    )
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-remaining-tokens"] == "0"


def test_cost_budget_headers_in_major_units() -> None:
    headers = admitted_headers(
        admitted(
            budget_remaining=1_250_000_000,
            budget_line=5_000_000_000,
            budget_unit="c",
            budget_window="2026-11",
            budget_field="o:org",
        )
    )
    assert headers == {
        "x-budget-remaining": "1.25",
        "x-budget-kind": "cost",
        "x-budget-window": "2026-11",
        "x-budget-scope": "org",
    }
    assert not any(name.lower().startswith(RATE_HEADER_PREFIXES) for name in headers)


def test_token_budget_headers() -> None:
    headers = admitted_headers(
        admitted(
            budget_remaining=420,
            budget_line=1000,
            budget_unit="t",
            budget_window="2026-11-24",
            budget_field="k:key_1:cluster",
        )
    )
    assert headers["x-budget-remaining"] == "420"
    assert headers["x-budget-kind"] == "tokens"
    assert headers["x-budget-scope"] == "apikey"


# --- rate_limited_error ---------------------------------------------------------------------


def test_per_second_refusal_says_retry_soon() -> None:
    error = rate_limited_error(limited("rps", 5, 400))
    assert error.status == 429
    assert error.headers == {
        "Retry-After": "1",
        "retry-after-ms": "400",
        "x-should-retry": "true",
        "x-ratelimit-limit-requests": "5",
        "x-ratelimit-remaining-requests": "0",
        # When the bucket is empty: this request's retry + 4 more fifths of a second.
        "x-ratelimit-reset-requests": "1.2s",
        "RateLimit-Policy": '"requests";q=5;w=1',
        "RateLimit": '"requests";r=0;t=2',
    }
    body = body_of(error)
    assert body == {
        "error": {
            "message": "Rate limit exceeded: the API key's limit of 5 requests per second is "
            "reached (5 in use). Try again in 1s.",
            "type": "requests",
            "code": "rate_limit_exceeded",
            "param": None,
        }
    }


def test_retry_after_rounds_up_to_whole_seconds() -> None:
    error = rate_limited_error(limited("rpm", 4, 29_999))
    assert error.headers["Retry-After"] == "30"
    assert error.headers["retry-after-ms"] == "29999"
    assert "Try again in 30s." in error.message
    assert "4 requests per minute" in error.message


@pytest.mark.parametrize(
    ("retry_ms", "should_retry"),
    [(60_000, "true"), (60_001, "false"), (3_600_000, "false")],
)
def test_sdk_is_told_not_to_retry_long_waits(retry_ms: int, should_retry: str) -> None:
    """The SDKs sleep up to two minutes on their own; a longer wait must not be retried."""
    error = rate_limited_error(limited("rph", 9, retry_ms))
    assert error.headers["x-should-retry"] == should_retry
    assert int(error.headers["Retry-After"]) * 1000 >= retry_ms


def test_per_day_refusal_tells_sdk_not_to_retry() -> None:
    error = rate_limited_error(limited("rpd", 11, 86_000_000))
    assert error.headers["x-should-retry"] == "false"
    assert error.headers["Retry-After"] == "86000"
    assert "11 requests per day" in error.message


def test_org_refusal_names_the_organization() -> None:
    error = rate_limited_error(limited("rpm", 4, 1000, scope="org"))
    assert "the organization's limit of 4 requests per minute" in error.message


def test_tokens_per_minute_refusal_is_of_type_tokens() -> None:
    error = rate_limited_error(limited("tpm", 1000, 60_000, current=820))
    body = body_of(error)["error"]
    assert body["type"] == "tokens"
    assert body["code"] == "rate_limit_exceeded"
    assert "1000 tokens per minute" in body["message"]
    assert "(820 in use)" in body["message"]
    assert error.headers["Retry-After"] == "60"
    assert error.headers["x-should-retry"] == "true"
    assert error.headers["x-ratelimit-limit-tokens"] == "1000"
    assert error.headers["x-ratelimit-remaining-tokens"] == "0"
    assert "x-ratelimit-limit-requests" not in error.headers


def test_request_larger_than_tokens_per_minute_is_never_retried() -> None:
    """A reservation above the limit can never fit: no Retry-After, and no retries."""
    error = rate_limited_error(limited("tpm", 1000, -1, current=0))
    body = body_of(error)["error"]
    assert body["type"] == "tokens"
    message = body["message"]
    assert "reserves more tokens than the API key's limit of 1000 tokens per minute" in message
    assert "max_tokens" in message
    assert error.headers["x-should-retry"] == "false"
    assert "Retry-After" not in error.headers


def test_concurrency_refusal_suggests_a_short_retry() -> None:
    """When a slot frees is unknown (in-flight requests), a 1 s retry is offered."""
    error = rate_limited_error(limited("concurrency", 3, -1, current=3))
    assert error.headers == {
        "Retry-After": "1",
        "retry-after-ms": "1000",
        "x-should-retry": "true",
    }
    assert "limit of 3 concurrent requests is reached (3 in use)" in error.message
    assert body_of(error)["error"]["type"] == "requests"


def test_refusal_reset_means_what_it_means_on_admitted_answers() -> None:
    """The reset is when the bucket is whole again: the retry time, when one more request
    fits, plus the drain of the other limit - 1 (3 x 15 s here), not the retry time."""
    error = rate_limited_error(limited("rpm", 4, 29_999))
    assert error.headers["x-ratelimit-reset-requests"] == "1m14.999s"
    assert error.headers["RateLimit"] == '"requests";r=0;t=75'
    assert error.headers["retry-after-ms"] == "29999"


def test_token_refusal_reset_counts_the_refused_reservation() -> None:
    # 1000 tpm, a request reserving 400 that fits in 6 s: the bucket is empty 36 s later.
    error = rate_limited_error(limited("tpm", 1000, 6_000, current=700), cost=400)
    assert error.headers["x-ratelimit-reset-tokens"] == "42s"
    assert error.headers["RateLimit-Policy"] == '"tokens";q=1000;w=60'


def test_a_request_that_never_fits_still_says_when_the_bucket_is_empty() -> None:
    error = rate_limited_error(limited("tpm", 1000, -1, current=250), cost=5000)
    assert error.headers["x-ratelimit-reset-tokens"] == "15s"
    assert "Retry-After" not in error.headers


def test_a_window_that_cannot_be_told_apart_is_left_out() -> None:
    """10**6 per second and per minute both drain one request in under a millisecond."""
    assert request_window_ms(10**6, 999_999, 1) is None
    headers = admitted_headers(
        admitted(request_limit=10**6, request_remaining=999_999, request_reset_ms=1)
    )
    assert headers["RateLimit-Policy"] == '"requests";q=1000000'


@pytest.mark.parametrize(
    ("name", "window_ms"),
    [("rps", 1000), ("rpm", 60_000), ("rph", 3_600_000), ("rpd", 86_400_000)],
)
@pytest.mark.parametrize("limit", [1, 2, 7, 100, 10**6])
@pytest.mark.parametrize("level", [0.0, 0.3, 0.999, 1.5])
def test_the_request_window_is_read_back_from_the_bucket(
    name: str, window_ms: int, limit: int, level: float
) -> None:
    """As the admit script reports an admission (level before + 1 request)."""
    if window_ms / limit < 2:
        # Draining a request in under 2 ms: rps and rpm both report a 1 ms reset.
        limit = window_ms // 2
    after = min(level, limit - 1) + 1
    remaining = math.floor(limit - after + 1e-9)
    reset_ms = math.ceil(after * window_ms / limit - 1e-9)
    assert request_window_ms(limit, remaining, reset_ms) == window_ms, name
    headers = admitted_headers(
        admitted(request_limit=limit, request_remaining=remaining, request_reset_ms=reset_ms)
    )
    assert headers["RateLimit-Policy"] == f'"requests";q={limit};w={window_ms // 1000}'


# --- budget_error ---------------------------------------------------------------------------


def test_budget_refusal_is_insufficient_quota_and_never_retried() -> None:
    now = windows_at(0).daily_end + 12 * 3600  # midday, far from any window's end
    windows = windows_at(now)
    refused = BudgetRefused(
        field="k:key_1:cluster", why="blocked", window=windows.daily, spent=10, line=10, reserved=3
    )
    error = budget_error(refused, windows, now)
    body = body_of(error)["error"]
    assert error.status == 429
    assert body["type"] == "insufficient_quota"
    assert body["code"] == "budget_exceeded"
    assert "daily budget of this API key" in body["message"]
    assert error.headers["x-should-retry"] == "false"
    assert "Retry-After" not in error.headers
    reset = datetime.fromtimestamp(windows.daily_end, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert {k: v for k, v in error.headers.items() if k.startswith("x-budget-")} == {
        "x-budget-scope": "apikey",
        "x-budget-owner": "cluster",
        "x-budget-kind": "tokens",
        "x-budget-window": windows.daily,
        "x-budget-reset": reset,
        "x-budget-remaining": "0",
        "x-budget-reserved": "3",
    }
    assert body["budget"] == {
        "scope": "apikey",
        "scope_id": "key_1",
        "owner": "cluster",
        "period": "daily",
        "window": windows.daily,
        "limit_kind": "tokens",
        "reason": "blocked",
        "line": "10",
        "used": "10",
        "reserved": "3",
        "remaining": "0",
        "reset_at": reset,
    }
    assert "reserves 3 tokens; 0 of 10 tokens are left" in body["message"]
    assert f"resets at {reset}" in body["message"]


def test_cost_budget_refusal_explains_in_currency_units() -> None:
    now = windows_at(0).daily_end + 12 * 3600
    windows = windows_at(now)
    refused = BudgetRefused(
        field="o:org",
        why="exceeds",
        window=windows.monthly,
        spent=1_500_000_000,
        line=2_000_000_000,
        reserved=600_000_000,
        unit="c",
    )
    error = budget_error(refused, windows, now, org_id="acme")
    budget = body_of(error)["error"]["budget"]
    assert (budget["scope"], budget["scope_id"], budget["period"]) == ("org", "acme", "monthly")
    assert (budget["limit_kind"], budget["used"], budget["line"]) == ("cost", "1.5", "2")
    assert (budget["reserved"], budget["remaining"]) == ("0.6", "0.5")
    assert error.headers["x-budget-kind"] == "cost"
    assert error.headers["x-budget-remaining"] == "0.5"
    assert "reserves 0.6 currency units; 0.5 of 2 currency units are left" in error.message


def test_end_user_budget_refusals_name_the_end_user() -> None:
    now = windows_at(0).daily_end + 12 * 3600
    windows = windows_at(now)
    explicit = BudgetRefused(
        field="u:616c696365:org", why="exceeds", window=windows.daily, spent=5, line=10, reserved=6
    )
    error = budget_error(explicit, windows, now, org_id="acme", end_user="alice")
    budget = body_of(error)["error"]["budget"]
    assert (budget["scope"], budget["scope_id"], budget["target_id"]) == (
        "external_user",
        "alice",
        "alice",
    )
    assert "budget of end user 'alice'" in error.message
    default = BudgetRefused(
        field="ud:cluster", why="blocked", window=windows.weekly, spent=10, line=10
    )
    error = budget_error(default, windows, now, org_id="acme", end_user="bob")
    budget = body_of(error)["error"]["budget"]
    assert (budget["scope"], budget["scope_id"], budget["target_id"]) == (
        "external_user_default",
        "acme",
        "bob",
    )
    assert error.headers["x-budget-scope"] == "external_user_default"
    assert "weekly default budget for each end user, here 'bob'" in error.message


def test_budget_refusal_near_the_window_end_says_when_it_reopens() -> None:
    windows = windows_at(1_800_000_000)
    now = windows.daily_end - 42.5
    refused = BudgetRefused(field="o:org", why="exceeds", window=windows.daily, spent=9, line=10)
    error = budget_error(refused, windows, now)
    assert error.headers["x-should-retry"] == "false"
    assert error.headers["Retry-After"] == "43"
    assert "organization" in error.message
    assert "worst case" in error.message
