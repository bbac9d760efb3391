"""Calendar spend windows in UTC: the ids budgets report as ``spend.window`` and when each
window ends (which drives ``Retry-After`` and the spend hashes' lifetime)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from proxy.ledger.windows import (
    PERIODS,
    WINDOW_GRACE_SECONDS,
    WindowCache,
    Windows,
    iso_millis,
    window_id,
    windows_at,
)


def at(text: str) -> float:
    """Epoch seconds of an ISO 8601 UTC timestamp like ``2026-11-24T23:59:50``."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def ids(windows: Windows) -> tuple[str, str, str]:
    return windows.daily, windows.weekly, windows.monthly


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        ("2026-11-24T12:00:00", ("2026-11-24", "2026-W48", "2026-11")),
        # Sunday ends ISO week 48; Monday starts week 49, still in November.
        ("2026-11-29T23:59:59", ("2026-11-29", "2026-W48", "2026-11")),
        ("2026-11-30T00:00:00", ("2026-11-30", "2026-W49", "2026-11")),
        ("2026-12-01T00:00:00", ("2026-12-01", "2026-W49", "2026-12")),
        # 2026 has 53 ISO weeks: Dec 28 2026 - Jan 3 2027 is 2026-W53 on both sides of New Year.
        ("2026-12-28T00:00:00", ("2026-12-28", "2026-W53", "2026-12")),
        ("2026-12-31T23:59:59", ("2026-12-31", "2026-W53", "2026-12")),
        ("2027-01-01T00:00:00", ("2027-01-01", "2026-W53", "2027-01")),
        ("2027-01-03T23:59:59", ("2027-01-03", "2026-W53", "2027-01")),
        ("2027-01-04T00:00:00", ("2027-01-04", "2027-W01", "2027-01")),
        # The other direction: late December already belongs to next year's week 1.
        ("2024-12-30T08:00:00", ("2024-12-30", "2025-W01", "2024-12")),
        ("2020-12-31T08:00:00", ("2020-12-31", "2020-W53", "2020-12")),
        ("2021-01-03T08:00:00", ("2021-01-03", "2020-W53", "2021-01")),
        # Single-digit weeks and months are zero-padded; leap day exists.
        ("2028-02-29T10:00:00", ("2028-02-29", "2028-W09", "2028-02")),
    ],
)
def test_window_ids(moment: str, expected: tuple[str, str, str]) -> None:
    assert ids(windows_at(at(moment))) == expected
    parsed = datetime.fromisoformat(moment).replace(tzinfo=UTC)
    assert tuple(window_id(p, parsed) for p in PERIODS) == expected


def test_windows_are_utc_whatever_the_instant() -> None:
    # 23:30 UTC on Sunday is already Monday in UTC+1; the window must still be Sunday's.
    w = windows_at(at("2026-11-29T23:30:00"))
    assert ids(w) == ("2026-11-29", "2026-W48", "2026-11")


@pytest.mark.parametrize(
    ("moment", "daily_end", "weekly_end", "monthly_end"),
    [
        # A Tuesday in November.
        ("2026-11-24T23:59:50", "2026-11-25", "2026-11-30", "2026-12-01"),
        # Sunday: the week ends at the next midnight (Monday start).
        ("2026-11-29T10:00:00", "2026-11-30", "2026-11-30", "2026-12-01"),
        # Monday at midnight exactly: a full week ahead.
        ("2026-11-30T00:00:00", "2026-12-01", "2026-12-07", "2026-12-01"),
        # December ends in the next year; the week crosses New Year.
        ("2026-12-31T12:00:00", "2027-01-01", "2027-01-04", "2027-01-01"),
        # February of a leap year.
        ("2028-02-28T12:00:00", "2028-02-29", "2028-03-06", "2028-03-01"),
    ],
)
def test_window_ends(moment: str, daily_end: str, weekly_end: str, monthly_end: str) -> None:
    w = windows_at(at(moment))
    assert w.daily_end == at(daily_end + "T00:00:00")
    assert w.weekly_end == at(weekly_end + "T00:00:00")
    assert w.monthly_end == at(monthly_end + "T00:00:00")
    assert (w.end("daily"), w.end("weekly"), w.end("monthly")) == (
        w.daily_end,
        w.weekly_end,
        w.monthly_end,
    )


def test_seconds_left_and_ttl() -> None:
    now = at("2026-11-24T23:59:50")
    w = windows_at(now)
    assert w.seconds_left("daily", now) == 10
    assert w.seconds_left("weekly", now) == 5 * 86400 + 10
    assert w.seconds_left("monthly", now) == 6 * 86400 + 10
    # A spend window outlives its end by the grace period, so late settles still find it.
    assert w.ttl("daily", now) == 10 + 1 + WINDOW_GRACE_SECONDS
    assert w.ttl("daily", now) > w.seconds_left("daily", now)


def test_the_last_instant_of_a_day_belongs_to_it() -> None:
    before = windows_at(at("2026-11-25T00:00:00") - 0.001)
    after = windows_at(at("2026-11-25T00:00:00"))
    assert before.daily == "2026-11-24"
    assert after.daily == "2026-11-25"
    assert before.daily_end == after.daily_end - 86400


def test_window_cache_follows_the_clock_across_midnight_and_back() -> None:
    cache = WindowCache()
    evening = at("2026-11-24T23:59:50")
    first = cache.current(evening)
    assert ids(first) == ("2026-11-24", "2026-W48", "2026-11")
    # Within the same day the cached value is reused and still right.
    assert cache.current(evening + 9.999) is first
    assert cache.current(at("2026-11-24T00:00:00")) is first
    # Midnight: a new day, same week and month.
    assert ids(cache.current(at("2026-11-25T00:00:00"))) == ("2026-11-25", "2026-W48", "2026-11")
    # A clock that moves backwards (an injected clock, or NTP) gets the earlier day again.
    assert ids(cache.current(evening)) == ("2026-11-24", "2026-W48", "2026-11")
    # Jumps of weeks and months, forwards and backwards.
    assert ids(cache.current(at("2027-01-01T00:00:00"))) == ("2027-01-01", "2026-W53", "2027-01")
    assert ids(cache.current(at("2026-12-31T23:59:59"))) == ("2026-12-31", "2026-W53", "2026-12")
    assert ids(cache.current(at("2027-01-04T06:00:00"))) == ("2027-01-04", "2027-W01", "2027-01")


def test_window_cache_agrees_with_windows_at_every_hour_of_a_year_end() -> None:
    cache = WindowCache()
    start = at("2026-12-20T00:30:00")
    for hour in range(24 * 20):
        now = start + hour * 3600
        assert cache.current(now) == windows_at(now), hour


def test_iso_millis_matches_datetime_across_seconds() -> None:
    # Within one second, then the next, then back: the cached second must never leak.
    for now in (1764057600.0, 1764057600.5, 1764057600.999, 1764057601.001, 1764057600.25, 0.5):
        expected = (
            datetime.fromtimestamp(now, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
        )
        assert iso_millis(now) == expected
