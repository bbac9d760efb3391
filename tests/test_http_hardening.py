"""What a hostile client can do below the JSON body: bytes no HTTP library would send, broken
framing, slow senders. Every answer is OpenAI-shaped JSON, echoes nothing the client sent, and
no connection is held open for long by a client that does not finish its request."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from raw_http import exchange, request

ERROR_FIELDS = {"message", "type", "code", "param"}


def assert_openai_error(body: object, status: int, got: int) -> dict[str, object]:
    assert got == status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == ERROR_FIELDS, error
    return error


@pytest.mark.parametrize("path", ["/v1/models", "/api/v1/keys", "/metrics"])
async def test_non_utf8_bytes_in_authorization_are_a_401(
    start_proxy: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """Issue 11 item 3: hashing the key raised UnicodeEncodeError (a 500)."""
    monkeypatch.setenv("PROXY_METRICS_TOKEN", "metrics-token")
    proxy = await start_proxy()
    answer = await exchange(
        proxy.url, request("GET", path, [("Authorization", b"Bearer sk-bp-\xff\xfe\x80")])
    )
    error = assert_openai_error(answer.json(), 401, answer.status)
    assert error["type"] == "authentication_error"
