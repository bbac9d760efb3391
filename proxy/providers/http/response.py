"""The caller's view of one answer: status, headers and a body read as it arrives, all backed
by the connection that carries it (no copy of the body is kept here)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from multidict import CIMultiDict, CIMultiDictProxy

if TYPE_CHECKING:
    from proxy.providers.http.connection import Connection


class Response:
    """One response, read as it arrives. ``release()`` must be called when done with it."""

    status: int
    headers: CIMultiDictProxy[str]

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self.status = 0
        self.headers = CIMultiDictProxy(CIMultiDict())

    async def read(self) -> bytes:
        """The whole body."""
        parts = [chunk async for chunk in self.iter_chunks()]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Whatever has arrived since the last step, as one chunk."""
        connection = self._connection
        while True:
            chunk = connection.take()
            if chunk:
                yield chunk
            elif connection.complete:
                return
            elif connection.error is not None:
                raise connection.error
            else:
                await connection.wait()

    def release(self) -> None:
        """Returns a finished connection to the pool; an unfinished one is closed."""
        self._connection.release()

    def on_deadline(self, callback: Callable[[], None]) -> None:
        """Calls ``callback`` when the request's total time is up, even after the answer has
        arrived: the consumer's own work (relaying to a slow client) counts against the same
        deadline, on the request's one timer. Until ``release()``."""
        self._connection.watch_deadline(callback)

    def salvage(self) -> bytes:
        """Everything received and not yet taken, including what the socket holds right now,
        without waiting: for a consumer that abandons the answer but must count what arrived."""
        connection = self._connection
        connection.salvage()
        return connection.take()

    @property
    def complete(self) -> bool:
        return self._connection.complete
