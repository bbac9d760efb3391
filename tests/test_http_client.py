"""``proxy.providers.http`` against real sockets: hand-written HTTP/1.1 answers from
servers started on 127.0.0.1, so framing, keep-alive, back-pressure and timeout
edge cases are exact.

Tests are sequenced with events and with conditions polled one loop turn at a time (``until``);
a sleep appears only where slowness is the scenario itself (a trickling server, a slow consumer).
"""

from __future__ import annotations

import asyncio
import gzip
import os
import socket
import ssl
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop

from proxy.providers.http import (
    Client,
    Origin,
    Target,
    Timeouts,
    UpstreamError,
    UpstreamTimeout,
)
from proxy.providers.http.parser import _HIGH_WATER

_MAX_READ = 256 * 1024
"""The most one socket read hands the protocol (asyncio's and uvloop's read size)."""


# --- the servers -----------------------------------------------------------------------------


@dataclass
class Received:
    """One request as the server read it off the wire."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    raw_head: bytes
    body: bytes

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


class Peer:
    """One accepted connection, seen from the server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def request(self) -> Received | None:
        """The next request, or None once the client has closed the connection."""
        try:
            raw_head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        lines = raw_head.decode("latin-1").split("\r\n")[:-2]
        method, target, version = lines[0].split(" ")
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))
        length = sum(int(value) for name, value in headers if name.lower() == "content-length")
        body = await self.reader.readexactly(length)
        return Received(method, target, version, headers, raw_head, body)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def until_closed(self) -> None:
        """Returns once the client has closed (or reset) the connection."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionError:
            pass

    def close(self) -> None:
        self.writer.close()

    def reset(self) -> None:
        """Closes with a TCP RST instead of a FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Handler = Callable[[Peer], Awaitable[None]]


class Server:
    """``asyncio.start_server`` running ``handler`` per connection; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self.connections = 0
        self.peers: list[Peer] = []
        self.errors: list[BaseException] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, tls: ssl.SSLContext | None = None) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=tls)
        self.port: int = self._server.sockets[0].getsockname()[1]
        self.scheme = "https" if tls else "http"

    def target(self, path: str = "/v1/chat/completions") -> Target:
        return Target.parse(f"{self.scheme}://127.0.0.1:{self.port}{path}")

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = Peer(reader, writer)
        self.peers.append(peer)
        try:
            await self._handler(peer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        except BaseException as exc:  # surfaced by the harness at teardown
            self.errors.append(exc)
        finally:
            writer.close()

    async def stop(self) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        assert not self.errors, self.errors


class Harness:
    """Servers and clients of one test, all closed at its end."""

    def __init__(self) -> None:
        self._servers: list[Server] = []
        self._clients: list[Client] = []

    async def serve(self, handler: Handler, tls: ssl.SSLContext | None = None) -> Server:
        server = Server(handler)
        await server.start(tls)
        self._servers.append(server)
        return server

    def client(
        self,
        connect: float = 2.0,
        read: float = 2.0,
        total: float = 10.0,
        keepalive: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> Client:
        client = Client(
            Timeouts(connect=connect, read=read, total=total),
            keepalive=keepalive,
            ssl_context=ssl_context,
        )
        self._clients.append(client)
        return client

    async def __aenter__(self) -> Harness:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in self._clients:
            await client.close()
        for server in self._servers:
            await server.stop()


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    async with Harness() as harness:
        yield harness


# --- helpers ---------------------------------------------------------------------------------


def head(status: int = 200, headers: Iterable[tuple[str, str]] = (), version: str = "1.1") -> bytes:
    lines = [f"HTTP/{version} {status} Whatever\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers]
    return ("".join(lines) + "\r\n").encode("latin-1")


def answer(body: bytes, status: int = 200, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    return head(status, [*headers, ("Content-Length", str(len(body)))]) + body


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


LAST_CHUNK = b"0\r\n\r\n"
CHUNKED = ("Transfer-Encoding", "chunked")


async def until(condition: Callable[[], bool], what: str, limit: float = 5.0) -> None:
    """Waits, one loop turn at a time, until ``condition()`` holds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not condition():
        if loop.time() > end:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0)


