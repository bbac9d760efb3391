"""The request's one timer: total deadline and read silence.

One ``call_at`` per request, re-armed only when it fires, rather than a timer per read: the
silence check compares against the time of the last bytes instead of being pushed back by
each of them."""

from __future__ import annotations

from collections.abc import Callable

from proxy.providers.http.errors import UpstreamTimeout
from proxy.providers.http.state import ConnectionState


class Deadlines(ConnectionState):
    """The timer part of a connection."""

    def _check(self) -> None:
        """Armed by ``Connection.start``; fires at the deadline or when silence may be due."""
        self._timer = None
        now = self._loop.time()
        if now >= self._deadline:
            if not self.complete and self.error is None:
                self.salvage()  # what arrived before the deadline is counted, not dropped
                self._fail(UpstreamTimeout("the upstream did not finish in time"))
            callback, self._on_deadline = self._on_deadline, None
            if callback is not None:
                callback()
            return
        if self.complete or self.error is not None:
            self._rearm_for_deadline()
            return
        if self._paused:
            # Silence while paused is ours; _last_data + read may be long past, and a timer
            # set in the past fires at once, on every loop turn until the consumer reads.
            again = now + self._timeouts.read
        elif now >= self._last_data + self._timeouts.read:
            self._fail(UpstreamTimeout("the upstream went silent"))
            self._rearm_for_deadline()
            return
        else:
            again = self._last_data + self._timeouts.read
        self._timer = self._loop.call_at(min(self._deadline, again), self._check)

    def _rearm_for_deadline(self) -> None:
        """The answer is over but its consumer still works under the deadline."""
        if self._on_deadline is not None and self._timer is None:
            self._timer = self._loop.call_at(self._deadline, self._check)

    def watch_deadline(self, callback: Callable[[], None]) -> None:
        self._on_deadline = callback
        self._rearm_for_deadline()

    def _finish(self) -> None:
        """The answer is over; its timer stays while the consumer is under the deadline."""
        if self._timer is not None and self._on_deadline is None:
            self._timer.cancel()
            self._timer = None

    def _stop_timer(self) -> None:
        self._on_deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
