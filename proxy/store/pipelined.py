"""A pipelining Redis connection for the hot path: the admit and settle script calls.

Every request makes two script calls. Through a pooled client each costs a connection
checkout, Python-level command packing and a socket round trip of its own; here all calls of a
process share one connection, are packed by hiredis and written as they come, and replies are
matched to callers in order. At most one batch is on the wire at a time: calls made while
Redis is answering wait for that answer and then leave together, so under load the calls of
many requests share one write and one read on each side (the "settles pipelined across
requests" the machine's measurements asked for), while a call made on an idle connection
leaves at once. Everything else (admin API, scripts loading) uses redis-py.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any
from urllib.parse import urlsplit

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: PipelinedConnection) -> None:
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
            if future.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                message = str(reply)
                error = (
                    NoScriptError(message)
                    if message.startswith("NOSCRIPT")
                    else ResponseError(message)
                )
                future.set_exception(error)
            else:
                future.set_result(reply)
        if owner.unanswered == 0 and owner.outbox:
            owner.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._owner.protocol is self:
            self._owner.lost(RedisConnectionError(f"Redis connection lost: {exc or 'closed'}"))


class PipelinedConnection:
    """One connection, opened on first use and again after a failure."""

    def __init__(self, url: str, timeout: float, connect_timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", ""):
            raise ValueError("the pipelined connection supports redis:// URLs only")
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._db = int(parts.path.lstrip("/") or 0)
        self._password = parts.password
        self._username = parts.username
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._transport: Any = None  # asyncio or uvloop transport
        self.protocol: _Protocol | None = None
        self._connecting: asyncio.Future[None] | None = None
        self.pending: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._watchdog: asyncio.TimerHandle | None = None
        self.outbox: list[bytes] = []
        """Packed commands waiting for the batch on the wire to be answered."""
        self.unanswered = 0
        self._flush_scheduled = False

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: _Protocol(self), self._host, self._port),
                self._connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(f"cannot connect to Redis: {exc}") from exc
        self._transport, self.protocol = transport, protocol  # uvloop's is no asyncio subclass
        setup: list[tuple[Any, ...]] = []
        if self._password:
            setup.append(("AUTH", self._username or "default", self._password))
        if self._db:
            setup.append(("SELECT", self._db))
        for command in setup:
            await self._send(command)

    async def execute(self, *command: Any) -> Any:
        if self._transport is None or self._transport.is_closing():
            if self._connecting is None:
                self._connecting = asyncio.ensure_future(self._connect())
            connecting = self._connecting
            try:
                await connecting
            finally:
                if self._connecting is connecting and connecting.done():
                    self._connecting = None
        return await self._send(command)

    def _send(self, command: tuple[Any, ...]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        transport = self._transport
        if transport is None or transport.is_closing():
            future.set_exception(RedisConnectionError("Redis connection is closed"))
            return future
        self.outbox.append(hiredis.pack_command(command))
        if not self.unanswered and not self._flush_scheduled:
            # Sent at the end of this loop iteration, with the calls other requests make in it.
            self._flush_scheduled = True
            loop.call_soon(self.flush)
        self.pending.append((future, loop.time() + self._timeout))
        if self._watchdog is None:
            self._watchdog = loop.call_later(self._timeout, self._check_deadline)
        return future

    def flush(self) -> None:
        """One socket write for every command queued since the last one."""
        self._flush_scheduled = False
        if self.unanswered:
            return  # the answer in flight sends these when it arrives
        outbox, self.outbox = self.outbox, []
        transport = self._transport
        if outbox and transport is not None and not transport.is_closing():
            self.unanswered = len(outbox)
            transport.write(b"".join(outbox) if len(outbox) > 1 else outbox[0])

    def _check_deadline(self) -> None:
        """A reply overdue means Redis is gone or stuck: fail everything, reconnect later."""
        self._watchdog = None
        if not self.pending:
            return
        loop = asyncio.get_running_loop()
        deadline = self.pending[0][1]
        if loop.time() >= deadline:
            transport = self._transport
            self.lost(RedisTimeoutError("Redis did not answer in time"))
            if transport is not None:
                transport.abort()
            return
        self._watchdog = loop.call_later(deadline - loop.time(), self._check_deadline)

    def lost(self, error: Exception) -> None:
        self._transport, self.protocol = None, None
        self.outbox = []
        self.unanswered = 0
        pending, self.pending = self.pending, collections.deque()
        for future, _ in pending:
            if not future.done():
                future.set_exception(error)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
