"""One keep-alive connection to an upstream, carrying one request at a time: the socket side
(``asyncio.Protocol``), the request's write and the hand-over of body bytes to the caller.
Parsing (``parser.py``) and the request's timer (``timers.py``) are the connection's other
parts; they share its per-request state (``state.py``)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
import termios
from typing import TYPE_CHECKING, Any

import httptools

from proxy.providers.http.errors import UpstreamError
from proxy.providers.http.models import Origin, Timeouts
from proxy.providers.http.parser import ResponseParser
from proxy.providers.http.response import Response
from proxy.providers.http.timers import Deadlines

if TYPE_CHECKING:
    from proxy.providers.http.pool import Client


class Connection(ResponseParser, Deadlines, asyncio.Protocol):
    """One keep-alive connection; carries one request at a time."""

    def __init__(self, pool: Client, origin: Origin) -> None:
        self._pool = pool
        self.origin = origin
        self._loop = asyncio.get_running_loop()
        self.transport = None
        self.closed = False
        self.idle_since = 0.0
        # One parser for the connection's life: llhttp reads keep-alive answers one after another.
        self._parser = httptools.HttpResponseParser(self)
        self._reset()

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
