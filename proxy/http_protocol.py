"""The HTTP/1.1 server side below the application: aiohttp's protocol, guarded.

What aiohttp leaves to the application, and a hostile client uses:

* **Errors raised before a handler runs** (the parser: over 128 headers, a line over 8190 bytes,
  a bad chunk size, Content-Length with Transfer-Encoding, a path that is not ASCII) are
  answered by aiohttp in text/plain, quoting the offending bytes — an ``Authorization`` line
  with a stray ``\\x01`` came back whole, key included, and its traceback went to the log. Here
  they are OpenAI-shaped JSON naming the kind of fault, and the log gets the fault's class,
  never a byte of the request.
* **Slow senders.** aiohttp waits for a request's head and body as long as the client likes,
  so a few hundred half-open connections hold a few hundred descriptors indefinitely. Here a
  request's head must be complete ``header_timeout_seconds`` after its first byte (or after the
  connection opened), a body may pause at most ``body_timeout_seconds`` between reads and must
  be whole ``body_deadline_seconds`` after its head; idle keep-alive connections close after
  ``keepalive_timeout_seconds``.
* **Connection count.** At most ``max_connections`` connections are open per process; past
  it, ``HEALTH_RESERVE`` more are accepted for ``/healthz`` and ``/readyz`` only (a load
  balancer must still learn the process is alive and busy, not dead), closed after their
  answer; any other request on them, and any connection past those, is answered 503 and
  closed, before it can use up the descriptors the upstream and Redis connections need.

aiohttp has no supported hook for any of these (aio-libs/aiohttp#3287), so this subclasses its
public ``web.Server`` (the protocol factory) and ``web.RequestHandler`` (the protocol), and
``web.AppRunner`` to build the one from the other; nothing of aiohttp is patched.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    InvalidURLError,
    LineTooLong,
    TransferEncodingError,
)
from aiohttp.streams import StreamReader

from proxy.config import ServerConfig
from proxy.errors import error_body, error_response

log = logging.getLogger(__name__)

MAX_HEADERS = 128
MAX_LINE_BYTES = 8190
SERVER_NAME = "llm-proxy"

# Parser messages (aiohttp's Python parser and llhttp's) → what the client is told. Matched on
# the message's first line, lower-cased; the client never sees the message itself, which
# quotes the request's bytes.
_PARSER_FAULTS: tuple[tuple[str, str], ...] = (
    ("too many headers", f"The request has more than {MAX_HEADERS} header fields."),
    ("too many trailers", "The request has too many trailer fields."),
    ("https traffic", "This port speaks plain HTTP, not HTTPS."),
    ("transfer-encoding can't be present with content-length",
     "A request cannot carry both Content-Length and Transfer-Encoding."),
    ("duplicate", "A header that may appear once (Content-Length, Transfer-Encoding, Host) "
     "appears twice."),
    ("content-length", "The Content-Length header is invalid."),
    ("transfer-encoding", "The Transfer-Encoding header is invalid."),
    ("chunk", "The chunked request body is malformed."),
    ("whitespace", "A header line is folded or has stray whitespace (obs-fold is not allowed)."),
    ("header value", "A header value contains a character that is not allowed."),
    ("header", "A header line is malformed."),
    ("url", "The request target contains characters that are not allowed (percent-encode "
     "anything outside ASCII)."),
    ("method", "The HTTP method is not valid."),
    ("host", "The Host header is missing or invalid."),
    ("crlf", "Lines must end with CRLF."),
    ("version", "The HTTP version is not supported."),
)  # fmt: skip


HEALTH_RESERVE = 8
"""Connections accepted past ``max_connections`` for health checks only."""
HEALTH_PATHS = frozenset({"/healthz", "/readyz"})


class BodyTimeout(TimeoutError):
    """Set on a request body whose sender went quiet (or, with ``deadline``, that did not
    arrive whole in time); the error middleware answers 408.

    A TimeoutError, so aiohttp's reading of an unread body after the answer (lingering) ends
    quietly on it instead of logging a traceback."""

    def __init__(self, deadline: bool = False) -> None:
        super().__init__("request body deadline" if deadline else "request body pause")
        self.deadline = deadline


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float
    body_timeout: float
    keepalive_timeout: float
    max_connections: int
    body_deadline: float = float("inf")

    @classmethod
    def of(cls, server: ServerConfig) -> ConnectionLimits:
        return cls(
            header_timeout=server.header_timeout_seconds,
            body_timeout=server.body_timeout_seconds,
            keepalive_timeout=server.keepalive_timeout_seconds,
            max_connections=server.max_connections or default_max_connections(),
            body_deadline=server.body_deadline_seconds,
        )


def default_max_connections() -> int:
    """Half the descriptors this process may open: each client connection may need one to the
    upstream too, and Redis, logs and the listening socket need some."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 10_000
    return max(16, (soft - 64) // 2)


def parser_fault(exc: BaseException | None) -> str:
    """What to tell a client whose request the parser refused, without quoting it."""
    if isinstance(exc, LineTooLong):
        return f"A request line or header field is longer than {MAX_LINE_BYTES} bytes."
    if isinstance(exc, BadHttpMethod):
        return "The HTTP method is not valid."
    if isinstance(exc, InvalidURLError):
        return "The request target contains characters that are not allowed."
    if isinstance(exc, TransferEncodingError):
        return "The chunked request body is malformed."
    text = str(getattr(exc, "message", "") or "").split("\n", 1)[0].lower()
    for needle, message in _PARSER_FAULTS:
        if needle in text:
            return message
    return "The HTTP request is malformed."


def _raw_error(status: int, reason: str, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 error response, for answers given outside any request."""
    body = error_body(message, "invalid_request_error", code, None)
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\nServer: {SERVER_NAME}\r\n\r\n"
    )
    return head.encode() + body


_TOO_MANY_MESSAGE = "The proxy has too many open connections; retry shortly."
_TOO_MANY = _raw_error(503, "Service Unavailable", _TOO_MANY_MESSAGE, "too_many_connections")
_TOO_MANY_BODY = error_body(
    _TOO_MANY_MESSAGE, "invalid_request_error", "too_many_connections", None
)
_HEAD_TIMEOUT = _raw_error(
    408, "Request Timeout", "The request's headers did not arrive in time.", "request_timeout"
)


class GuardedRequestHandler(web.RequestHandler):
    """One connection: aiohttp's protocol with JSON errors, read timeouts and the cap."""

    def __init__(self, manager: GuardedServer, *, limits: ConnectionLimits, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._guard = manager
        self._limits = limits
        self._loop_ = kwargs["loop"]
        # One watch timer per connection, not one per request: it fires every
        # header_timeout_seconds and checks how long the current head has been pending.
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_pending = False  # waiting for a request's head to complete
        self._head_since = 0.0
        self._head_bytes = False  # some of that head has arrived
        self._in_request = False  # a head is complete; its handler runs
        self._pipelined = False  # bytes of the next request came in during this one
        self._body: StreamReader | None = None
        self._body_seen = 0.0
        self._body_due = 0.0  # when the whole body must have arrived
        self._body_timer: asyncio.TimerHandle | None = None
        self.health_only = False  # accepted past max_connections: health checks only

    # -- connection ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        over = self._guard.open_connections - self._limits.max_connections
        self.health_only = 0 < over <= HEALTH_RESERVE
        if over > HEALTH_RESERVE:
            log.warning(
                "refusing a connection: %d open (server.max_connections = %d)",
                self._guard.open_connections,
                self._limits.max_connections,
            )
            self._answer_and_close(_TOO_MANY)
            return
        self._head_pending, self._head_since = True, self._loop_.time()
        self._head_timer = self._loop_.call_at(
            self._head_since + self._limits.header_timeout, self._head_watch
        )

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._in_request:
            if data and not self._head_pending:
                self._head_pending, self._head_since = True, self._loop_.time()
            self._head_bytes = self._head_bytes or bool(data)
        elif self._body is not None and not self._body.is_eof():
            self._body_seen = self._loop_.time()
        elif data:
            self._pipelined = True
        super().data_received(data)

    # -- request boundaries --------------------------------------------------------------

    def head_received(self, payload: StreamReader) -> None:
        """Called as aiohttp hands a parsed request to the application."""
        self._in_request, self._head_pending, self._head_bytes = True, False, False
        if not payload.is_eof():
            self._body = payload
            self._body_seen = self._loop_.time()
            self._body_due = self._body_seen + self._limits.body_deadline
            self._body_timer = self._loop_.call_at(
                min(self._body_seen + self._limits.body_timeout, self._body_due), self._body_check
            )

    async def finish_response(
        self, request: Any, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._in_request = False
            self._body = None
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None
            if self._pipelined:
                self._pipelined, self._head_bytes = False, True
                self._head_pending, self._head_since = True, self._loop_.time()

    # -- timers --------------------------------------------------------------------------

    def _head_watch(self) -> None:
        self._head_timer = None
        if self.transport is None:
            return
        now, limit = self._loop_.time(), self._limits.header_timeout
        if self._head_pending and not self._in_request and now - self._head_since >= limit:
            if self._head_bytes:
                self._answer_and_close(_HEAD_TIMEOUT)
            else:
                self.force_close()  # never sent a byte: nobody to answer
            return
        due = self._head_since + limit if self._head_pending else now + limit
        self._head_timer = self._loop_.call_at(max(due, now + 0.001), self._head_watch)

    def _body_check(self) -> None:
        self._body_timer = None
        body = self._body
        if body is None or body.is_eof():
            return
        quiet_until = self._body_seen + self._limits.body_timeout
        now = self._loop_.time()
        if now >= quiet_until or now >= self._body_due:
            self._body = None
            body.set_exception(BodyTimeout(deadline=now < quiet_until))
        else:
            self._body_timer = self._loop_.call_at(
                min(quiet_until, self._body_due), self._body_check
            )

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    def _answer_and_close(self, raw: bytes) -> None:
        if self.transport is not None:
            self.transport.write(raw)
        self.force_close()

    # -- errors below the application ----------------------------------------------------

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's parser faults and unhandled handler errors, in JSON; nothing quoted."""
        fault = type(exc).__name__ if exc is not None else "none"
        if status >= 500:
            log.error("error below the application (%s) from %s", fault, request.remote)
        else:
            log.info("refused a malformed request (%s) from %s", fault, request.remote)
        if request.writer.output_size > 0:
            raise ConnectionError("the answer had started; cannot send an error instead")
        if status >= 500:
            response = error_response(
                status, "Internal proxy error.", type="server_error", code="internal"
            )
        else:
            response = error_response(status, parser_fault(exc), code="malformed_http")
        response.headers["Server"] = SERVER_NAME
        response.force_close()
        return response


class GuardedServer(web.Server):
    """The protocol factory: builds guarded connections and counts the open ones."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.open_connections = 0
        application_factory = self.request_factory

        def request_factory(
            message: Any, payload: StreamReader, protocol: Any, writer: Any, task: Any
        ) -> Any:
            if isinstance(protocol, GuardedRequestHandler):
                protocol.head_received(payload)
            return application_factory(message, payload, protocol, writer, task)

        self.request_factory = request_factory
        application_handler = self.request_handler

        async def request_handler(request: web.BaseRequest) -> web.StreamResponse:
            """A connection past the cap serves one health check, then closes."""
            protocol = request.protocol
            if isinstance(protocol, GuardedRequestHandler) and protocol.health_only:
                if request.path not in HEALTH_PATHS:
                    response = web.Response(
                        status=503, body=_TOO_MANY_BODY, content_type="application/json"
                    )
                else:
                    response = await application_handler(request)  # type: ignore[assignment]
                response.force_close()
                return response
            return await application_handler(request)

        self.request_handler = request_handler

    def __call__(self) -> GuardedRequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, limits=self.limits, **self._kwargs)

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        self.open_connections += 1
        super().connection_made(handler, transport)

    def connection_lost(
        self, handler: web.RequestHandler, exc: BaseException | None = None
    ) -> None:
        self.open_connections -= 1
        super().connection_lost(handler, exc)


class GuardedAppRunner(web.AppRunner):
    """``web.AppRunner`` serving the application through ``GuardedServer``."""

    def __init__(self, app: web.Application, limits: ConnectionLimits, **kwargs: Any) -> None:
        kwargs.setdefault("keepalive_timeout", limits.keepalive_timeout)
        kwargs.setdefault("lingering_time", min(10.0, limits.body_timeout))
        kwargs.setdefault("max_headers", MAX_HEADERS)
        kwargs.setdefault("max_line_size", MAX_LINE_BYTES)
        kwargs.setdefault("max_field_size", MAX_LINE_BYTES)
        super().__init__(app, **kwargs)
        self._limits = limits

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # runs the app's start-up, as AppRunner does
        return GuardedServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            loop=asyncio.get_running_loop(),
            limits=self._limits,
            **self._kwargs,
        )
