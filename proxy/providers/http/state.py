"""The state one connection keeps for the request it carries, shared by its parts: the
parser (``parser.py``) fills it, the request's timer (``timers.py``) fails it, the connection
(``connection.py``) hands it to the caller. Plain attributes on one object, not separate
objects, because every byte of every answer passes through them."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httptools

from proxy.providers.http.errors import UpstreamError
from proxy.providers.http.models import Timeouts

if TYPE_CHECKING:
    from proxy.providers.http.response import Response


class ConnectionState:
    """Per-request state, reset before each request on the same connection."""

    transport: Any
    """asyncio's or uvloop's transport (uvloop's are no ``asyncio.Transport`` subclasses)."""
    _loop: asyncio.AbstractEventLoop
    _parser: httptools.HttpResponseParser
    _timeouts: Timeouts

    def _reset(self) -> None:
        self._response: Response | None = None
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._decoder: Any = None
        self._until_close = False
        self._interim = False
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._on_deadline: Callable[[], None] | None = None
        self._last_data = 0.0
        self.headers_done = False
        self.complete = False
        self.error: UpstreamError | None = None
        self.keep_alive = False

    async def wait(self) -> None:
        """Until the parser, the timer or the socket has news for the caller."""
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None and not self.complete:
            self.error = error
        self.keep_alive = False
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    # Provided by the other parts; declared here so each part type-checks on its own.

    def salvage(self) -> None:
        """Feeds the parser what the socket holds now (``connection.Connection``)."""
        raise NotImplementedError

    def _finish(self) -> None:
        """Ends the request's timer once the answer is over (``timers.Deadlines``)."""
        raise NotImplementedError
