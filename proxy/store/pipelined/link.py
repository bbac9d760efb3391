"""A link: one pipelined connection to one Redis server, written in batches.

Calls made while a batch is on the wire wait for its answer and then leave together in one
write; a call made on an idle connection leaves at the end of the loop iteration. A watchdog
fails every call when a reply is overdue, and a lost connection fails them saying whether each
had left (``ConnectionLost.written``)."""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Callable
from typing import Any

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.store.pipelined.errors import ConnectionLost, ReplicaTimeout
from proxy.store.pipelined.protocol import LinkProtocol


class Link:
    """One pipelined connection to one Redis server, opened on first use and again after a
    failure. ``wait``: (replicas, timeout ms) for ``durability = "replicated"``; ``tls``: the
    context for ``rediss`` URLs (the server's name or address is verified)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float,
        connect_timeout: float,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        wait: tuple[int, int] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self._tls = tls
        self.port = port
        self._db = db
        self._password = password
        self._username = username
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._transport: Any = None  # asyncio or uvloop transport
        self.protocol: LinkProtocol | None = None
        self._connecting: asyncio.Future[None] | None = None
        self.pending: collections.deque[tuple[asyncio.Future[Any] | None, float]] = (
            collections.deque()
        )
        """One entry per call written or queued, in order; ``None`` marks a batch's WAIT."""
        self._watchdog: asyncio.TimerHandle | None = None
        self.outbox: list[bytes] = []
        """Packed commands waiting for the batch on the wire to be answered."""
        self.unanswered = 0
        """Entries at the head of ``pending`` that are on the wire."""
        self._flush_scheduled = False
        self._wait = wait
        wait_command: tuple[Any, ...] = ("WAIT", *wait) if wait else ()
        self._wait_command = hiredis.pack_command(wait_command) if wait else None
        self._batch_waits = False
        self.holding = False
        """The batch on the wire ends with a WAIT: its replies are held until it answers."""
        self.held: list[tuple[asyncio.Future[Any], Any]] = []

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await asyncio.wait_for(
                loop.create_connection(
                    lambda: LinkProtocol(self),
                    self.host,
                    self.port,
                    ssl=self._tls,
                    server_hostname=self.host if self._tls else None,
                ),
                self._connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(
                f"cannot connect to Redis at {self.host}:{self.port}: {exc}"
            ) from exc
        self._transport, self.protocol = transport, protocol  # uvloop's is no asyncio subclass
        setup: list[tuple[Any, ...]] = []
        if self._password:
            setup.append(("AUTH", self._username or "default", self._password))
        if self._db:
            setup.append(("SELECT", self._db))
        for command in setup:
            await self._send(command, wait=False)

    async def connected(self) -> None:
        """Opens the connection unless it is open; concurrent callers share one attempt."""
        if self._transport is not None and not self._transport.is_closing():
            return
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            # Shielded: a caller cancelled meanwhile (its client left) must not cancel the
            # attempt the other callers are waiting for.
            await asyncio.shield(connecting)
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None

    async def call(self, *command: Any) -> Any:
        """One attempt: the reply, or the error (``ConnectionLost`` says if the call left)."""
        if self._transport is None or self._transport.is_closing():
            await self.connected()
        return await self._send(command)

    async def call_asking(self, *command: Any) -> Any:
        """``ASKING`` and the call, back to back on this connection (ASK redirection)."""
        await self.connected()
        asking = self._send(("ASKING",))
        reply = self._send(command)
        await asking
        return await reply

    def _send(self, command: tuple[Any, ...], wait: bool = True) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        transport = self._transport
        if transport is None or transport.is_closing():
            future.set_exception(ConnectionLost("Redis connection is closed", written=False))
            return future
        self.outbox.append(hiredis.pack_command(command))
        self._batch_waits = self._batch_waits or wait
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
            # Everything queued is in this batch: its WAIT goes last, in ``pending`` too.
            self.holding = self._wait_command is not None and self._batch_waits
            if self.holding:
                assert self._wait_command is not None
                outbox.append(self._wait_command)
                self.pending.append((None, asyncio.get_running_loop().time() + self._timeout))
            self._batch_waits = False
            self.unanswered = len(outbox)
            transport.write(b"".join(outbox) if len(outbox) > 1 else outbox[0])

    def release_held(self, reply: Any) -> None:
        """The batch's WAIT answered: hand out its replies, or fail them all."""
        held, self.held = self.held, []
        self.holding = False
        assert self._wait is not None
        acknowledged = reply if isinstance(reply, int) else -1
        for future, value in held:
            if future.done():
                continue
            if acknowledged >= self._wait[0]:
                future.set_result(value)
            else:
                future.set_exception(
                    ReplicaTimeout(
                        f"{max(acknowledged, 0)} of {self._wait[0]} replica(s) acknowledged "
                        f"within {self._wait[1]} ms"
                    )
                )

    def _check_deadline(self) -> None:
        """A reply overdue means Redis is gone or stuck: fail everything, reconnect later."""
        self._watchdog = None
        if not self.pending:
            return
        loop = asyncio.get_running_loop()
        deadline = self.pending[0][1]
        if loop.time() >= deadline:
            transport = self._transport
            self._fail_all(lambda written: RedisTimeoutError("Redis did not answer in time"))
            if transport is not None:
                transport.abort()
            return
        self._watchdog = loop.call_later(deadline - loop.time(), self._check_deadline)

    def lost(self, message: str) -> None:
        self._fail_all(lambda written: ConnectionLost(message, written))

    def _fail_all(self, error: Callable[[bool], RedisError]) -> None:
        written = self.unanswered
        self._transport, self.protocol = None, None
        self.outbox = []
        self.unanswered = 0
        self._batch_waits = False
        self.holding = False
        pending, self.pending = self.pending, collections.deque()
        held, self.held = self.held, []
        for answered, _ in held:  # answered, but the batch's WAIT never was
            if not answered.done():
                answered.set_exception(error(True))
        for index, (future, _) in enumerate(pending):
            if future is not None and not future.done():
                future.set_exception(error(index < written))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None


async def ask_once(link: Link, *command: Any) -> Any:
    """One command on a connection of its own, closed after it (topology queries)."""
    try:
        return await link.call(*command)
    finally:
        link.close()