async def echo_forever(peer: Peer) -> None:
    """A keep-alive server: answers every request on the connection with its own body."""
    while (request := await peer.request()) is not None:
        await peer.send(answer(b"echo:" + request.body))


def idle_count(client: Client, target: Target) -> int:
    return len(client._idle.get(target.origin, []))


def tls_pair() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for 127.0.0.1, and a client context trusting its
    CA only."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


# --- 1. bodies -------------------------------------------------------------------------------


async def test_content_length_body_is_read_whole(h: Harness) -> None:
    body = b'{"text": "' + os.urandom(20_000).hex().encode() + b'"}'

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(head(200, [("X-Multi", "1"), ("X-Multi", "2")])[:-2])  # the head, split
        await peer.send(f"Content-Length: {len(body)}\r\n\r\n".encode())
        await peer.send(body[:1000])
        await peer.send(body[1000:])
        await peer.until_closed()

    server = await h.serve(handler)
    response = await h.client().post(server.target(), [], b"{}")
    assert response.status == 200
    assert response.headers.getall("x-multi") == ["1", "2"]
    assert await response.read() == body
    response.release()


async def test_chunked_body_is_read_whole(h: Harness) -> None:
    parts = [b"first;", b"second;" * 1000, b"x", b"last"]

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(head(200, [CHUNKED]))
        for part in parts:
            await peer.send(chunk(part))
        await peer.send(b"0\r\nX-Trailer: t\r\n\r\n")
        await peer.until_closed()

    server = await h.serve(handler)
    response = await h.client().post(server.target(), [], b"{}")
    assert await response.read() == b"".join(parts)
    response.release()


async def test_body_delimited_by_close_is_read_whole_and_not_reused(h: Harness) -> None:
    parts = [b"no length, ", b"no chunks, ", b"just close"]

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(head(200, [("Content-Type", "text/plain")]))
        for part in parts:
            await peer.send(part)
        peer.close()

    server = await h.serve(handler)
    client = h.client()
    target = server.target()
    response = await client.post(target, [], b"{}")
    assert await response.read() == b"".join(parts)
    response.release()
    assert idle_count(client, target) == 0


async def test_empty_bodies(h: Harness) -> None:
    server = await h.serve(echo_forever)
    response = await h.client().post(server.target(), [], b"")  # an empty request body
    assert await response.read() == b"echo:"
    response.release()

    async def no_content(peer: Peer) -> None:  # 204: no body, no length, still keep-alive
        while await peer.request() is not None:
            await peer.send(head(204))

    server = await h.serve(no_content)
    client = h.client()
    for _ in range(2):
        response = await client.post(server.target(), [], b"{}")
        assert response.status == 204
        assert await response.read() == b""
        response.release()
    assert server.connections == 1


# --- 2. streaming ----------------------------------------------------------------------------


async def test_iter_chunks_yields_data_as_it_arrives(h: Harness) -> None:
    go_on = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(head(200, [CHUNKED, ("Content-Type", "text/event-stream")]))
        await peer.send(chunk(b"data: one\n\n"))
        await go_on.wait()
        await peer.send(chunk(b"data: two\n\n") + LAST_CHUNK)
        await peer.until_closed()

    server = await h.serve(handler)
    response = await h.client().post(server.target(), [], b"{}")
    chunks = response.iter_chunks()
    assert await anext(chunks) == b"data: one\n\n"  # before the server has sent the rest
    assert not go_on.is_set()
    go_on.set()
    assert [c async for c in chunks] == [b"data: two\n\n"]
    response.release()


