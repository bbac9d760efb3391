"""Content-encodings the upstream may use. Only what an LLM API actually sends is accepted;
anything else fails the answer rather than relaying bytes the proxy cannot meter."""

from __future__ import annotations

import zlib
from typing import Any

from proxy.providers.http.errors import UpstreamError


def decoder_for(encoding: str) -> Any:
    """A zlib decompressor for ``content-encoding``, or None for an identity body."""
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj()
    if encoding not in ("identity", ""):
        raise UpstreamError(f"unsupported content-encoding from the upstream: {encoding}")
    return None


def decode(decoder: Any, body: bytes) -> bytes:
    try:
        data: bytes = decoder.decompress(body)
    except zlib.error as exc:
        raise UpstreamError(f"undecodable compressed body: {exc}") from None
    return data
