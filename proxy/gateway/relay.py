"""Sending an admitted request and relaying the answer, for every dialect.

What the dialects differ in — the body each upstream gets, how an answer is metered, the
events that end a broken stream — comes from the dialect (``proxy.gateway.forward`` puts
them together); what they share is here, so every route keeps the same promises:

- A client that goes away cancels its handler (the server runs with aiohttp's handler
  cancellation) wherever it waits: for a silent upstream, or on its own full socket. The
  upstream call ends at once, and what the upstream had delivered by then is charged —
  relayed or not, buffered here or still in the socket (``Response.salvage``).
- ``timeouts.total_seconds`` bounds the whole exchange, from sending upstream to the last
  byte written to the client (``_Deadline``).
- Upstream credentials an upstream echoes are masked in every header and body relayed
  (``proxy.providers.redact``).
- A stream the upstream breaks off, or that runs out of time, ends with the dialect's error
  event, never with its normal end, so a client cannot mistake it for a complete answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from proxy.dialects.base import Dialect, StreamEnds, StreamFraming, StreamMeter, Usage
from proxy.errors import ApiError
from proxy.gateway.exchange import Exchange
from proxy.gateway.state import Gateway
from proxy.providers import fallback
from proxy.providers.http import Response, UpstreamError, UpstreamTimeout
from proxy.providers.redact import REDACTOR
from proxy.providers.upstream import (
    client_headers,
    upstream_broken,
    upstream_timeout,
)


async def send(
    request: web.Request,
    gw: Gateway,
    exchange: Exchange,
    body_for: Callable[[fallback.Candidate], bytes],
    content_type: str = "application/json",
) -> fallback.Served:
    """Sends through the model's upstreams (fallbacks included) and notes which one served."""
    try:
        served = await fallback.send(
            gw.upstream,
            gw.cooldowns,
            exchange.route.upstreams,
            exchange.upstream_endpoint or exchange.endpoint,
            body_for,
            request.headers,
            content_type,
        )
    except ApiError as exc:
        exchange.upstream_error = "timeout" if exc.status == 504 else "connect"
        raise
    except asyncio.CancelledError:
        # Gone before the upstream's first byte: the call is closed, nothing was received.
        exchange.client_gone = True
        raise
    exchange.upstream = served.candidate.upstream.name
    if served.skipped:
        exchange.fallback_from = ",".join(served.skipped)
    return served


def answer_headers(served: fallback.Served, extra: dict[str, str]) -> CIMultiDict[str]:
    headers = REDACTOR.headers(client_headers(served.response.headers))
    headers.update(extra)
    headers["x-upstream"] = served.candidate.upstream.name
    return headers


def is_stream(served: fallback.Served, content_type: str) -> bool:
    """A 200 in the dialect's stream media type (``StreamFraming.content_type``)."""
    upstream = served.response
    return upstream.status == 200 and upstream.headers.get("Content-Type", "").startswith(
        content_type
    )


_BINARY = ("audio/", "image/", "video/", "application/octet-stream")
BINARY_ENDS = StreamEnds(broken=b"", timeout=b"")
"""A binary answer has no error frame: one cut short ends with its connection dropped."""


def binary_framing(served: fallback.Served) -> StreamFraming | None:
    """For a 200 in a binary media type (speech's audio): relayed as it arrives, cut nowhere,
    under the upstream's own media type; None for any other answer."""
    upstream = served.response
    media = upstream.headers.get("Content-Type", "")
    if upstream.status != 200 or not media.startswith(_BINARY):
        return None
    return StreamFraming(media, _whole, BINARY_ENDS)


def _whole(block: bytes) -> tuple[bytes, bytes]:
    return block, b""


async def read_buffered(
    exchange: Exchange,
    served: fallback.Served,
    sent_at: float,
    dialect: Dialect,
) -> bytes:
    """The whole answer; its usage goes to ``exchange.usage`` (a 200's only)."""
    upstream = served.response
    parts: list[bytes] = []
    try:
        async for chunk in upstream.iter_chunks():
            parts.append(chunk)
    except UpstreamTimeout as exc:
        exchange.upstream_error = "timeout"
        raise upstream_timeout(served.candidate.upstream) from exc
    except UpstreamError as exc:
        exchange.upstream_error = "broken_body"
        raise upstream_broken(served.candidate.upstream) from exc
    except asyncio.CancelledError:
        # A buffered answer's usage comes at its end: it counts if all of it had arrived.
        exchange.client_gone = True
        parts.append(upstream.salvage())
        if upstream.complete and upstream.status == 200:
            exchange.usage = _usage_of(dialect, exchange, upstream, b"".join(parts))
        raise
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    exchange.upstream_ms = (time.perf_counter() - sent_at) * 1000
    if upstream.status == 200:
        exchange.usage = _usage_of(dialect, exchange, upstream, data)
    return REDACTOR.data(data)


