"""A small HTTP/1.1 client for the upstream hop: pooled keep-alive connections, one write per
request, responses parsed by ``httptools`` (llhttp, the parser Node.js uses).

Why not ``aiohttp.ClientSession``: on this path it cost the proxy about as much CPU per request
as everything the proxy adds (auth, token counting, both Redis scripts), mostly in per-request
objects and timers that a gateway talking to a handful of fixed upstreams does not need. This
client does only what the upstream hop needs: POST a body, relay the answer as it arrives, and
enforce connect, read (silence) and total timeouts with one timer per request. No redirects,
cookies, proxies or retries: a request is sent once (an LLM call is not idempotent).

Split by concept, as ``httpcore`` is: ``errors``, ``models`` (URL, origin, timeouts),
``pool`` (``Client``), ``connection`` (the socket side of one connection) with its parts
``parser`` (HTTP/1.1 via httptools, back-pressure), ``decoding`` (gzip/deflate) and ``timers``
(the request's one timer), and ``response`` (the caller's view of an answer).
"""

from proxy.providers.http.errors import (
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamTimeout,
)
from proxy.providers.http.models import Origin, Target, Timeouts
from proxy.providers.http.pool import Client
from proxy.providers.http.response import Response

__all__ = [
    "Client",
    "Origin",
    "Response",
    "Target",
    "Timeouts",
    "UpstreamConnectError",
    "UpstreamConnectTimeout",
    "UpstreamError",
    "UpstreamTimeout",
]