# --- 3. content encodings --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [("gzip", gzip.compress), ("x-gzip", gzip.compress), ("deflate", zlib.compress)],
)
async def test_compressed_body_is_decoded(
    h: Harness, encoding: str, compress: Callable[[bytes], bytes]
) -> None:
    body = b"".join(b"line %d of a compressible answer\n" % i for i in range(5000))
    packed = compress(body)
    assert len(packed) < len(body) // 4

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(head(200, [CHUNKED, ("Content-Encoding", encoding)]))
        third = len(packed) // 3
        for part in (packed[:third], packed[third : 2 * third], packed[2 * third :]):
            await peer.send(chunk(part))
        await peer.send(LAST_CHUNK)
        await peer.until_closed()

    server = await h.serve(handler)
    response = await h.client().post(server.target(), [], b"{}")
    assert await response.read() == body
    response.release()


async def test_unsupported_encoding_raises_upstream_error(h: Harness) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer(b"\x1b\x00\x00", 200, [("Content-Encoding", "br")]))
        await peer.until_closed()

    server = await h.serve(handler)
    with pytest.raises(UpstreamError) as caught:
        await h.client().post(server.target(), [], b"{}")
    assert not isinstance(caught.value, UpstreamTimeout)
    assert "br" in str(caught.value)


async def test_corrupt_compressed_body_raises_upstream_error(h: Harness) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer(b"this is not gzip at all", 200, [("Content-Encoding", "gzip")]))
        await peer.until_closed()

    server = await h.serve(handler)
    response = await h.client().post(server.target(), [], b"{}")
    with pytest.raises(UpstreamError, match="undecodable") as caught:
        await response.read()
    assert not isinstance(caught.value, UpstreamTimeout)
    response.release()


# --- 4. keep-alive ---------------------------------------------------------------------------


async def test_https_upstream_verified_and_kept_alive(h: Harness) -> None:
    server_tls, client_tls = tls_pair()
    server = await h.serve(echo_forever, tls=server_tls)
    client = h.client(ssl_context=client_tls)
    for body in (b"one", b"two"):
        response = await client.post(server.target(), [], body)
        assert response.status == 200
        assert await response.read() == b"echo:" + body
        response.release()
    assert server.connections == 1  # TLS sessions are pooled like plain ones


