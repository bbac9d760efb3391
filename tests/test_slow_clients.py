"""Fault suite: clients that stop reading or leave, against ``llm-proxy serve`` as a real process.

The mock upstream runs in the test process, so each test can see what the upstream actually did
(``EXCHANGES``: content chunks handed to the connection, whether the answer was complete, when
its client — the proxy — went away) and compare it with the books the proxy wrote to Redis.

The bounds asserted on the charge:

* at most the words the mock handed to its connection (``content_chunks``): what was still in
  the upstream's own buffers never reached the proxy;
* at least the words that had wholly reached the proxy's socket when the mock blocked (the
  mock's bytes minus what its transport buffer and its socket still held, unsent or
  unacknowledged: ``TIOCOUTQ``), however few of them the client read;
* exactly the words sent, when the upstream went silent before the end.
"""

from __future__ import annotations

import asyncio
import bisect
import fcntl
import json
import socket
import struct
import termios
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from conftest import (
    ADMIN_KEY,
    ProxyProcess,
    eventually,
    start_proxy_process,
    usage_record,
    write_config,
)
from helpers import user_messages

from proxy.catalog.pricing import Price, cost_nano
from proxy.ledger.windows import windows_at
from proxy.providers.http import Client, Target, Timeouts
from proxy.providers.http import parser as http_parser
from proxy.tools.mock import EXCHANGES, MockExchange

pytestmark = pytest.mark.slow

ORG = "acme"
P = "bp:{o:acme}:"
GPT_4O_MINI = Price(150_000_000, 75_000_000, 600_000_000, "genai-prices")
MESSAGES = user_messages("tell me a long story")
MOCK_PROMPT = 5 + 4 + 3  # the mock's own prompt count: words + 4 per message + 3
TOTAL_SECONDS = 3.0
# How long "at once" may take on a loaded 2-core machine: far below every timeout in play.
PROMPTLY = 2.0
HEAD_ALLOWANCE = 1024
"""More than the mock's status line and headers take on the wire."""


@dataclass
class Served:
    proxy: ProxyProcess
    mock: TestServer
    store: aioredis.Redis
    key_id: str
    key: str

    @property
    def port(self) -> int:
        return int(self.proxy.url.rsplit(":", 1)[1])

    def exchanges(self) -> list[MockExchange]:
        exchanges: deque[MockExchange] = self.mock.app[EXCHANGES]
        return list(exchanges)

    async def slot_held(self) -> bool:
        """The key's concurrency slot and the org's lease set, as admit/settle keep them."""
        held = await self.store.hget(P + "infl:k:" + self.key_id, "n")  # type: ignore[misc]
        return int(held or 0) > 0 or await self.store.zcard(P + "leases") > 0

    async def record(self) -> dict[str, Any] | None:
        entries = await self.store.xrange(P + "usage")
        return usage_record(entries[0][1]) if entries else None

    async def assert_books(self, record: dict[str, Any]) -> None:
        """Spend windows hold exactly the settled record; nothing is left reserved."""
        cost = cost_nano(GPT_4O_MINI, record["in"], record["out"])
        assert record["cost_nano"] == cost
        w = windows_at(time.time())
        for window in (w.daily, w.weekly, w.monthly):
            for scope in (f"k:{self.key_id}", "o"):
                data = await self.store.hgetall(f"{P}spend:{scope}:{window}")
                assert (int(data.get("c", 0)), int(data.get("t", 0))) == (
                    cost,
                    record["in"] + record["out"],
                ), (scope, window)
        assert not await self.slot_held()
        infl = await self.store.hgetall(P + "infl:o")
        assert all(int(v) == 0 for v in infl.values()), infl


@pytest.fixture
async def served(
    tmp_path: Path, redis_url: str, mock_upstream: TestServer
) -> AsyncIterator[Served]:
    config = write_config(
        tmp_path / "proxy.toml",
        str(mock_upstream.make_url("/v1")),
        redis_url,
        timeouts=f"connect_seconds = 2\nread_seconds = 30\ntotal_seconds = {TOTAL_SECONDS}",
    )
    proxy = await start_proxy_process(config, tmp_path / "proxy.log")
    store = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                proxy.url + "/api/v1/keys",
                json={"org_id": ORG, "name": "slow"},
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            ) as response:
                created = await response.json()
                assert response.status == 201, created
        yield Served(proxy, mock_upstream, store, created["id"], created["key"])
    finally:
        proxy.stop()
        await store.aclose()


