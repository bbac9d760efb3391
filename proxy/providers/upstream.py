"""Forwarding to upstreams: pooled keep-alive connections, the upstream's own credential, and
server-sent events relayed as they arrive without buffering the stream.
"""

from __future__ import annotations

from collections.abc import Mapping

from multidict import CIMultiDict

from proxy.config import TimeoutConfig, UpstreamConfig
from proxy.errors import ApiError
from proxy.providers import kinds
from proxy.providers.http_client import (
    Client,
    Response,
    Target,
    Timeouts,
    UpstreamError,
    UpstreamTimeout,
)

# Never forwarded upstream: hop-by-hop headers, the client's credential and identity headers
# that belong to the client's own provider account, and the framing headers the proxy sets itself.
_DROP_REQUEST = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "authorization",
        "api-key",
        "x-api-key",  # an Anthropic client's proxy key
        "anthropic-version",  # set per upstream (kinds.credential_headers)
        "cookie",
        "openai-organization",
        "openai-project",
        "x-on-behalf-of",
        "x-budget-clamp",  # the proxy's own: clamp the output cap rather than refuse
        "x-request-id",
        "accept-encoding",
        "content-type",
        "expect",
    }
)
# Never passed back: hop-by-hop, framing the proxy redoes, and the upstream account's limits.
_DROP_RESPONSE = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-encoding",
        "set-cookie",
        "date",
        "server",
        "x-request-id",
        "trailer",
    }
)
_DROP_RESPONSE_PREFIXES = (
    "x-ratelimit-",
    "ratelimit",
    "retry-after",
    "anthropic-ratelimit-",  # the upstream account's limits, as Anthropic names them
    "anthropic-organization-",  # the upstream account's identity
)


def upstream_headers(
    client_headers: Mapping[str, str], upstream: UpstreamConfig
) -> list[tuple[str, str]]:
    headers = [
        (name, value) for name, value in client_headers.items() if name.lower() not in _DROP_REQUEST
    ]
    headers.append(("Content-Type", "application/json"))
    headers.append(("Accept-Encoding", "identity"))
    headers.extend(kinds.credential_headers(upstream, client_headers))
    return headers


def client_headers(upstream: Mapping[str, str]) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lower = name.lower()
        if lower in _DROP_RESPONSE or lower.startswith(_DROP_RESPONSE_PREFIXES):
            continue
        headers.add(name, value)
    if "x-request-id" in upstream:
        headers["x-upstream-request-id"] = upstream["x-request-id"]
    return headers


class UpstreamClient:
    """Every upstream's pooled keep-alive connections (``proxy.providers.http_client``)."""

    def __init__(self, timeouts: TimeoutConfig) -> None:
        self._timeouts = Timeouts(
            connect=timeouts.connect_seconds,
            read=timeouts.read_seconds,
            total=timeouts.total_seconds,
        )
        self._client: Client | None = None
        self._targets: dict[str, Target] = {}

    async def start(self) -> None:
        self._client = Client(self._timeouts)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def send(
        self,
        upstream: UpstreamConfig,
        endpoint: str,
        body: bytes,
        headers: Mapping[str, str],
        deployment: str = "",
    ) -> Response:
        """``deployment`` names the Azure deployment (part of the path of dated API versions)."""
        assert self._client is not None, "UpstreamClient.start() not called"
        address = kinds.url(upstream, endpoint, deployment)
        target = self._targets.get(address)
        if target is None:
            target = self._targets[address] = Target.parse(address)
        try:
            return await self._client.post(target, upstream_headers(headers, upstream), body)
        except UpstreamTimeout as exc:
            raise upstream_timeout(upstream) from exc
        except UpstreamError as exc:
            raise upstream_unreachable(upstream) from exc


def _upstream_error(upstream: UpstreamConfig, status: int, what: str, code: str) -> ApiError:
    return ApiError(
        status, f"The upstream '{upstream.name}' {what}.", type="server_error", code=code
    )


def upstream_timeout(upstream: UpstreamConfig) -> ApiError:
    return _upstream_error(upstream, 504, "did not answer in time", "upstream_timeout")


def upstream_broken(upstream: UpstreamConfig) -> ApiError:
    return _upstream_error(
        upstream, 502, "broke off its answer before it ended", "upstream_stream_broken"
    )


def upstream_unreachable(upstream: UpstreamConfig) -> ApiError:
    return _upstream_error(upstream, 502, "could not be reached", "upstream_unavailable")


EVENT_ENDS = (b"\n\n", b"\r\n\r\n")


def complete_events(buffer: bytes) -> tuple[bytes, bytes]:
    """Splits received bytes into the whole SSE events they hold and an unfinished rest.

    Most reads end on an event boundary, and the relay checks ``endswith(EVENT_ENDS)`` before
    calling this; an event split across reads is held until its end arrives, so events are
    never cut where one must be removed.
    """
    end = buffer.rfind(b"\n\n")
    cut = end + 2 if end >= 0 else 0
    if b"\r" in buffer:
        end = buffer.rfind(b"\r\n\r\n")
        cut = max(cut, end + 4 if end >= 0 else 0)
    return buffer[:cut], buffer[cut:]


def split_events(block: bytes) -> list[bytes]:
    """The SSE events of a block, each with its terminating blank line."""
    events: list[bytes] = []
    start = 0
    while True:
        end = block.find(b"\n\n", start)
        crlf = block.find(b"\r\n\r\n", start) if b"\r" in block else -1
        if crlf != -1 and (end == -1 or crlf < end):
            cut = crlf + 4
        elif end != -1:
            cut = end + 2
        else:
            break
        events.append(block[start:cut])
        start = cut
    if start < len(block) and block[start:].strip():
        events.append(block[start:])
    return events
