"""Hostile multipart bodies on the upload routes (issue 27): huge parts, missing or broken
boundaries, a 2 GB declared length, and a seeded run of mangled forms. None may answer a 500
or reach the upstream; every refusal is OpenAI-shaped JSON."""

from __future__ import annotations

import random
from typing import Any

import pytest
from conftest import Proxy
from raw_http import exchange, request

from proxy.config import ModelConfig
from proxy.dialects.form import parse_form
from proxy.errors import ApiError

MODELS = [
    ModelConfig(name="gpt-4o-mini", upstream="mock", max_output_tokens=1000),
    ModelConfig(name="gpt-image-1", upstream="mock", kind="image", max_output_tokens=6240),
]
BOUNDARY = "b0undary"


def form(*parts: tuple[str, bytes, str | None]) -> bytes:
    out = b""
    for name, value, filename in parts:
        out += f"--{BOUNDARY}\r\n".encode()
        disposition = f'Content-Disposition: form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"\r\nContent-Type: image/png'
        out += disposition.encode() + b"\r\n\r\n" + value + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


GOOD = form(
    ("model", b"gpt-image-1", None), ("prompt", b"blue", None), ("image", b"PNG", "a.png")
)


@pytest.fixture
async def proxy(start_proxy: Any) -> Proxy:
    started: Proxy = await start_proxy(models=MODELS, server={"max_body_bytes": 1 << 20})
    return started


async def send(proxy: Proxy, key: str, body: bytes, headers: list[tuple[str, str]]) -> Any:
    all_headers: list[tuple[bytes | str, bytes | str]] = [
        ("Authorization", f"Bearer {key}"),
        *headers,
    ]
    return await exchange(proxy.url, request("POST", "/v1/images/edits", all_headers, body))


async def test_hostile_forms_are_refused_without_a_500_or_an_upstream_call(proxy: Proxy) -> None:
    _, key = await proxy.create_key("acme")
    multipart = ("Content-Type", f"multipart/form-data; boundary={BOUNDARY}")
    cases: list[tuple[bytes, list[tuple[str, str]], set[int]]] = [
        (GOOD, [("Content-Type", "multipart/form-data")], {400}),  # no boundary
        (GOOD, [("Content-Type", "application/json")], {400}),
        (GOOD, [("Content-Type", 'multipart/form-data; boundary=""')], {400}),
        (GOOD, [("Content-Type", "multipart/form-data; boundary=" + "x" * 71)], {400}),
        (GOOD.replace(BOUNDARY.encode(), b"other"), [multipart], {400}),
        (GOOD[:-20], [multipart], {400}),  # no closing delimiter
        (b"preamble\r\n" + GOOD, [multipart], {400}),
        (GOOD.replace(b"form-data; ", b""), [multipart], {400}),
        (form(("model", b"gpt-image-1", None), ("model", b"x", None)), [multipart], {400}),
        (form(*[("f", b"x", "a.png")] * 65), [multipart], {400}),
        (form(("model", b"\xff\xfe", None)), [multipart], {400}),
        (form(("image", b"x" * (2 << 20), "big.png")), [multipart], {413}),  # a huge part
    ]
    for body, headers, statuses in cases:
        answer = await send(proxy, key, body, headers)
        assert answer.status in statuses, (headers, body[:80], answer.status, answer.body)
        assert set(answer.json()["error"]) == {"message", "type", "code", "param"}
    assert [r for r in proxy.received() if r.path == "/v1/images/edits"] == []


async def test_a_2gb_declared_length_is_refused_at_once(proxy: Proxy) -> None:
    _, key = await proxy.create_key("acme")
    headers: list[tuple[bytes | str, bytes | str]] = [
        ("Authorization", f"Bearer {key}"),
        ("Content-Type", f"multipart/form-data; boundary={BOUNDARY}"),
        ("Content-Length", str(2 * 1024**3)),
    ]
    raw = request("POST", "/v1/images/edits", headers, GOOD[:100])
    answer = await exchange(proxy.url, raw, within=10.0)
    assert answer.status == 413, answer.body
    assert answer.json()["error"]["type"] == "invalid_request_error"


def test_mangled_forms_raise_only_a_400() -> None:
    """A seeded run over the parser alone: bytes dropped, doubled and flipped."""
    rng = random.Random(20261207)
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    seen = set()
    for _ in range(3000):
        body = bytearray(GOOD)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(body))
            choice = rng.random()
            if choice < 0.4:
                del body[at : at + rng.randint(1, 8)]
            elif choice < 0.7:
                body[at:at] = body[at : at + rng.randint(1, 12)]
            else:
                body[at] = rng.randrange(256)
        try:
            parsed = parse_form(bytes(body), content_type)
        except ApiError as exc:
            assert exc.status == 400
            seen.add("refused")
        else:
            assert isinstance(parsed, dict)
            seen.add("parsed")
    assert seen == {"refused", "parsed"}
