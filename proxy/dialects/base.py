"""What every wire dialect provides, and the plain data its hooks return.

The gateway's request path (``proxy.gateway.pipeline``) is written once and asks the dialect
of a route for everything that differs between the APIs clients speak. The hooks take plain
data (endpoint, model route, body, prompt tokens, output cap), never the gateway's own request
record, so dialects sit below the gateway and a new one is a module, not a change to the path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel

from proxy.catalog.pricing import Price, cost_nano
from proxy.catalog.routes import ModelRoute
from proxy.config import DialectName
from proxy.providers.upstream import EVENT_ENDS, complete_events

MAX_OUTPUT_CAP = 1_000_000_000
"""No model generates a billion tokens in one answer; a larger cap only overflows the books."""

KeyAuth = Literal["key", "anthropic", "gemini"]
"""How the OpenAPI document describes where a dialect's clients put their key."""


@dataclass(slots=True)
class Usage:
    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    reported: bool = True
    """False when counted by the proxy because the upstream reported nothing."""
    cache_write_tokens: int = 0
    """Anthropic: input written to the prompt cache with the 5-minute lifetime."""
    cache_write_1h_tokens: int = 0
    """Anthropic: input written to the prompt cache with a 1-hour lifetime."""
    stored_id: str | None = None
    """The id under which the upstream stored the answer (OpenAI's stored responses), which
    the key's org alone may read back."""

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def cost_nano(self, price: Price) -> int:
        if price.tier is not None and self.input_tokens > price.tier_above:
            price = price.tier  # long-context rates (Gemini's, above 200k prompt tokens)
        return cost_nano(
            price,
            self.input_tokens,
            self.output_tokens,
            self.cached_tokens,
            self.cache_write_tokens,
            self.cache_write_1h_tokens,
        )


@dataclass(frozen=True, slots=True)
class Reservation:
    """What a request may cost at most, fixed before it is admitted."""

    prompt_tokens: int
    """Prompt tokens as counted (OpenAI: tiktoken) or bounded (Anthropic) by the proxy."""
    output_tokens: int
    """The output cap reserved."""
    cost_nano: int
    stream: bool = False
    cap_param: str | None = None
    """The request parameter that set the output cap, named when the worst case is refused."""
    choices: int = 1
    """Answers the output cap applies to each (OpenAI's ``n``)."""
    input_cost: int | None = None
    """The prompt's part of the cost in nano-units x 1M (tokens x rate per 1M), when the
    output cap may be lowered (clamped): then ``cost_nano`` = ceil((input_cost + output x
    output_rate) / 1M)."""
    output_rate: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens


class Inbound(Protocol):
    """What a dialect may read of a client's request (an aiohttp ``web.Request`` is one):
    passed whole, so a dialect that reads only headers costs nothing for the rest."""

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def query(self) -> Mapping[str, str]: ...


class StreamMeter(Protocol):
    def relay(self, block: bytes) -> bytes:
        """Notes a block of whole events; returns the part of it the client receives."""
        ...

    def usage(self) -> Usage:
        """What the stream cost, from what ``relay`` saw (a bound when it was cut short)."""
        ...


@dataclass(frozen=True, slots=True)
class StreamEnds:
    """The dialect's events for a stream that cannot end normally: its SDKs raise on them, so
    a truncated answer is never taken for a complete one."""

    broken: bytes
    timeout: bytes


@dataclass(frozen=True, slots=True)
class StreamFraming:
    """How a streamed answer is framed: server-sent events for most, AWS's binary event
    stream for Bedrock, a JSON array for Gemini without ``?alt=sse``. The relay cuts what it
    reads into whole frames with ``split`` before the meter sees them, so no dialect parses a
    frame split across reads, and ends a broken stream with ``ends``, in the same framing."""

    content_type: str
    """The media type of a streamed answer, upstream's and client's alike."""
    split: Callable[[bytes], tuple[bytes, bytes]]
    """Whole frames at the start of a buffer, and the unfinished rest."""
    ends: StreamEnds
    whole_if_ends: tuple[bytes, ...] = ()
    """Endings that prove a buffer holds whole frames (SSE's blank line): most reads end on
    one, and skip ``split``; empty: always split."""


