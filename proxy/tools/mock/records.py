"""What the mock is told (``MockOptions``) and what it keeps for tests to inspect: the
requests it received, the usage its answers carried and what it wrote for each request."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

RECEIVED_MAXLEN = 1000
REPORTED_MAXLEN = 100_000


@dataclass(frozen=True)
class MockOptions:
    latency_ms: float = 0.0
    """Delay before the response starts."""
    output_tokens: int = 16
    """Completion tokens generated when the request sets no lower cap."""
    chunk_delay_ms: float = 0.0
    """Delay between streamed chunks."""
    embedding_dim: int = 8
    models: tuple[str, ...] = (
        "gpt-4o-mini",
        "gpt-4o",
        "text-embedding-3-small",
        "claude-sonnet-4-5",
    )
    status: int | None = None
    """Answer every request with this error status (an upstream that must fail)."""
    aws_access_key_id: str = "AKIDMOCKUPSTREAM0001"
    """Bedrock: the test credentials a SigV4 signature must be made with."""
    aws_secret_access_key: str = "mock-upstream-secret-access-key"  # noqa: S105 - a test value
    bedrock_api_key: str | None = None
    """Bedrock: an API key accepted as ``Authorization: Bearer`` (None: SigV4 only)."""

    def __post_init__(self) -> None:
        if self.latency_ms < 0 or self.chunk_delay_ms < 0 or self.output_tokens < 0:
            raise ValueError("mock latency, chunk delay and output tokens must not be negative")
        if self.embedding_dim < 1:
            raise ValueError("mock embedding_dim must be positive")
        if self.status is not None and not 400 <= self.status <= 599:
            raise ValueError("mock status must be in 400-599")


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]
    """Header names are lower-cased; a header sent twice has its values joined with ", "."""
    body: dict[str, Any] | None
    """The parsed JSON body; None when the request had no body or an invalid one."""
    query: dict[str, str] = field(default_factory=dict)


RECEIVED: web.AppKey[collections.deque[ReceivedRequest]] = web.AppKey(
    "mock_upstream_received", collections.deque
)


@dataclass(frozen=True)
class ReportedUsage:
    """The usage one answer carried to its client (for checking a proxy's books)."""

    path: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int


REPORTED: web.AppKey[collections.deque[ReportedUsage]] = web.AppKey(
    "mock_upstream_reported", collections.deque
)


@dataclass
class MockExchange:
    """What the mock did for one request, as it happens."""

    path: str
    transport: Any
    """The request's connection, for tests that look at its kernel queues."""
    started: float
    """``time.monotonic()`` when the request arrived."""
    content_chunks: int = 0
    """Streamed content chunks handed to the connection (one word, one token each)."""
    body_bytes: int = 0
    """Bytes of the streamed body handed to the connection, chunked framing included."""
    content_ends: list[int] = field(default_factory=list)
    """``body_bytes`` after each content chunk: how much must arrive for it to be whole."""
    complete: bool = False
    """The whole answer was handed to the connection."""
    ended: float | None = None
    """``time.monotonic()`` when the handler ended, however it ended."""
    peer_gone: bool = False
    """The client went away (or the handler was cancelled) before the answer was complete."""


EXCHANGES: web.AppKey[collections.deque[MockExchange]] = web.AppKey(
    "mock_upstream_exchanges", collections.deque
)
EXCHANGE = web.RequestKey("mock_upstream_exchange", MockExchange)
