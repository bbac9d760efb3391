"""AWS's binary event-stream framing (``application/vnd.amazon.eventstream``), both ways.

A frame is: total length (4 bytes, big-endian), headers length (4), CRC32 of those 8 bytes,
the headers, the payload, and the CRC32 of everything before it. A header is a name (1-byte
length), a type byte and a typed value. ``botocore.eventstream`` decodes frames but has no
encoder, and the proxy must write frames of its own (a stream's error ending), so both
directions are here, in a few dozen lines the tests check against botocore's decoder.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping

CONTENT_TYPE = "application/vnd.amazon.eventstream"
PRELUDE = 12
MAX_FRAME = 16 * 1024 * 1024
"""AWS caps a frame at 16 MiB; a larger length is a corrupt stream, not a frame to wait for."""
_STRING = 7
# Fixed value sizes by header type; 6 (bytes) and 7 (string) carry a 2-byte length instead.
_FIXED = {0: 0, 1: 0, 2: 1, 3: 2, 4: 4, 5: 8, 8: 8, 9: 16}


def encode(headers: Mapping[str, str], payload: bytes) -> bytes:
    """One frame with string headers (all the proxy and its mock ever write)."""
    parts = []
    for name, value in headers.items():
        raw_name, raw_value = name.encode(), value.encode()
        parts.append(
            struct.pack("!B", len(raw_name))
            + raw_name
            + struct.pack("!BH", _STRING, len(raw_value))
            + raw_value
        )
    head = b"".join(parts)
    total = PRELUDE + len(head) + len(payload) + 4
    prelude = struct.pack("!II", total, len(head))
    prelude += struct.pack("!I", zlib.crc32(prelude))
    body = prelude + head + payload
    return body + struct.pack("!I", zlib.crc32(body))


def event(event_type: str, payload: bytes) -> bytes:
    return encode(
        {
            ":event-type": event_type,
            ":content-type": "application/json",
            ":message-type": "event",
        },
        payload,
    )


def exception(exception_type: str, payload: bytes) -> bytes:
    """A modelled exception frame: botocore raises it as a ``ClientError`` whose code is the
    exception's shape name (``exception_type`` is its member name in the stream union)."""
    return encode(
        {
            ":exception-type": exception_type,
            ":content-type": "application/json",
            ":message-type": "exception",
        },
        payload,
    )


def _valid_prelude(buffer: bytes, start: int) -> int | None:
    """The frame length at ``start``, or None when the prelude is corrupt."""
    total, head = struct.unpack_from("!II", buffer, start)
    (crc,) = struct.unpack_from("!I", buffer, start + 8)
    if total < PRELUDE + 4 + head or total > MAX_FRAME:
        return None
    if zlib.crc32(buffer[start : start + 8]) != crc:
        return None
    return int(total)


def split(buffer: bytes) -> tuple[bytes, bytes]:
    """The whole frames at the start of ``buffer`` and the unfinished rest. A corrupt prelude
    makes the rest unframeable: it is all returned as whole (relayed and counted as it is,
    never waited for), so a bad upstream cannot make the proxy buffer without end."""
    cut = 0
    size = len(buffer)
    while size - cut >= PRELUDE:
        total = _valid_prelude(buffer, cut)
        if total is None:
            return buffer, b""
        if size - cut < total:
            break
        cut += total
    return buffer[:cut], buffer[cut:]


def frames(block: bytes) -> list[tuple[dict[str, str], bytes] | None]:
    """The frames of a block of whole frames: (string headers, payload), or None for a frame
    that is corrupt (bad lengths or CRC), after which nothing more is read."""
    found: list[tuple[dict[str, str], bytes] | None] = []
    start = 0
    while len(block) - start >= PRELUDE:
        total = _valid_prelude(block, start)
        if total is None or len(block) - start < total:
            found.append(None)
            break
        frame = block[start : start + total]
        start += total
        (crc,) = struct.unpack_from("!I", frame, total - 4)
        if zlib.crc32(frame[:-4]) != crc:
            found.append(None)
            break
        head_len = struct.unpack_from("!I", frame, 4)[0]
        headers = _headers(frame[PRELUDE : PRELUDE + head_len])
        if headers is None:
            found.append(None)
            break
        found.append((headers, frame[PRELUDE + head_len : -4]))
    return found


def _headers(raw: bytes) -> dict[str, str] | None:
    headers: dict[str, str] = {}
    at = 0
    try:
        while at < len(raw):
            name_len = raw[at]
            name = raw[at + 1 : at + 1 + name_len].decode()
            at += 1 + name_len
            kind = raw[at]
            at += 1
            if kind in (6, _STRING):
                (length,) = struct.unpack_from("!H", raw, at)
                value = raw[at + 2 : at + 2 + length]
                at += 2 + length
                if kind == _STRING:
                    headers[name] = value.decode()
            elif kind in _FIXED:
                at += _FIXED[kind]
            else:
                return None
    except (IndexError, struct.error, UnicodeDecodeError):
        return None
    return headers if at == len(raw) else None