def sse_framing(ends: StreamEnds) -> StreamFraming:
    """Server-sent events, ended by a dialect's own error events."""
    return StreamFraming("text/event-stream", complete_events, ends, EVENT_ENDS)


@dataclass(frozen=True)
class RouteDocs:
    """How the OpenAPI document describes a dialect's endpoints (data, so dialects need not
    import the document builder that imports them)."""

    title: str
    """Summaries read ``"<title> <endpoint>"``."""
    tag: str
    auth: KeyAuth
    handler_prefix: str
    """Handler names (``<prefix><endpoint>``), as logs and tools know them."""
    body_schema: Mapping[str, Any]
    errors: Mapping[int, str]
    descriptions: Mapping[str, str]
    """Per endpoint."""
    streamed: frozenset[str]
    """Endpoints that answer ``stream: true`` with server-sent events."""


class Dialect(Protocol):
    """An API clients speak to the proxy (OpenAI's, Anthropic's, ...).

    Everything here is fixed at import time or a function of plain data; the gateway calls it
    at the same points for every dialect (auth -> parse -> price -> admit -> forward ->
    settle), and the error middleware renders errors of the paths in ``error_prefixes`` in
    the dialect's shape.
    """

    # Fixed per dialect (class attributes in each module):
    @property
    def name(self) -> DialectName: ...

    @property
    def endpoints(self) -> tuple[str, ...]:
        """Endpoints served under every prefix (``chat/completions``, ``messages``, ...)."""
        ...

    @property
    def endpoint_kinds(self) -> Mapping[str, str]:
        """The model kind (``chat``, ``embedding``) each endpoint serves."""
        ...

    @property
    def form_endpoints(self) -> frozenset[str]:
        """Endpoints whose body is ``multipart/form-data`` (``proxy.dialects.form``), read
        into a dict as JSON bodies are and forwarded under the client's Content-Type; the
        rest take JSON."""
        ...

    @property
    def prefixes(self) -> tuple[str, ...]:
        """Path prefixes the endpoints are served under (``/v1``, ``/api/v1/llm``, ...)."""
        ...

    @property
    def error_prefixes(self) -> tuple[str, ...]:
        """Paths (and what lies under them) whose errors take this dialect's shape, even when
        no handler runs (401, 404, 413); empty for the default dialect."""
        ...

    @property
    def served_at(self) -> str:
        """Where a model of this dialect is served, told to a client that used another
        route."""
        ...

    @property
    def error_model(self) -> type[BaseModel]:
        """The error body, for the OpenAPI document."""
        ...

    @property
    def docs(self) -> RouteDocs: ...

    def routes(self) -> tuple[tuple[str, str], ...]:
        """``(path, endpoint)`` of every POST route, prefixes included (aiohttp path patterns:
        an API that names the model in the path matches it as a parameter, Gemini's
        ``models/{model}:generateContent``, Bedrock's ``model/{modelId}/converse``)."""
        ...

    def claims(self, path: str) -> bool:
        """Whether an error on a path under one of ``error_prefixes`` takes this dialect's
        shape (prefixes two dialects share, like Vertex's ``/v1/projects/``, are told apart
        here); called only when a prefix matched."""
        ...

    def api_key(self, request: Inbound) -> str:
        """The client's proxy key (from its headers, or its query: Gemini's ``?key=``);
        raises a 401 ``ApiError`` when it sent none."""
        ...

    def requested_model(self, params: Mapping[str, str], body: dict[str, Any]) -> object:
        """The model a request names: the body's ``model``, or a path parameter (``params``:
        the route's matched parts, empty for a quote); the gateway validates that it is a
        non-empty string it knows."""
        ...

    def upstream_endpoint(self, endpoint: str, request: Inbound) -> str:
        """What the upstream is asked for (``proxy.providers.kinds.url``): the endpoint, or
        a form of it the request's query chooses (Gemini's ``?alt=sse``)."""
        ...

    def stream_framing(self, upstream_endpoint: str) -> StreamFraming:
        """How a streamed answer to that upstream endpoint is framed and ended: SSE
        (``sse_framing``) for most, AWS's event stream for Bedrock, Google's JSON array
        for Gemini's ``streamGenerateContent`` without ``?alt=sse``."""
        ...

    async def reserve(
        self, headers: Mapping[str, str], endpoint: str, body: dict[str, Any], route: ModelRoute
    ) -> Reservation:
        """Validates what the reservation depends on (400 naming the param) and bounds it
        (``headers``: the request's, case-insensitive)."""
        ...

    def upstream_body(
        self,
        raw: bytes,
        body: dict[str, Any],
        endpoint: str,
        model: str,
        stream: bool,
        clamped_cap: int | None,
    ) -> tuple[bytes, bool]:
        """The body one upstream gets (``model``: the name it knows the model by;
        ``clamped_cap``: a lowered output cap per choice), and whether the stream's usage
        event must be kept from the client (it asked for none; the proxy did)."""
        ...

    def buffered_usage(
        self,
        endpoint: str,
        route: ModelRoute,
        prompt_tokens: int,
        output_cap: int,
        data: bytes,
        headers: Mapping[str, str],
    ) -> Usage:
        """The usage of a whole 200 answer: as reported (in the body, or in the upstream's
        ``headers`` for APIs that report it there), else counted or bounded."""
        ...

    def stream_meter(
        self,
        endpoint: str,
        route: ModelRoute,
        prompt_tokens: int,
        output_cap: int,
        strip_usage: bool,
    ) -> StreamMeter:
        """Follows one streamed answer for its usage."""
        ...

    def limit_headers(
        self,
        headers: dict[str, str],
        kind: Literal["requests", "tokens"],
        limit: int,
        remaining: int,
        reset_ms: int | None,
        now: float,
    ) -> None:
        """Adds the dialect's own names for a rate limit's state (beside the ``x-ratelimit-*``
        every answer has); ``reset_ms`` None: unknown."""
        ...

    def error_body(
        self,
        status: int,
        message: str,
        type: str,
        code: str | None,
        param: str | None,
        details: Mapping[str, Any] | None,
    ) -> bytes:
        """An error in the dialect's shape, so each SDK raises its own exception classes."""
        ...

    def error_wire(
        self, status: int, type: str, code: str | None
    ) -> tuple[int, Mapping[str, str] | None]:
        """The status an error is answered with and headers its shape needs (Bedrock's
        ``x-amzn-ErrorType``); most dialects: ``(status, None)``."""
        ...


def bearer(headers: Mapping[str, str]) -> str | None:
    """The token of ``Authorization: Bearer <token>``, or None."""
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def client_key(headers: Mapping[str, str]) -> str | None:
    """The client's proxy key from any header a dialect's SDKs send it in: ``Authorization:
    Bearer`` (OpenAI's, Anthropic 2.x, Bedrock API keys) or ``x-api-key`` (Anthropic's API
    reference and 1.x SDKs). Every route takes both, so an SDK's ``models.list()`` works
    whichever family it is from."""
    return bearer(headers) or headers.get("x-api-key", "").strip() or None


KEY_HINT = "send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'"


def event_data(event: bytes) -> bytes | None:
    """The ``data:`` payload of one SSE event (multi-line data joined), or None."""
    if b"data:" not in event:
        return None
    parts = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(parts) if parts else None


def body_model(params: Mapping[str, str], body: dict[str, Any]) -> object:
    """``requested_model`` of the dialects whose body names the model."""
    return body.get("model")
