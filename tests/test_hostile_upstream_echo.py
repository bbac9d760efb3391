"""An upstream that echoes its credential does not hand it to clients (issue 21, item 6).

The upstream here quotes the ``Authorization`` it received — whole, and shortened the way
provider errors print a key — in an error body, response headers, a 200 body and a stream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import ADMIN_KEY, make_settings

from proxy.app import create_app
from proxy.providers.redact import anchor_length

CREDENTIAL = "sk-proj-Zq8Rk2LmN4pX7vB1cD9eF3gH5jK0"
SHORTENED = CREDENTIAL[: anchor_length(CREDENTIAL)]
MESSAGES = [{"role": "user", "content": "hello"}]


class Echo:
    def __init__(self) -> None:
        self.seen: list[str] = []

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        given = request.headers.get("Authorization", "").removeprefix("Bearer ")
        self.seen.append(given)
        quoted = f"{given} (also {given[: len(SHORTENED)]}****{given[-4:]})"
        mode = request.headers.get("x-mock-echo", "ok")
        if mode == "error":
            return web.json_response(
                {"error": {"message": f"Incorrect API key provided: {quoted}.", "code": "x"}},
                status=401,
                headers={
                    "www-authenticate": f'Bearer realm="api", error_description="{given}"',
                    "location": f"https://upstream.example/login?key={given}",
                },
            )
        usage = {"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12}
        if mode == "stream" and body.get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            chunk = {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "delta": {"content": quoted}, "finish_reason": None}],
            }
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            error = {"error": {"message": f"key {quoted} was throttled"}}
            await response.write(f"event: error\ndata: {json.dumps(error)}\n\n".encode())
            last = {**chunk, "choices": [], "usage": usage}
            await response.write(f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode())
            await response.write_eof()
            return response
        return web.json_response(
            {
                "id": "c1",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"your key is {quoted}"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            },
            headers={"x-echo": quoted},
        )


@pytest.fixture
async def echoing(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[str, str, Echo, aiohttp.ClientSession]]:
    monkeypatch.setenv("TEST_PROXY_ADMIN_KEY", ADMIN_KEY)
    monkeypatch.setenv("TEST_UPSTREAM_KEY", CREDENTIAL)
    echo = Echo()
    upstream_app = web.Application()
    upstream_app.router.add_post("/v1/chat/completions", echo.chat)
    upstream = TestServer(upstream_app, host="127.0.0.1")
    await upstream.start_server()
    proxy = TestServer(
        create_app(make_settings(str(upstream.make_url("/v1"))), redis_url), host="127.0.0.1"
    )
    await proxy.start_server()
    url = str(proxy.make_url("")).rstrip("/")
    session = aiohttp.ClientSession()
    try:
        auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with session.post(url + "/api/v1/keys", json={"org_id": "echo"}, headers=auth) as r:
            assert r.status == 201
            key = (await r.json())["key"]
        yield url, key, echo, session
    finally:
        await session.close()
        await proxy.close()
        await upstream.close()


async def _ask(
    echoing: tuple[str, str, Echo, aiohttp.ClientSession], mode: str, **body: Any
) -> tuple[int, str, str]:
    url, key, echo, session = echoing
    async with session.post(
        url + "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": MESSAGES, **body},
        headers={"Authorization": f"Bearer {key}", "x-mock-echo": mode},
    ) as response:
        text = await response.text()
        headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
    assert echo.seen[-1] == CREDENTIAL  # the premise: the upstream had it, and echoed it
    return response.status, headers, text


def _assert_masked(where: str) -> None:
    assert CREDENTIAL not in where
    assert SHORTENED not in where
    assert "[REDACTED]" in where


async def test_an_error_body_and_headers_echoing_the_credential_are_masked(
    echoing: tuple[str, str, Echo, aiohttp.ClientSession],
) -> None:
    status, headers, text = await _ask(echoing, "error")
    assert status == 401
    _assert_masked(text)
    _assert_masked(headers)
    json.loads(text)  # still the upstream's JSON
    assert CREDENTIAL[-4:] in text  # a suffix alone identifies nothing and is left


async def test_a_buffered_answer_echoing_the_credential_is_masked(
    echoing: tuple[str, str, Echo, aiohttp.ClientSession],
) -> None:
    status, headers, text = await _ask(echoing, "ok")
    assert status == 200
    _assert_masked(text)
    _assert_masked(headers)
    assert json.loads(text)["usage"]["total_tokens"] == 12


async def test_a_stream_echoing_the_credential_is_masked(
    echoing: tuple[str, str, Echo, aiohttp.ClientSession],
) -> None:
    status, _, text = await _ask(echoing, "stream", stream=True)
    assert status == 200
    _assert_masked(text)
    assert "event: error" in text and text.rstrip().endswith("data: [DONE]")