async def test_https_trusts_the_bundle_named_by_ssl_cert_file(
    h: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's advice for a private CA: no code, just ``SSL_CERT_FILE``."""
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    server = await h.serve(echo_forever, tls=server_tls)
    response = await h.client().post(server.target(), [], b"hi")
    assert await response.read() == b"echo:hi"
    response.release()


async def test_https_upstream_with_an_untrusted_certificate_is_refused(h: Harness) -> None:
    server_tls, _ = tls_pair()
    _, other_trust = tls_pair()  # trusts a different CA
    server = await h.serve(echo_forever, tls=server_tls)
    client = h.client(ssl_context=other_trust)
    with pytest.raises(UpstreamError, match="certificate") as error:
        await client.post(server.target(), [], b"{}")
    assert not isinstance(error.value, UpstreamTimeout)


async def test_sequential_requests_share_one_connection(h: Harness) -> None:
    server = await h.serve(echo_forever)
    client = h.client()
    for n in range(3):
        response = await client.post(server.target(), [], b"request %d" % n)
        assert await response.read() == b"echo:request %d" % n
        response.release()
    assert server.connections == 1


async def test_connection_close_answer_is_not_reused(h: Harness) -> None:
    async def handler(peer: Peer) -> None:
        # Says "close" but keeps the socket open and keeps answering: only the client's own
        # decision can account for a second connection.
        while (request := await peer.request()) is not None:
            await peer.send(answer(b"echo:" + request.body, 200, [("Connection", "close")]))

    server = await h.serve(handler)
    client = h.client()
    for n in range(2):
        response = await client.post(server.target(), [], b"%d" % n)
        assert await response.read() == b"echo:%d" % n
        response.release()
    assert server.connections == 2


async def test_http10_answer_without_keep_alive_is_not_reused(h: Harness) -> None:
    async def handler(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(head(200, [("Content-Length", "2")], version="1.0") + b"ok")

    server = await h.serve(handler)
    client = h.client()
    for _ in range(2):
        response = await client.post(server.target(), [], b"{}")
        assert await response.read() == b"ok"
        response.release()
    assert server.connections == 2


async def test_unfinished_answer_released_closes_its_connection(h: Harness) -> None:
    first_closed = asyncio.Event()

    async def handler(peer: Peer) -> None:
        if len(server.peers) == 1:
            await peer.request()
            await peer.send(head(200, [("Content-Length", "100")]) + b"0123456789")
            await peer.until_closed()
            first_closed.set()
        else:
            await echo_forever(peer)

    server = await h.serve(handler)
    client = h.client()
    response = await client.post(server.target(), [], b"{}")
    assert await anext(response.iter_chunks()) == b"0123456789"
    response.release()  # 90 bytes never read
    second = await client.post(server.target(), [], b"again")
    assert await second.read() == b"echo:again"
    second.release()
    assert server.connections == 2
    await asyncio.wait_for(first_closed.wait(), 5)


async def test_answer_received_whole_but_unread_is_reused(h: Harness) -> None:
    """A complete answer is released without being read, and it was big enough to pause the
    socket: the connection goes back to the pool and must read again for the next request."""
    big = os.urandom(_HIGH_WATER + 1)  # crossing the mark needs every byte: pause == complete

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer(big))
        await echo_forever(peer)

    server = await h.serve(handler)
    client = h.client(read=1.0)
    response = await client.post(server.target(), [], b"{}")
    connection = response._connection
    await until(lambda: connection.complete, "the whole answer")
    response.release()
    second = await client.post(server.target(), [], b"next")
    assert await second.read() == b"echo:next"
    second.release()
    assert server.connections == 1


async def test_bytes_after_the_answer_are_not_taken_as_body(h: Harness) -> None:
    """An upstream that answers twice: the second answer is neither body nor reused."""

    async def handler(peer: Peer) -> None:
        if len(server.peers) == 1:
            await peer.request()
            await peer.send(answer(b"ok") + answer(b"smuggled", 500))
            await peer.until_closed()
        else:
            await echo_forever(peer)

    server = await h.serve(handler)
    client = h.client()
    response = await client.post(server.target(), [], b"{}")
    assert response.status == 200
    assert await response.read() == b"ok"
    assert response.status == 200
    response.release()
    second = await client.post(server.target(), [], b"next")
    assert await second.read() == b"echo:next"
    second.release()
    assert server.connections == 2


async def test_interim_1xx_answers_are_skipped(h: Harness) -> None:
    """RFC 9110 15.2: a client must parse 1xx answers before the final one, expected or not."""

    async def handler(peer: Peer) -> None:
        while (request := await peer.request()) is not None:
            await peer.send(head(100))
            await peer.send(head(103, [("Link", "</style.css>; rel=preload")]))
            await peer.send(answer(b"echo:" + request.body, 200, [("X-Final", "yes")]))

    server = await h.serve(handler)
    client = h.client()
    for n in range(2):
        response = await client.post(server.target(), [], b"%d" % n)
        assert response.status == 200
        assert response.headers.get("X-Final") == "yes"
        assert "Link" not in response.headers
        assert await response.read() == b"echo:%d" % n
        response.release()
    assert server.connections == 1


async def test_unasked_protocol_switch_is_an_error(h: Harness) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(head(101, [("Upgrade", "websocket"), ("Connection", "Upgrade")]) + b"xx")
        await peer.until_closed()

    server = await h.serve(handler)
    with pytest.raises(UpstreamError, match="switched protocols") as caught:
        await h.client().post(server.target(), [], b"{}")
    assert not isinstance(caught.value, UpstreamTimeout)


# --- 5. connecting ---------------------------------------------------------------------------


async def test_connection_refused_is_an_error_not_a_timeout(h: Harness) -> None:
    with socket.socket() as bound:  # bound, not listening: connecting is refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        client = h.client(connect=5.0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(UpstreamError) as caught:
            await client.post(Target.parse(f"http://127.0.0.1:{port}/v1"), [], b"{}")
    assert not isinstance(caught.value, UpstreamTimeout)
    assert loop.time() - started < 2.0


async def test_connect_timeout(h: Harness) -> None:
    """A listener whose accept queue is full: Linux drops further SYNs, so connect hangs."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(8):
            filler = socket.socket()
            fillers.append(filler)
            filler.settimeout(0.2)
            try:
                filler.connect(("127.0.0.1", port))
            except TimeoutError:
                break
        else:
            pytest.skip("this kernel completes every connect to a full accept queue")
        client = h.client(connect=0.2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(UpstreamTimeout, match="connecting"):
            await client.post(Target.parse(f"http://127.0.0.1:{port}/v1"), [], b"{}")
        assert 0.15 < loop.time() - started < 2.0
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


# --- 6. timeouts -----------------------------------------------------------------------------


async def test_silence_after_headers_is_a_read_timeout(h: Harness) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(head(200, [("Content-Length", "10")]) + b"ab")
        await peer.until_closed()

    server = await h.serve(handler)
    response = await h.client(read=0.2, total=10.0).post(server.target(), [], b"{}")
    chunks = response.iter_chunks()
    assert await anext(chunks) == b"ab"
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamTimeout, match="silent"):
        await anext(chunks)
    assert 0.1 < loop.time() - started < 1.5
    response.release()


async def test_silence_before_headers_is_a_read_timeout(h: Harness) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.until_closed()

    server = await h.serve(handler)
    client = h.client(read=0.2, total=10.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamTimeout, match="silent"):
        await client.post(server.target(), [], b"{}")
    assert 0.15 < loop.time() - started < 1.5
    assert not client._busy


async def test_trickling_answer_hits_the_total_timeout(h: Harness) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(head(200, [CHUNKED]))
        while True:  # a byte every 50 ms: never silent for the 300 ms read timeout
            await peer.send(chunk(b"."))
            await asyncio.sleep(0.05)

    server = await h.serve(handler)
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await h.client(read=0.3, total=0.8).post(server.target(), [], b"{}")
    received = b""
    with pytest.raises(UpstreamTimeout, match="in time"):
        async for part in response.iter_chunks():
            received += part
    assert 0.75 < loop.time() - started < 2.0
    assert len(received) >= 5  # it kept talking: the read timeout cannot have been the cause
    response.release()


# --- 7. broken answers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "partial",
    [
        head(200, [("Content-Length", "100")]) + b"0123456789",
        head(200, [CHUNKED]) + chunk(b"0123456789") + b"64\r\nonly part of it",
    ],
    ids=["content-length", "chunked"],
)
async def test_close_mid_body_is_an_error_not_a_timeout(h: Harness, partial: bytes) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(partial)
        peer.close()

    server = await h.serve(handler)
    response = await h.client(read=5.0, total=10.0).post(server.target(), [], b"{}")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamError, match="mid-answer") as caught:
        await response.read()
    assert not isinstance(caught.value, UpstreamTimeout)
    assert loop.time() - started < 2.0
    response.release()


async def test_reset_mid_body_delimited_by_close_is_an_error(h: Harness) -> None:
    """Without a length the end of the body is the connection's orderly end (FIN); a reset is
    an answer broken off, not a finished one."""
    reset_now = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(head(200, [("Content-Type", "text/plain")]) + b"the first half")
        await reset_now.wait()
        peer.reset()

    server = await h.serve(handler)
    response = await h.client().post(server.target(), [], b"{}")
    chunks = response.iter_chunks()
    assert await anext(chunks) == b"the first half"
    reset_now.set()
    with pytest.raises(UpstreamError) as caught:
        await anext(chunks)
    assert not isinstance(caught.value, UpstreamTimeout)
    response.release()


async def test_malformed_answer_is_an_error(h: Harness) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 abc nonsense\r\n\r\n")
        await peer.until_closed()

    server = await h.serve(handler)
    with pytest.raises(UpstreamError, match="malformed"):
        await h.client().post(server.target(), [], b"{}")


# --- 8. back-pressure ------------------------------------------------------------------------


async def test_large_stream_arrives_intact_with_bounded_buffering(h: Harness) -> None:
    body = os.urandom(8 * 1024 * 1024)

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(head(200, [CHUNKED]))
        for start in range(0, len(body), 100_000):
            await peer.send(chunk(body[start : start + 100_000]))
        await peer.send(LAST_CHUNK)
        await peer.until_closed()

    server = await h.serve(handler)
    response = await h.client().post(server.target(), [], b"{}")
    received = bytearray()
    largest = 0
    async for part in response.iter_chunks():
        received += part
        largest = max(largest, len(part))
        await asyncio.sleep(0)
    assert bytes(received) == body
    assert largest <= _HIGH_WATER + _MAX_READ
    response.release()


async def test_paused_consumer_is_not_silence_and_does_not_spin(h: Harness) -> None:
    """The consumer stops reading for longer than the read timeout: the socket is paused, the
    upstream is blocked, no timeout fires (the silence is ours) and the timer does not spin."""
    body = os.urandom(32 * 1024 * 1024)  # more than loopback's socket buffers can hold
    all_written = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(head(200, [("Content-Length", str(len(body)))]))
        for start in range(0, len(body), 1 << 20):
            await peer.send(body[start : start + (1 << 20)])
        all_written.set()
        await peer.until_closed()

    server = await h.serve(handler)
    response = await h.client(read=0.2, total=30.0).post(server.target(), [], b"{}")
    connection = response._connection
    await until(lambda: connection._paused, "the client to pause reading")
    assert connection._buffered <= _HIGH_WATER + _MAX_READ
    assert not all_written.is_set()

    checks = 0
    check = connection._check

    def counting_check() -> None:
        nonlocal checks
        checks += 1
        check()

    connection._check = counting_check  # type: ignore[method-assign]
    await asyncio.sleep(0.6)  # the slow consumer: three read timeouts long
    assert connection.error is None
    assert checks <= 10, f"the timer fired {checks} times in 0.6 s while paused"
    assert not all_written.is_set()

    received = bytearray()
    async for part in response.iter_chunks():
        received += part
        await asyncio.sleep(0)
    assert bytes(received) == body
    assert all_written.is_set()
    response.release()


# --- 9. the request on the wire --------------------------------------------------------------


async def test_request_framing(h: Harness) -> None:
    received: list[Received] = []

    async def handler(peer: Peer) -> None:
        while (request := await peer.request()) is not None:
            received.append(request)
            await peer.send(answer(b"ok"))

    server = await h.serve(handler)
    client = h.client()
    body = b'{"model": "m", "messages": []}'
    headers = [
        ("Authorization", "Bearer sk-up"),
        ("X-Evil", "a\r\nInjected: yes"),
        ("X-Evil-Lf", "a\nInjected-Lf: yes"),
        ("X-Evil-Name\r\nInjected-Name", "v"),
        ("X-Fine", "fine"),
    ]
    target = server.target("/v1/chat/completions?api-version=2024-06-01&x=1")
    response = await client.post(target, headers, body)
    assert await response.read() == b"ok"
    response.release()
    big = os.urandom(100_000)  # over the single-write size: head and body written separately
    response = await client.post(server.target("/"), [], big)
    assert await response.read() == b"ok"
    response.release()

    first, second = received
    assert (first.method, first.target, first.version) == (
        "POST",
        "/v1/chat/completions?api-version=2024-06-01&x=1",
        "HTTP/1.1",
    )
    assert first.header("Host") == [f"127.0.0.1:{server.port}"]
    assert first.header("Content-Length") == [str(len(body))]
    assert first.body == body
    assert first.header("Authorization") == ["Bearer sk-up"]
    assert first.header("X-Fine") == ["fine"]
    assert b"Injected" not in first.raw_head
    assert not first.header("X-Evil") and not first.header("X-Evil-Lf")
    assert (second.method, second.target) == ("POST", "/")
    assert second.header("Content-Length") == [str(len(big))]
    assert second.body == big
    assert server.connections == 1


def test_target_parsing_and_host_header() -> None:
    target = Target.parse("https://api.example.com/v1/chat?a=b")
    assert target == Target(Origin("https", "api.example.com", 443), "/v1/chat?a=b")
    assert target.origin.host_header == "api.example.com"
    assert Target.parse("http://h:80").path == "/"
    assert Target.parse("http://h:80").origin.host_header == "h"
    assert Target.parse("http://h:8080/x").origin.host_header == "h:8080"
    with pytest.raises(ValueError, match="not an http"):
        Target.parse("ftp://h/x")


# --- 10. stale idle connections --------------------------------------------------------------


async def test_idle_connection_closed_by_the_upstream_is_not_used(h: Harness) -> None:
    async def handler(peer: Peer) -> None:
        request = await peer.request()
        assert request is not None
        await peer.send(answer(b"echo:" + request.body))  # keep-alive, then gone anyway
        if len(server.peers) == 1:
            peer.close()
        else:
            await echo_forever(peer)

    server = await h.serve(handler)
    client = h.client()
    target = server.target()
    response = await client.post(target, [], b"one")
    assert await response.read() == b"echo:one"
    response.release()
    await until(lambda: idle_count(client, target) == 0, "the client to see the close")
    response = await client.post(target, [], b"two")
    assert await response.read() == b"echo:two"
    response.release()
    assert server.connections == 2


# --- 11. closing the client ------------------------------------------------------------------


async def test_close_closes_idle_and_busy_connections(h: Harness) -> None:
    closed = [asyncio.Event(), asyncio.Event()]

    async def handler(peer: Peer) -> None:
        index = len(server.peers) - 1
        await peer.request()
        if index == 0:
            await peer.send(head(200, [CHUNKED]) + chunk(b"partial"))
        else:
            await peer.send(answer(b"done"))
        await peer.until_closed()
        closed[index].set()

    server = await h.serve(handler)
    client = h.client()
    target = server.target()
    busy = await client.post(target, [], b"{}")
    idle = await client.post(target, [], b"{}")  # the first connection is busy: a second one
    assert await idle.read() == b"done"
    idle.release()
    assert server.connections == 2
    assert idle_count(client, target) == 1
    chunks = busy.iter_chunks()
    assert await anext(chunks) == b"partial"
    waiting = asyncio.ensure_future(anext(chunks))
    await until(lambda: busy._connection._waiter is not None, "the reader to wait")

    await client.close()
    with pytest.raises(UpstreamError):
        await asyncio.wait_for(waiting, 5)
    await asyncio.wait_for(asyncio.gather(*(event.wait() for event in closed)), 5)
    assert not client._idle and not client._busy
    busy.release()


# --- the same on uvloop, which the proxy runs on ---------------------------------------------

UVLOOP_SCENARIOS: list[Callable[[Harness], Awaitable[None]]] = [
    test_chunked_body_is_read_whole,
    test_body_delimited_by_close_is_read_whole_and_not_reused,
    test_iter_chunks_yields_data_as_it_arrives,
    test_sequential_requests_share_one_connection,
    test_unfinished_answer_released_closes_its_connection,
    test_answer_received_whole_but_unread_is_reused,
    test_silence_after_headers_is_a_read_timeout,
    test_reset_mid_body_delimited_by_close_is_an_error,
    test_large_stream_arrives_intact_with_bounded_buffering,
    test_paused_consumer_is_not_silence_and_does_not_spin,
    test_idle_connection_closed_by_the_upstream_is_not_used,
    test_close_closes_idle_and_busy_connections,
]


@pytest.mark.parametrize("scenario", UVLOOP_SCENARIOS, ids=lambda f: f.__name__[5:])
def test_on_uvloop(scenario: Callable[[Harness], Awaitable[None]]) -> None:
    async def run() -> None:
        async with Harness() as harness:
            await scenario(harness)

    uvloop.run(run())
