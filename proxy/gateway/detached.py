"""Settles that outlive the handler that started them.

aiohttp cancels a handler when its client leaves (``handler_cancellation``); a settle cut
short there would never reach Redis or the spool, and the lease would be reclaimed at its
whole reservation. A settle interrupted so is run again as a task of its own (settles are
idempotent, so one that had landed is a no-op), and shutdown waits for those still running
before the spool closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class DetachedSettles:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def finish(self, settle: Coroutine[Any, Any, None]) -> None:
        """Runs ``settle`` to its end whatever happens to the request that asked for it."""
        task = asyncio.get_running_loop().create_task(settle)
        self._tasks.add(task)  # a strong reference: the loop keeps only weak ones
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a detached settle failed: %r", task.exception())

    async def wait(self, within: float) -> None:
        """At shutdown: the settles still running reach Redis or the spool (each is bounded
        by Redis's own timeouts); any past ``within`` seconds is left to its lease's reclaim."""
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=within)
            if late:
                log.warning("%d settles still running at shutdown", len(late))
