"""Forwarding to upstreams: pooled keep-alive connections, the upstream's own credential, and
server-sent events relayed as they arrive without buffering the stream.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from multidict import CIMultiDict

from proxy.config import TimeoutConfig, UpstreamConfig
from proxy.errors import ApiError
from proxy.providers import bedrock, google, kinds
from proxy.providers.http import (
    Client,
    Response,
    Target,
    Timeouts,
    UpstreamError,
    UpstreamTimeout,
)
from proxy.providers.vertex_auth import VertexTokens

# Request headers go upstream by an allow-list: only what the upstream's API reads. A deny-list
# let a client's proxy key through in whatever header its SDK uses for another provider
# (x-api-key, anthropic-api-key, x-goog-api-key, ...).
# W3C trace context (``traceparent``, ``tracestate``) passes too: the client's trace goes on
# upstream (with ``[telemetry]`` on, the proxy's own span is the upstream's parent).
TRACE_CONTEXT = frozenset({"traceparent", "tracestate"})
FORWARDED_BY_KIND: dict[str, frozenset[str]] = {
    "openai": frozenset({"accept", "user-agent", "openai-beta"}) | TRACE_CONTEXT,
    "azure": frozenset({"accept", "user-agent", "openai-beta"}) | TRACE_CONTEXT,
    "anthropic": frozenset({"accept", "user-agent", "anthropic-beta"}) | TRACE_CONTEXT,
    "bedrock": frozenset(
        {
            "accept",
            "user-agent",
            "x-amzn-bedrock-guardrailidentifier",
            "x-amzn-bedrock-guardrailversion",
            "x-amzn-bedrock-trace",
            "x-amzn-bedrock-performanceconfig-latency",
        }
    ),
    "gemini": frozenset({"accept", "user-agent"}),
    "vertex": frozenset({"accept", "user-agent", "anthropic-beta"}),
}
# Never forwarded, whatever an operator's ``forward_headers`` pattern matches: credentials,
# the client's own provider account, hop-by-hop and framing headers the proxy sets itself.
NEVER_FORWARDED = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "api-key",
        "x-api-key",
        "anthropic-api-key",
        "x-goog-api-key",
        "anthropic-version",  # set per upstream (kinds.credential_headers)
        "x-amz-date",  # a client's SigV4 signature: the proxy signs for its upstream itself
        "x-amz-security-token",
        "x-amz-content-sha256",
        "cookie",
        "openai-organization",
        "openai-project",
        "x-on-behalf-of",
        "x-budget-clamp",  # the proxy's own: clamp the output cap rather than refuse
        "x-request-id",
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-type",
        "accept-encoding",
        "expect",
    }
)
# Never passed back: hop-by-hop, framing the proxy redoes, the upstream account's identity and
# its own limits.
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
        "openai-organization",
        "openai-project",
        "anthropic-organization-id",
    }
)
_DROP_RESPONSE_PREFIXES = (
    "x-ratelimit-",
    "ratelimit",
    "retry-after",
    "anthropic-ratelimit-",  # the upstream account's limits, as Anthropic names them
    "anthropic-organization-",  # the upstream account's identity
)


@functools.lru_cache(maxsize=64)
def _forwarding(kind: str, extra: tuple[str, ...]) -> tuple[frozenset[str], tuple[str, ...]]:
    """(exact names, name prefixes) of the request headers an upstream receives."""
    names = set(FORWARDED_BY_KIND.get(kind, frozenset()))
    prefixes: list[str] = []
    for pattern in extra:
        pattern = pattern.lower()
        if pattern.endswith("*"):
            prefixes.append(pattern[:-1])
        else:
            names.add(pattern)
    return frozenset(names - NEVER_FORWARDED), tuple(prefixes)


def upstream_headers(
    client_headers: Mapping[str, str],
    upstream: UpstreamConfig,
    content_type: str = "application/json",
) -> list[tuple[str, str]]:
    names, prefixes = _forwarding(upstream.kind, tuple(upstream.forward_headers))
    headers = []
    for name, value in client_headers.items():
        lower = name.lower()
        if lower in names or (
            prefixes and lower.startswith(prefixes) and lower not in NEVER_FORWARDED
        ):
            headers.append((name, value))
    headers.append(("Content-Type", content_type))
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


_MAX_TARGETS = 4096
"""Parsed upstream URLs kept; a path may carry a client-chosen model id, so it is bounded."""


class UpstreamClient:
    """Every upstream's pooled keep-alive connections (``proxy.providers.http``)."""

    def __init__(self, timeouts: TimeoutConfig) -> None:
        self._timeouts = Timeouts(
            connect=timeouts.connect_seconds,
            read=timeouts.read_seconds,
            total=timeouts.total_seconds,
        )
        self._client: Client | None = None
        self._targets: dict[str, Target] = {}
        self.tokens = VertexTokens()
        """Vertex upstreams' access tokens (per process, each fetched once per lifetime)."""

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
        content_type: str = "application/json",
        method: str = "POST",
    ) -> Response:
        """``deployment`` names the Azure deployment (part of the path of dated API versions),
        or the model of a Google upstream (part of its path)."""
        assert self._client is not None, "UpstreamClient.start() not called"
        sent = upstream_headers(headers, upstream, content_type)
        if upstream.kind == "vertex":
            address, body = google.vertex_target(upstream, endpoint, deployment, body)
            sent.append(("Authorization", f"Bearer {await self.tokens.ensure(upstream)}"))
        else:
            address = kinds.url(upstream, endpoint, deployment)
        target = self._targets.get(address)
        if target is None:
            if len(self._targets) >= _MAX_TARGETS:  # Bedrock: a model id in every path
                self._targets.clear()
            target = self._targets[address] = Target.parse(address)
        if upstream.kind == "bedrock":  # signed last: over the final body and headers
            sent = bedrock.sign(upstream, address, body, sent)
        try:
            return await self._client.post(target, sent, body, method)
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
    """The SSE events of a block, each with its terminating blank line.

    Linear in the block's size: a block may hold megabytes (what a departed client left
    unread is metered in one piece), so each separator is searched for from where the last
    search left off, never from the start of every event to the end of the block."""
    events: list[bytes] = []
    start = 0
    lf = block.find(b"\n\n")
    crlf = block.find(b"\r\n\r\n") if b"\r" in block else -1
    while True:
        if 0 <= lf < start:
            lf = block.find(b"\n\n", start)
        if 0 <= crlf < start:
            crlf = block.find(b"\r\n\r\n", start)
        if crlf != -1 and (lf == -1 or crlf < lf):
            cut = crlf + 4
        elif lf != -1:
            cut = lf + 2
        else:
            break
        events.append(block[start:cut])
        start = cut
    if start < len(block) and block[start:].strip():
        events.append(block[start:])
    return events
