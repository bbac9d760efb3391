"""A small HTTP/1.1 client for the upstream hop: pooled keep-alive connections, one write per
request, responses parsed by ``httptools`` (llhttp, the parser Node.js uses).

Why not ``aiohttp.ClientSession``: on this path it cost the proxy about as much CPU per request
as everything the proxy adds (auth, token counting, both Redis scripts), mostly in per-request
objects and timers that a gateway talking to a handful of fixed upstreams does not need. This
client does only what the upstream hop needs: POST a body, relay the answer as it arrives, and
enforce connect, read (silence) and total timeouts with one timer per request. No redirects,
cookies, proxies or retries: a request is sent once (an LLM call is not idempotent).
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import os
import ssl
import struct
import termios
import zlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

_HIGH_WATER = 256 * 1024
"""Unread response bytes past which the socket stops being read (back-pressure)."""
_LOW_WATER = 64 * 1024
_IDLE_PER_HOST = 256


class UpstreamError(Exception):
    """The upstream could not be reached, or its connection broke before the answer ended."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    """Connect, read (silence) or total timeout."""


class UpstreamConnectError(UpstreamError):
    """No connection could be made, so nothing was sent: the one failure after which the same
    request may safely go to another upstream."""


class UpstreamConnectTimeout(UpstreamConnectError, UpstreamTimeout):
    """The connection was not established in time (nothing was sent)."""


@dataclass(frozen=True)
class Timeouts:
    connect: float
    read: float
    """Longest silence tolerated while waiting for the upstream's bytes."""
    total: float


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Target:
    """A parsed URL, computed once per upstream endpoint."""

    origin: Origin
    path: str

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(Origin(parts.scheme, parts.hostname, port), path)


class Response:
    """One response, read as it arrives. ``release()`` must be called when done with it."""

    status: int
    headers: CIMultiDictProxy[str]

    def __init__(self, connection: _Connection) -> None:
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


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one request at a time."""

    def __init__(self, pool: Client, origin: Origin) -> None:
        self._pool = pool
        self.origin = origin
        self._loop = asyncio.get_running_loop()
        self.transport: Any = None
        self.closed = False
        self.idle_since = 0.0
        # One parser for the connection's life: llhttp reads keep-alive answers one after another.
        self._parser = httptools.HttpResponseParser(self)
        self._reset()

    def _reset(self) -> None:
        """Per-request state."""
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

    # --- the request -----------------------------------------------------------------------

    def start(self, head: bytes, body: bytes, timeouts: Timeouts) -> Response:
        assert self.transport is not None
        self._reset()
        self._timeouts = timeouts
        now = self._loop.time()
        self._deadline = now + timeouts.total
        self._last_data = now
        self._timer = self._loop.call_at(min(self._deadline, now + timeouts.read), self._check)
        self._response = Response(self)
        if len(body) < 16 * 1024:
            self.transport.write(head + body)
        else:
            self.transport.writelines((head, body))
        return self._response

    async def headers(self) -> Response:
        while not self.headers_done:
            if self.error is not None:
                raise self.error
            await self.wait()
        assert self._response is not None
        return self._response

    async def wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take(self) -> bytes:
        chunks = self._chunks
        if not chunks:
            return b""
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self._last_data = self._loop.time()  # silence while paused was ours, not theirs
            self.transport.resume_reading()
        return data

    def _check(self) -> None:
        """The request's one timer: total deadline and read silence."""
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

    def salvage(self) -> None:
        """Feeds the parser every byte the socket holds now, without waiting.

        The transport only reads when the loop polls, and not at all while paused
        (back-pressure), so a consumer that gives up would otherwise lose what had already
        arrived. On plain TCP the kernel's receive queue is read directly, exactly as much as
        it held (``FIONREAD``), so a fast sender cannot keep this going. Behind TLS the bytes
        in the socket are still encrypted: only what the TLS layer has decrypted counts.
        """
        transport = self.transport
        if transport is None or self.complete or self.error is not None:
            return
        if transport.get_extra_info("sslcontext") is not None:
            return
        sock = transport.get_extra_info("socket")
        if sock is None:
            return
        try:
            fd = sock.fileno()
            ready = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
            while ready > 0 and self.transport is not None and not self.complete:
                data = os.read(fd, ready)
                if not data:
                    break
                ready -= len(data)
                self.data_received(data)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.keep_alive = False

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None and not self.complete:
            self.error = error
        self.keep_alive = False
        if self.transport is not None:
            self.transport.abort()
        self._wake()

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

    def release(self) -> None:
        self._stop_timer()
        self._response = None
        if self.complete and self.keep_alive and not self.closed:
            if self._paused:  # a whole answer released unread: the next one must be read
                self._paused = False
                self.transport.resume_reading()
            self._pool.put_back(self)
        else:
            self.close()

    def close(self) -> None:
        self._stop_timer()
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport  # uvloop's transports are no asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        if self._response is None or self.complete:  # bytes after the answer: unusable
            self.keep_alive = False
            self.close()
            return
        self._last_data = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            # A callback's own exception reaches here only as the __context__ of httptools'
            # HttpParserCallbackError.
            cause = exc.__context__
            if isinstance(cause, UpstreamError):
                self._fail(cause)
            else:
                self._fail(UpstreamError(f"malformed response from the upstream: {exc}"))

    def eof_received(self) -> None:
        """The upstream is closing: never reuse this connection, even before it is gone."""
        self.keep_alive = False
        if self._response is None:
            self.closed = True
            self._pool.forget(self)

    def connection_lost(self, exc: Exception | None) -> None:
        """The end of a body without a length is the upstream's orderly close (``exc`` None);
        a reset breaks the answer off."""
        self.closed = True
        self.transport = None
        self._pool.forget(self)
        if self._response is not None and not self.complete:
            if self._until_close and exc is None and self.headers_done and self.error is None:
                self._flush_decoder()
                self.complete = True
            elif self.error is None:
                self.error = UpstreamError("the upstream closed the connection mid-answer")
            self._finish()
        self._wake()

    # --- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:  # a second answer to one request: neither body nor reusable
            raise UpstreamError("the upstream sent more than one answer")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        response = self._response
        assert response is not None
        status = self._parser.get_status_code()
        if status == 101:  # else httptools raises HttpParserUpgrade out of data_received
            raise UpstreamError("the upstream switched protocols unasked")
        if 100 <= status < 200:
            # An interim answer (100 Continue, 103 Early Hints): clients must skip even
            # unexpected ones (RFC 9110 15.2); the final answer follows on the same parser.
            self._interim = True
            self._raw_headers = []
            return
        response.status = status
        headers: CIMultiDict[str] = CIMultiDict(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in self._raw_headers
        )
        response.headers = CIMultiDictProxy(headers)
        self.keep_alive = self._parser.should_keep_alive()
        framed = (
            "content-length" in headers or "chunked" in headers.get("transfer-encoding", "").lower()
        )
        self._until_close = not framed
        encoding = headers.get("content-encoding", "identity").lower()
        if encoding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._decoder = zlib.decompressobj()
        elif encoding not in ("identity", ""):
            raise UpstreamError(f"unsupported content-encoding from the upstream: {encoding}")
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._decoder is not None:
            try:
                body = self._decoder.decompress(body)
            except zlib.error as exc:
                raise UpstreamError(f"undecodable compressed body: {exc}") from None
            if not body:
                return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._flush_decoder()
        self.complete = True
        self._finish()
        self._wake()

    def _flush_decoder(self) -> None:
        if self._decoder is not None:
            rest = self._decoder.flush()
            if rest:
                self._chunks.append(rest)


