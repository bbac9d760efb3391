"""Pipelining Redis connections for the hot path: the admit and settle script calls.

Every request makes two script calls. Through a pooled client each costs a connection
checkout, Python-level command packing and a socket round trip of its own; here all calls of a
process to one server share one connection (a ``Link``), are packed by hiredis and written as
they come, and replies are matched to callers in order. At most one batch is on the wire at a
time: calls made while Redis is answering wait for that answer and then leave together, so
under load the calls of many requests share one write and one read on each side (the "settles
pipelined across requests" the machine's measurements asked for), while a call made on an idle
connection leaves at once. Everything else (admin API, scripts loading) uses redis-py.

``PipelinedConnection`` is what admission calls. A router gives it the link of the master that
holds a call's slot — the one server of a ``redis://`` URL, the master the sentinels name, or
the master of the call's shard on a cluster (``proxy.store.cluster``, ``proxy.store.sentinel``)
— and it survives what a restart or a failover throws at a call:

* **A connection found dead before the reply** (Redis restarted, a master failed over): the
  router is asked again and the call is sent once more on a fresh connection. A call that had
  not left yet is always safe to resend; one that had is resent once, because both scripts are
  idempotent by request id (settle releases a lease at most once; a second admit with the same
  id gets the existing reservation, never a second lease).
* **MOVED** (the slot has another owner): the call follows it and the router reads the slot
  map again. **ASK** (the slot is being migrated) is followed for plain commands (``ASKING``
  first, on the same connection) but not for script calls: a script declares only the org
  prefix, a key that never exists, so Redis would send every call to the importing node,
  which holds only the keys moved so far — a budget checked against part of its spend.
  Such a call is treated like the next errors.
* **READONLY** (the old master came back as a replica), **TRYAGAIN**, **CLUSTERDOWN**,
  **LOADING**, an ASK for a script, a master that does not accept connections: Redis did not
  run the call; the router refreshes its map, and if that names another node the call goes
  there (a bounded number of times). Otherwise — a failover still under way — it fails at once
  as a store error (503 for an admit, a deferred retry for a settle), not after a wait.
* **NOSCRIPT** (a promoted replica never loaded the scripts): the script is loaded on that very
  node and the call sent again.

With ``durability = "replicated"`` each batch ends with ``WAIT <replicas> <timeout>``, and its
replies are handed out only once that many replicas hold the batch; otherwise every call of the
batch fails with ``ReplicaTimeout``. One ``WAIT`` per batch, not per call: Redis blocks a client
while it waits, so a ``WAIT`` behind every call would queue the batch behind as many replica
round trips.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import hiredis
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    MovedError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


class ConnectionLost(RedisConnectionError):  # type: ignore[misc]
    """The connection died before this call's reply. ``written``: whether the call had left;
    one that had not was never seen by Redis."""

    def __init__(self, message: str, written: bool) -> None:
        super().__init__(message)
        self.written = written


class ReplicaTimeout(RedisError):  # type: ignore[misc]
    """``durability = "replicated"``: too few replicas acknowledged the batch in time, so the
    call's writes may exist on the master alone (and be lost if it fails over)."""


_REPLY_ERRORS: dict[str, Callable[[str, str], ResponseError | RedisError]] = {
    "NOSCRIPT": lambda message, rest: NoScriptError(message),
    "READONLY": lambda message, rest: ReadOnlyError(message),
    "MOVED": lambda message, rest: MovedError(rest),
    "ASK": lambda message, rest: AskError(rest),
    "TRYAGAIN": lambda message, rest: TryAgainError(message),
    "CLUSTERDOWN": lambda message, rest: ClusterDownError(message),
    "MASTERDOWN": lambda message, rest: MasterDownError(message),
    "LOADING": lambda message, rest: BusyLoadingError(message),
}


def reply_error(message: str) -> RedisError:
    """The redis-py exception for an error reply, so callers handle both clients alike."""
    code, _, rest = message.partition(" ")
    make = _REPLY_ERRORS.get(code)
    if make is None:
        return ResponseError(message)
    try:
        return make(message, rest)
    except ValueError:  # a redirection without a readable address
        return ResponseError(message)


class _Protocol(asyncio.Protocol):
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
        self.protocol: _Protocol | None = None
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
                    lambda: _Protocol(self),
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


