"""A slow body cannot hold a connection forever, one key cannot hold them all, and health
checks are answered at the connection cap (issue 21, item 5)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

from conftest import eventually
from raw_http import address, exchange, read_response, request

from proxy.gateway.state import GATEWAY

CHAT = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()


async def _open(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*address(url))


def _head(key: str, length: int = len(CHAT)) -> bytes:
    return request(
        "POST",
        "/v1/chat/completions",
        [("Authorization", f"Bearer {key}"), ("Content-Length", str(length))],
    )


async def test_a_body_trickling_in_is_cut_at_the_total_deadline(
    start_proxy: Callable[..., Any],
) -> None:
    proxy = await start_proxy(server={"body_timeout_seconds": 1.0, "body_deadline_seconds": 1.5})
    _, key = await proxy.create_key("acme")
    reader, writer = await _open(proxy.url)
    started = time.monotonic()
    writer.write(_head(key, 1000))
    answer = None
    with contextlib.suppress(ConnectionError):
        for _ in range(40):  # a byte every 0.2 s: never a pause the per-pause timeout sees
            writer.write(b" ")
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    answer = await read_response(reader)
                    break
    writer.close()
    elapsed = time.monotonic() - started
    assert answer is not None, f"still reading the body after {elapsed:.1f} s"
    assert answer.status == 408, answer.body
    assert answer.json()["error"]["code"] == "request_timeout"
    assert "in full within 1.5 s" in answer.json()["error"]["message"]
    assert answer.closed
    assert 1.4 < elapsed < 4
    assert len(proxy.received()) == 0


async def test_one_key_cannot_hold_more_than_its_share_of_slow_bodies(
    start_proxy: Callable[..., Any],
) -> None:
    proxy = await start_proxy(server={"max_bodies_per_key": 3, "body_timeout_seconds": 30})
    kid, key = await proxy.create_key("acme")
    _, other = await proxy.create_key("acme")
    held = []
    for _ in range(3):
        reader, writer = await _open(proxy.url)
        writer.write(_head(key) + CHAT[:5])
        await writer.drain()
        held.append((reader, writer))
    bodies = proxy.app[GATEWAY].bodies

    async def all_arriving() -> bool:
        return bool(bodies.held(kid) == 3)

    await eventually(all_arriving, what="three bodies in flight for the key")
    refused = await exchange(proxy.url, _head(key) + CHAT[:5])
    assert refused.status == 429, refused.body
    assert refused.json()["error"]["code"] == "too_many_bodies_in_flight"
    assert refused.closed
    # Another key is not held back by it.
    reader, writer = await _open(proxy.url)
    writer.write(_head(other) + CHAT[:5])
    await writer.drain()
    writer.write(CHAT[5:])
    answer = await read_response(reader)
    writer.close()
    assert answer.status == 200, answer.body
    # The held bodies complete normally, and free their places.
    for reader, writer in held:
        writer.write(CHAT[5:])
        await writer.drain()
        answer = await read_response(reader)
        writer.close()
        assert answer.status == 200, answer.body
    assert bodies.held(kid) == 0 and len(bodies) == 0


async def test_health_checks_are_answered_at_the_connection_cap(
    start_proxy: Callable[..., Any],
) -> None:
    proxy = await start_proxy(server={"max_connections": 8, "header_timeout_seconds": 30})
    held = [await _open(proxy.url) for _ in range(8)]
    for path in ("/healthz", "/readyz"):
        answer = await exchange(proxy.url, request("GET", path))
        assert answer.status == 200, (path, answer.body)
        assert answer.closed  # a place past the cap is given back at once
    refused = await exchange(proxy.url, request("GET", "/v1/models"))
    assert refused.status == 503 and refused.closed
    assert refused.json()["error"]["code"] == "too_many_connections"
    for _, writer in held:
        writer.close()