class Client:
    """The connection pool. Idle connections older than ``keepalive`` are not reused: the
    upstream may have closed them already, and a POST is never sent twice."""

    def __init__(
        self,
        timeouts: Timeouts,
        keepalive: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._timeouts = timeouts
        self._keepalive = keepalive
        self._idle: dict[Origin, list[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._ssl = ssl_context
        """Verifies https upstreams; the system's CAs (and ``SSL_CERT_FILE``) by default."""

    async def post(
        self, target: Target, headers: Iterable[tuple[str, str]], body: bytes
    ) -> Response:
        connection = self._idle_connection(target.origin) or await self._connect(target.origin)
        self._busy.add(connection)
        lines = [f"POST {target.path} HTTP/1.1\r\nHost: {target.origin.host_header}\r\n"]
        for name, value in headers:
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                continue  # never let a header split the request
            lines.append(f"{name}: {value}\r\n")
        lines.append(f"Content-Length: {len(body)}\r\n\r\n")
        head = "".join(lines).encode("latin-1", "replace")
        connection.start(head, body, self._timeouts)
        try:
            return await connection.headers()
        except BaseException:
            connection.close()
            raise

    def _idle_connection(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        oldest = asyncio.get_running_loop().time() - self._keepalive
        while idle:
            connection = idle.pop()
            if not connection.closed and connection.idle_since > oldest:
                return connection
            connection.close()
        return None

    async def _connect(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        secure = origin.scheme == "https"
        if secure and self._ssl is None:
            self._ssl = ssl.create_default_context()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(self, origin),
                    origin.host,
                    origin.port,
                    ssl=self._ssl if secure else None,
                    server_hostname=origin.host if secure else None,
                ),
                self._timeouts.connect,
            )
        except TimeoutError:
            raise UpstreamConnectTimeout(
                f"connecting to {origin.host}:{origin.port} timed out"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamConnectError(
                f"cannot connect to {origin.host}:{origin.port}: {exc}"
            ) from None
        return connection

    def put_back(self, connection: _Connection) -> None:
        self._busy.discard(connection)
        idle = self._idle.setdefault(connection.origin, [])
        if len(idle) >= _IDLE_PER_HOST:
            connection.close()
            return
        connection.idle_since = asyncio.get_running_loop().time()
        idle.append(connection)

    def forget(self, connection: _Connection) -> None:
        self._busy.discard(connection)
        idle = self._idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)

    async def close(self) -> None:
        for connection in [*self._busy, *(c for idle in self._idle.values() for c in idle)]:
            connection.close()
        self._idle.clear()
        self._busy.clear()