class Router(Protocol):
    """Which link a call goes to, and what to do when the topology shows it changed."""

    async def link_for(self, command: tuple[Any, ...]) -> Link: ...

    def link_at(self, host: str, port: int) -> Link: ...

    def moved(self, slot: int, host: str, port: int) -> None: ...

    async def refresh(self, failed: Link | None) -> None: ...

    def close(self) -> None: ...


class SingleNode:
    """One server: its link reconnects by itself, there is nothing to look up."""

    def __init__(self, link: Link) -> None:
        self._link = link

    async def link_for(self, command: tuple[Any, ...]) -> Link:
        return self._link

    def link_at(self, host: str, port: int) -> Link:
        raise ResponseError(f"ASK {host}:{port} from a server that is not in a cluster")

    def moved(self, slot: int, host: str, port: int) -> None:
        raise ResponseError(f"MOVED to {host}:{port} from a server that is not in a cluster")

    async def refresh(self, failed: Link | None) -> None:
        return None

    def close(self) -> None:
        self._link.close()


_SCRIPT_CALLS = ("EVALSHA", "EVAL")
_NOT_RUN = (ReadOnlyError, TryAgainError, ClusterDownError, BusyLoadingError)
"""Errors with which Redis refuses a call without running it."""


class _Attempt:
    __slots__ = ("written",)

    def __init__(self) -> None:
        self.written = False


class PipelinedConnection:
    """The hot path's ``execute(*command)``: routed, redirected and retried as described in
    the module's docstring. ``scripts``: SHA → source, to load a script a node lacks."""

    def __init__(
        self,
        router: Router,
        scripts: Mapping[str, str] | None = None,
        *,
        attempts: int = 3,
        redirects: int = 5,
    ) -> None:
        self._router = router
        self._scripts = scripts or {}
        self._attempts = attempts
        self._redirects = redirects

    async def execute(self, *command: Any) -> Any:
        """The reply; or the error, as ``ConnectionLost(written=True)`` whenever an attempt
        may have run (even if a later one failed before it left): a caller that gives up on
        the call must know whether Redis may still have applied it."""
        attempt = _Attempt()
        try:
            return await self._execute(command, attempt)
        except RedisError as exc:
            if attempt.written and not (isinstance(exc, ConnectionLost) and exc.written):
                raise ConnectionLost(
                    f"{exc} (after an attempt whose reply was lost)", written=True
                ) from exc
            raise

    async def _execute(self, command: tuple[Any, ...], attempt: _Attempt) -> Any:
        link = await self._router.link_for(command)
        asking = False
        failures = redirects = 0
        resent_written = loaded = False
        while True:
            try:
                if asking:
                    return await link.call_asking(*command)
                return await link.call(*command)
            except ConnectionLost as exc:
                if exc.written:
                    attempt.written = True
                    if resent_written:
                        raise
                    resent_written = True
                error: RedisError = exc
            except AskError as exc:  # MOVED too (a subclass)
                moved = isinstance(exc, MovedError)
                if not moved and command[0] in _SCRIPT_CALLS:
                    error = exc  # not followed: see the module's docstring
                else:
                    redirects += 1
                    if redirects > self._redirects:
                        raise
                    host = exc.host or link.host  # Redis 7 may leave out an unknown endpoint
                    if moved:
                        self._router.moved(exc.slot_id, host, exc.port)
                        link, asking = await self._router.link_for(command), False
                    else:
                        link, asking = self._router.link_at(host, exc.port), True
                    continue
            except NoScriptError:
                source = self._scripts.get(command[1]) if command[0] == "EVALSHA" else None
                if loaded or source is None:
                    raise
                loaded = True
                await link.call("SCRIPT", "LOAD", source)
                continue
            except _NOT_RUN as exc:
                error = exc
            except RedisConnectionError as exc:  # could not connect
                error = exc
            failures += 1
            if failures >= self._attempts:
                raise error
            await self._router.refresh(link)
            fresh = await self._router.link_for(command)
            if fresh is link and not isinstance(error, ConnectionLost):
                raise error  # nothing changed: the same node would refuse again (fast 503)
            link, asking = fresh, False

    def close(self) -> None:
        self._router.close()
