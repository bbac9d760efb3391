"""AWS event-stream frames as the mock writes them, its own few lines (the mock shares no
code with the proxy): prelude (total length, headers length, their CRC32), string headers,
payload, CRC32 of the whole."""

from __future__ import annotations

import struct
import zlib

CONTENT_TYPE = "application/vnd.amazon.eventstream"


def frame(headers: dict[str, str], payload: bytes) -> bytes:
    head = b"".join(
        struct.pack("!B", len(n.encode()))
        + n.encode()
        + struct.pack("!BH", 7, len(v.encode()))
        + v.encode()
        for n, v in headers.items()
    )
    prelude = struct.pack("!II", 16 + len(head) + len(payload), len(head))
    prelude += struct.pack("!I", zlib.crc32(prelude))
    body = prelude + head + payload
    return body + struct.pack("!I", zlib.crc32(body))


def event(kind: str, payload: bytes) -> bytes:
    headers = {":event-type": kind, ":content-type": "application/json", ":message-type": "event"}
    return frame(headers, payload)
