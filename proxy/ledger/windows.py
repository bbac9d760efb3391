"""Calendar spend windows (UTC) and the injectable clock every time-dependent rule reads.

The proxy never asks Redis for the time: scripts receive ``now`` from here, so tests move time
by replacing the clock instead of sleeping until midnight.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

Period = Literal["daily", "weekly", "monthly"]
PERIODS: tuple[Period, ...] = ("daily", "weekly", "monthly")

Clock = Callable[[], float]
"""Seconds since the epoch, like ``time.time``."""

system_clock: Clock = time.time

# Spend windows outlive their end by this much, so a late settle or a report still finds them.
WINDOW_GRACE_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True)
class Windows:
    """The current window id of each period and when each ends (epoch seconds)."""

    daily: str
    weekly: str
    monthly: str
    daily_end: float
    weekly_end: float
    monthly_end: float

    def of(self, period: Period) -> str:
        return {"daily": self.daily, "weekly": self.weekly, "monthly": self.monthly}[period]

    def end(self, period: Period) -> float:
        return {"daily": self.daily_end, "weekly": self.weekly_end, "monthly": self.monthly_end}[
            period
        ]

    def seconds_left(self, period: Period, now: float) -> float:
        return self.end(period) - now

    def ttl(self, period: Period, now: float) -> int:
        """Redis TTL of a spend window: past its end by a grace period, for late settles."""
        return max(int(self.end(period) - now) + 1 + WINDOW_GRACE_SECONDS, 1)

    def ttls(self, now: float) -> tuple[int, int, int]:
        """Daily, weekly and monthly TTLs, in the order the scripts take them (every admit and
        settle asks, so without ``ttl``'s lookups)."""
        grace = 1 + WINDOW_GRACE_SECONDS
        return (
            max(int(self.daily_end - now) + grace, 1),
            max(int(self.weekly_end - now) + grace, 1),
            max(int(self.monthly_end - now) + grace, 1),
        )


def _next_month(day: date) -> date:
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


def window_id(period: Period, moment: datetime) -> str:
    day = moment.date()
    if period == "daily":
        return day.isoformat()
    if period == "weekly":
        year, week, _ = day.isocalendar()
        return f"{year}-W{week:02d}"
    return f"{day.year}-{day.month:02d}"


def windows_at(now: float) -> Windows:
    moment = datetime.fromtimestamp(now, UTC)
    day = moment.date()
    start_of_day = datetime(day.year, day.month, day.day, tzinfo=UTC)
    end_day = start_of_day + timedelta(days=1)
    end_week = start_of_day + timedelta(days=7 - day.weekday())
    nm = _next_month(day)
    end_month = datetime(nm.year, nm.month, 1, tzinfo=UTC)
    return Windows(
        daily=window_id("daily", moment),
        weekly=window_id("weekly", moment),
        monthly=window_id("monthly", moment),
        daily_end=end_day.timestamp(),
        weekly_end=end_week.timestamp(),
        monthly_end=end_month.timestamp(),
    )


class WindowCache:
    """Windows change once a day at most; recomputing them per request is waste."""

    def __init__(self) -> None:
        self._windows = windows_at(0)
        self._valid_from = 0.0

    def current(self, now: float) -> Windows:
        if not self._valid_from <= now < self._windows.daily_end:
            self._windows = windows_at(now)
            self._valid_from = self._windows.daily_end - 86400
        return self._windows


def rfc3339(at: float) -> str:
    """An instant as RFC 3339 UTC, whole seconds rounded up (``2026-11-25T00:00:00Z``): a
    window's end, when a client may come back."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(math.ceil(at)))


_SECOND: list[Any] = [None, ""]


def iso_millis(now: float) -> str:
    """``2026-11-25T08:00:00.123Z``. Settle stamps every request with it, so the per-second
    part is formatted once per second."""
    second = int(now)
    if _SECOND[0] != second:
        _SECOND[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return f"{_SECOND[1]}.{int(now * 1000) % 1000:03d}Z"
