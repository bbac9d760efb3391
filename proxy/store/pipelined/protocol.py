"""The reading side of a link: hiredis parses the replies, which are matched in order to
the calls waiting for them (a batch's WAIT reply releases the replies held for it)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import hiredis

from proxy.store.pipelined.errors import reply_error

if TYPE_CHECKING:
    from proxy.store.pipelined.link import Link


class LinkProtocol(asyncio.Protocol):
    """Feeds a link's replies to its callers as they arrive."""

    def __init__(self, owner: Link) -> None:
        self._owner = owner
        self._reader = hiredis.Reader(encoding="utf-8", errors="replace")

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        owner = self._owner
        pending = owner.pending
        while True:
            reply = self._reader.gets()
            if reply is False:
                break
            if not pending:
                break
            owner.unanswered -= 1
            future = pending.popleft()[0]
            if future is None:  # the batch's WAIT
                owner.release_held(reply)
                continue
            if future.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(reply_error(str(reply)))
            elif owner.holding:
                owner.held.append((future, reply))
            else:
                future.set_result(reply)
        if owner.unanswered == 0 and owner.outbox:
            owner.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._owner.protocol is self:
            self._owner.lost(f"Redis connection lost: {exc or 'closed by the server'}")
