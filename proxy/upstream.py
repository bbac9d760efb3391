"""Forwarding to upstreams: one pooled client session, the upstream's own credential, and
server-sent events relayed event by event without buffering the stream.
"""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp
from multidict import CIMultiDict

from proxy.config import TimeoutConfig
from proxy.errors import ApiError
from proxy.routes import ModelRoute

# Never forwarded upstream: hop-by-hop headers, the client's credential and identity headers
# that belong to the client's own provider account, and what aiohttp sets itself.
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
        "cookie",
        "openai-organization",
        "openai-project",
        "x-on-behalf-of",
        "x-request-id",
        "accept-encoding",
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
_DROP_RESPONSE_PREFIXES = ("x-ratelimit-", "ratelimit", "retry-after")


def upstream_headers(client_headers: Mapping[str, str], route: ModelRoute) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in client_headers.items():
        if name.lower() not in _DROP_REQUEST:
            headers.add(name, value)
    headers["Content-Type"] = "application/json"
    headers["Accept-Encoding"] = "identity"
    credential = route.upstream.credential()
    if credential:
        headers["Authorization"] = f"Bearer {credential}"
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
    """One ``ClientSession`` for every upstream: pooled keep-alive connections."""

    def __init__(self, timeouts: TimeoutConfig) -> None:
        self._timeouts = timeouts
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(
                total=self._timeouts.total_seconds,
                sock_connect=self._timeouts.connect_seconds,
                sock_read=self._timeouts.read_seconds,
            ),
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(
        self, route: ModelRoute, endpoint: str, body: bytes, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        assert self._session is not None, "UpstreamClient.start() not called"
        url = f"{route.upstream.base_url}/{endpoint}"
        try:
            return await self._session.post(
                url, data=body, headers=upstream_headers(headers, route), allow_redirects=False
            )
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise upstream_timeout(route) from exc
        except aiohttp.ClientError as exc:
            raise upstream_unreachable(route) from exc


def upstream_timeout(route: ModelRoute) -> ApiError:
    return ApiError(
        504,
        f"The upstream '{route.upstream.name}' did not answer in time.",
        type="server_error",
        code="upstream_timeout",
    )


def upstream_unreachable(route: ModelRoute) -> ApiError:
    return ApiError(
        502,
        f"The upstream '{route.upstream.name}' could not be reached.",
        type="server_error",
        code="upstream_unavailable",
    )


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
