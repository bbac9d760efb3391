"""HTTP/1.1 over a bare socket, for requests no HTTP client library would send (bad bytes in
headers, broken framing, slow senders) and for reading exactly what the server answered."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httptools


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    """Lower-cased names; the last value of a repeated header."""
    body: bytes
    closed: bool = False
    """The server closed the connection after this answer."""

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class _Parsed:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    done: bool = False
    _name: bytes = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


async def read_response(reader: asyncio.StreamReader, within: float = 10.0) -> RawResponse:
    """One response from the stream; raises ConnectionError when the server closed without
    answering, TimeoutError when nothing complete came in time."""
    parsed = _Parsed()
    parser = httptools.HttpResponseParser(parsed)
    async with asyncio.timeout(within):
        while not parsed.done:
            data = await reader.read(65536)
            if not data:
                if parsed.status or parsed.headers:
                    parser.feed_data(b"")
                raise ConnectionError("closed without a (complete) answer")
            parser.feed_data(data)
            parsed.status = parser.get_status_code()
    closed = not parser.should_keep_alive()
    return RawResponse(parsed.status, parsed.headers, bytes(parsed.body), closed)


async def exchange(url: str, data: bytes, within: float = 10.0) -> RawResponse:
    """Sends raw bytes on a fresh connection and reads one answer."""
    host, port = address(url)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        return await read_response(reader, within)
    finally:
        writer.close()


def request(
    method: str,
    path: bytes | str,
    headers: list[tuple[bytes | str, bytes | str]] | None = None,
    body: bytes = b"",
) -> bytes:
    """A request's bytes, exactly as given (nothing is validated or escaped)."""

    def raw(value: bytes | str) -> bytes:
        return value if isinstance(value, bytes) else value.encode()

    lines = [raw(method) + b" " + raw(path) + b" HTTP/1.1", b"Host: proxy"]
    names = set()
    for name, value in headers or []:
        names.add(raw(name).lower())
        lines.append(raw(name) + b": " + raw(value))
    if body and b"content-length" not in names and b"transfer-encoding" not in names:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