def _request(key: str, headers: dict[str, str], body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    lines = [
        "POST /v1/chat/completions HTTP/1.1",
        "Host: 127.0.0.1",
        f"Authorization: Bearer {key}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


def non_reading_client(port: int, key: str, headers: dict[str, str]) -> socket.socket:
    """Sends a streamed chat request and never reads: its receive buffer is as small as the
    kernel allows, so the proxy's writes back up at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect(("127.0.0.1", port))
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    sock.sendall(_request(key, headers, body))
    return sock


def unsent(exchange: MockExchange) -> int:
    """Bytes the mock handed to its connection that have not reached the proxy: still in the
    mock's transport buffer, or in its socket unsent or unacknowledged (TIOCOUTQ)."""
    transport = exchange.transport
    sock = transport.get_extra_info("socket")
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    queued: int = struct.unpack("i", raw)[0]
    return int(transport.get_write_buffer_size()) + queued


async def wait_exchange(served: Served) -> MockExchange:
    async def started() -> MockExchange | None:
        found = served.exchanges()
        return found[-1] if found else None

    found: MockExchange = await eventually(started, what="the request to reach the upstream")
    return found


async def words_delivered_once_blocked(exchange: MockExchange) -> int:
    """Waits until the mock is blocked writing (every buffer between it and the client is
    full), then counts the words whose chunk has wholly reached the proxy by then: a lower
    bound on what the proxy holds from now on (it only ever receives more)."""

    async def blocked() -> bool:
        return bool(exchange.transport.get_protocol().writing_paused)

    await eventually(blocked, within=TOTAL_SECONDS, what="the upstream to block on the proxy")
    # The response head (status line and headers) precedes the body on the wire.
    delivered = exchange.body_bytes - unsent(exchange) - HEAD_ALLOWANCE
    return bisect.bisect_right(exchange.content_ends, delivered)


async def wait_settled(served: Served, within: float) -> dict[str, Any]:
    async def settled() -> dict[str, Any] | None:
        if await served.slot_held():
            return None
        return await served.record()

    result: dict[str, Any] = await eventually(settled, within=within, what="settle")
    return result


# --- total_seconds bounds the whole exchange -------------------------------------------------


async def test_a_client_that_never_reads_frees_its_slot_at_total_seconds(
    served: Served,
) -> None:
    """An answer far larger than every buffer between upstream, proxy and client: the relay
    blocks on the client, the proxy stops reading, the upstream blocks on the proxy. At
    total_seconds the proxy ends it all, releases the slot and charges what it received."""
    started = time.monotonic()
    sock = non_reading_client(served.port, served.key, {"x-mock-output-tokens": "60000"})
    try:
        exchange = await wait_exchange(served)
        delivered = await words_delivered_once_blocked(exchange)
        assert await served.slot_held()
        record = await wait_settled(served, within=TOTAL_SECONDS + PROMPTLY)
        elapsed = time.monotonic() - started
        assert TOTAL_SECONDS - 0.1 <= elapsed <= TOTAL_SECONDS + PROMPTLY
        # The upstream's connection was closed with it.
        await eventually(
            lambda: _true(exchange.ended is not None), within=PROMPTLY, what="upstream closed"
        )
    finally:
        sock.close()
    assert exchange.peer_gone and not exchange.complete
    assert record["reported"] is False
    assert record["client_gone"] is False
    assert delivered <= record["out"] <= exchange.content_chunks, (delivered, exchange)
    await served.assert_books(record)


# --- a departed client ends the upstream call at once ----------------------------------------


async def test_a_client_leaving_while_the_upstream_is_silent_ends_the_upstream_call(
    served: Served,
) -> None:
    """Before the upstream's first byte: nothing was received, so nothing is charged."""
    sock = non_reading_client(served.port, served.key, {"x-mock-latency-ms": "60000"})
    exchange = await wait_exchange(served)
    await eventually(served.slot_held, what="admission")
    left = time.monotonic()
    sock.close()
    await eventually(
        lambda: _true(exchange.peer_gone), within=PROMPTLY, what="the upstream call to end"
    )
    assert exchange.ended is not None and exchange.ended - left < PROMPTLY
    record = await wait_settled(served, within=PROMPTLY)
    assert record["client_gone"] is True
    assert (record["in"], record["out"], record["cost_nano"]) == (0, 0, 0)
    await served.assert_books(record)


async def test_a_client_leaving_between_chunks_ends_the_upstream_call_and_pays_what_arrived(
    served: Served,
) -> None:
    """The upstream sends five words, then goes silent; the client reads them and leaves."""
    sock = non_reading_client(served.port, served.key, {"x-mock-stall-after-chunks": "5"})
    received = b""
    try:
        while received.count(b'"content":" ') < 5:
            chunk = await asyncio.wait_for(asyncio.to_thread(sock.recv, 65536), 10)
            assert chunk, received
            received += chunk
        exchange = await wait_exchange(served)
        assert exchange.content_chunks == 5 and not exchange.complete
        left = time.monotonic()
    finally:
        sock.close()
    await eventually(
        lambda: _true(exchange.peer_gone), within=PROMPTLY, what="the upstream call to end"
    )
    assert exchange.ended is not None and exchange.ended - left < PROMPTLY
    record = await wait_settled(served, within=PROMPTLY)
    assert record["client_gone"] is True and record["reported"] is False
    assert record["out"] == 5  # each of the mock's words is one token
    assert record["in"] > 0
    await served.assert_books(record)


async def test_a_departed_client_is_charged_for_everything_the_upstream_delivered(
    served: Served,
) -> None:
    """The client reads nothing, then leaves: the charge counts every word that had reached
    the proxy (its buffers and its socket), not just the words relayed towards the client."""
    sock = non_reading_client(served.port, served.key, {"x-mock-output-tokens": "60000"})
    try:
        exchange = await wait_exchange(served)
        delivered = await words_delivered_once_blocked(exchange)
        assert await served.slot_held()
    finally:
        sock.close()
    record = await wait_settled(served, within=PROMPTLY)
    await eventually(
        lambda: _true(exchange.ended is not None), within=PROMPTLY, what="upstream closed"
    )
    assert record["client_gone"] is True and record["reported"] is False
    assert delivered <= record["out"] <= exchange.content_chunks, (delivered, exchange)
    await served.assert_books(record)


def _proxy_side_open(proxy_port: int, client_port: int) -> bool:
    """Whether the proxy still holds its end of the client's connection: once the client's
    FIN is in, the socket waits in CLOSE_WAIT until the proxy closes it (/proc/net/tcp)."""
    close_wait = "08"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        if int(local.split(":")[1], 16) == proxy_port and int(remote.split(":")[1], 16) == (
            client_port
        ):
            return state == close_wait
    return False


async def test_a_client_leaving_during_admission_leaves_no_reservation(served: Served) -> None:
    """Redis is held (CLIENT PAUSE WRITE) while it has the admit script; the client leaves;
    then Redis goes on. The reservation the admit made is released at once, not after
    lease_seconds."""
    await served.store.execute_command("CLIENT", "PAUSE", "20000", "WRITE")
    try:
        sock = non_reading_client(served.port, served.key, {})
        client_port = sock.getsockname()[1]

        async def admit_waiting() -> bool:
            clients = await served.store.client_list()
            return any(c["cmd"] == "evalsha" and "b" in c["flags"] for c in clients)

        await eventually(admit_waiting, what="the admit script to wait for Redis")
        sock.close()
        await eventually(
            lambda: _true(not _proxy_side_open(served.port, client_port)),
            what="the proxy to see its client go",
        )
    finally:
        await served.store.execute_command("CLIENT", "UNPAUSE")
    record = await wait_settled(served, within=PROMPTLY)
    assert record["client_gone"] is True
    assert (record["in"], record["out"], record["cost_nano"]) == (0, 0, 0)
    assert served.exchanges() == []  # the upstream was never called
    await served.assert_books(record)


async def _true(value: bool) -> bool:
    return value


# --- the upstream client under them: salvage and the exchange's deadline ---------------------


BODY = 60_000


@dataclass
class RawUpstream:
    """A bare TCP server answering with a body of BODY bytes: a first part at once, the rest
    when ``rest`` is set; each connection's writer is handed over to watch its socket."""

    target: Target
    writers: asyncio.Queue[asyncio.StreamWriter]
    rest: asyncio.Event
    rest_written: asyncio.Event


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    writers: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()
    rest = asyncio.Event()
    rest_written = asyncio.Event()
    first = 20_000

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BODY + b"x" * first)
        await writers.put(writer)
        await rest.wait()
        writer.write(b"x" * (BODY - first))
        rest_written.set()
        await reader.read()  # until the client closes

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield RawUpstream(Target.parse(f"http://127.0.0.1:{port}/"), writers, rest, rest_written)
    server.close()


def _socket_unsent(writer: asyncio.StreamWriter) -> int:
    sock = writer.get_extra_info("socket")
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int(writer.transport.get_write_buffer_size()) + int(struct.unpack("i", raw)[0])


async def test_salvage_takes_what_the_socket_holds_while_reading_is_paused(
    raw_upstream: RawUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unread answer pauses the connection past its high-water mark (256 KiB; 8 KiB here,
    so that the rest surely fits in the socket); the rest waits in the kernel. salvage()
    takes all of it at once, exactly as much as had arrived."""
    monkeypatch.setattr(http_parser, "_HIGH_WATER", 8192)
    client = Client(Timeouts(connect=2, read=5, total=10))
    try:
        response = await client.post(raw_upstream.target, [], b"{}")
        writer = await raw_upstream.writers.get()
        transport = response._connection.transport
        await eventually(lambda: _true(not transport.is_reading()), what="back-pressure")
        raw_upstream.rest.set()
        await raw_upstream.rest_written.wait()
        await eventually(
            lambda: _true(_socket_unsent(writer) == 0), what="the whole body to arrive"
        )
        assert not response.complete  # paused: the transport left the rest in the socket
        assert len(response.salvage()) == BODY
        assert response.complete
        response.release()
    finally:
        await client.close()


async def test_the_deadline_is_kept_after_the_answer_until_release(
    raw_upstream: RawUpstream,
) -> None:
    """A consumer still relaying a complete answer is still under total_seconds."""
    raw_upstream.rest.set()
    client = Client(Timeouts(connect=2, read=5, total=0.3))
    try:
        response = await client.post(raw_upstream.target, [], b"{}")
        body = await response.read()
        assert len(body) == BODY and response.complete
        fired = asyncio.Event()
        started = asyncio.get_running_loop().time()
        response.on_deadline(fired.set)
        await asyncio.wait_for(fired.wait(), 5)
        assert asyncio.get_running_loop().time() - started < 0.3 + PROMPTLY
        response.release()
    finally:
        await client.close()