def _usage_of(dialect: Dialect, exchange: Exchange, upstream: Response, data: bytes) -> Usage:
    return dialect.buffered_usage(
        exchange.endpoint,
        exchange.route,
        exchange.prompt_tokens,
        exchange.output_cap,
        data,
        upstream.headers,
    )


class _Deadline:
    """``total_seconds`` for the whole exchange, on the upstream request's one timer.

    When it passes, the upstream connection has already been read out and closed (every byte
    it delivered is counted). A client that has taken everything sent so far then gets the
    dialect's timeout event; one that has not — its socket is full, it is not reading — is
    cut off, since waiting for it is what the deadline forbids. The cut also ends a relay
    blocked writing to it (its handler is cancelled, like a client that left).
    """

    __slots__ = ("_request", "passed")

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.passed = False

    def __call__(self) -> None:
        self.passed = True
        transport = self._request.transport
        if transport is not None and transport.get_write_buffer_size():
            transport.abort()


_DONE = (b"[DONE]\n\n", b"[DONE]\r\n\r\n")
_TEXT = ("text/", "application/json")


def _as_is(data: bytes) -> bytes:
    return data


async def relay_stream(
    request: web.Request,
    exchange: Exchange,
    upstream: Response,
    headers: Any,
    meter: StreamMeter,
    sent_at: float,
    framing: StreamFraming,
) -> web.StreamResponse:
    """Events are written as they arrive; an event split across reads waits for its end
    (``framing``: the dialect's for this answer — SSE, binary, a JSON array's elements — whose
    ``ends`` end a stream that cannot end normally). ``sent_at``: when the request went
    upstream (the wait for its first bytes is the upstream's time, not the proxy's)."""
    response = web.StreamResponse(status=200, headers=headers)
    response.content_type = framing.content_type
    whole_if_ends, split = framing.whole_if_ends, framing.split
    # Text frames are searched for upstream credentials; a binary frame (Bedrock's event
    # stream) cannot be edited without breaking its CRCs, and is relayed as it came.
    redact = REDACTOR.data if framing.content_type.startswith(_TEXT) else _as_is
    ends = framing.ends
    deadline = _Deadline(request)
    upstream.on_deadline(deadline)
    pending = b""  # the start of an event whose end has not arrived yet
    try:
        await response.prepare(request)
        last: bytes | None = None  # a final [DONE] held back: the end costs one write, not two
        async for chunk in upstream.iter_chunks():
            if pending:
                chunk, pending = pending + chunk, b""
            if not whole_if_ends or not chunk.endswith(whole_if_ends):
                chunk, pending = split(chunk)
            data = redact(meter.relay(chunk)) if chunk else b""
            if deadline.passed:
                continue  # counted; past the deadline the client gets only the timeout event
            if last is not None:
                await response.write(last)
                last = None
            if data:
                if data.endswith(_DONE):
                    last = data
                else:
                    await response.write(data)
        if pending.strip():
            data = redact(meter.relay(pending))
            last = last + data if last else data
        pending = b""
        if deadline.passed:  # the answer was cut: never a normal end for it
            raise UpstreamTimeout("the exchange did not finish in time")
        await response.write_eof(last or b"")
        exchange.answered = True
    except (ConnectionError, asyncio.CancelledError) as exc:
        # The client left, or was cut off at the deadline. Count everything the upstream had
        # delivered, also what was never relayed (buffered here, or still in the socket);
        # releasing the response then closes the upstream connection.
        exchange.client_gone = not deadline.passed
        rest = pending + upstream.salvage()
        if rest:
            meter.relay(rest)
        if deadline.passed:
            exchange.upstream_error = "timeout"
        if isinstance(exc, asyncio.CancelledError):
            raise
    except UpstreamError as exc:
        timed_out = isinstance(exc, UpstreamTimeout)
        exchange.upstream_error = "timeout" if timed_out else "broken_stream"
        end = ends.timeout if timed_out else ends.broken
        if not end and request.transport is not None:  # binary: never a normal end
            request.transport.close()
            return response
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write(end)
            await response.write_eof()
            exchange.answered = True
    finally:
        exchange.upstream_ms = (time.perf_counter() - sent_at) * 1000
        exchange.usage = meter.usage()
    return response
