"""Hostile probes of the Gemini routes (``hostile.Generator.gemini``): the model and method in
the path (unknown, malformed, of the wrong kind), the key as ``x-goog-api-key``, ``?key=`` or a
Bearer token (or none), malformed bodies, huge ``maxOutputTokens`` / ``candidateCount``,
deep ``contents``, and both stream forms."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from hostile import Generator, Probe

GEMINI_MODELS = ("gemini-2.5-flash", "gemini-2.5-flash", "gemini-embedding-001")
METHODS = (
    "generateContent",
    "generateContent",
    "streamGenerateContent",
    "countTokens",
    "embedContent",
    "batchEmbedContents",
)
BASES = ("/v1beta/models/", "/v1/models/", "/api/v1/llm/v1beta/models/")


def _deep(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"text": "bottom"}
    for _ in range(depth):
        value = {"functionResponse": {"name": "f", "response": value}}
    return value


def _contents(gen: Generator) -> Any:
    from hostile import _junk_value, _text

    rng = gen.rng
    roll = rng.random()
    if roll < 0.75:
        return [
            {"role": rng.choice(("user", "model")), "parts": [{"text": _text(rng)}]}
            for _ in range(rng.randint(1, 3))
        ]
    if roll < 0.85:
        return [{"role": "user", "parts": [_deep(rng.choice((10, 60, 120)))]}]
    return _junk_value(rng)


def _body(gen: Generator, method: str) -> dict[str, Any]:
    from hostile import _int_or_junk, _junk_value

    rng = gen.rng
    if method == "embedContent":
        return {"content": {"parts": [{"text": "embed me"}]}}
    if method == "batchEmbedContents":
        count = rng.randint(0, 3)
        return {
            "requests": [{"model": "models/x", "content": {"parts": [{"text": "a b"}]}}] * count
        }
    body: dict[str, Any] = {"contents": _contents(gen)}
    if rng.random() < 0.6:
        config: dict[str, Any] = {"maxOutputTokens": _int_or_junk(rng, 1, 64)}
        if rng.random() < 0.3:
            config["candidateCount"] = _int_or_junk(rng, 1, 3)
        if rng.random() < 0.1:
            config["thinkingConfig"] = {"thinkingBudget": _int_or_junk(rng, 0, 100)}
        body["generationConfig"] = config if rng.random() < 0.95 else _junk_value(rng)
    if rng.random() < 0.1:
        body["systemInstruction"] = _junk_value(rng)
    if rng.random() < 0.05:
        body["tools"] = _junk_value(rng)
    return body


def probe(gen: Generator) -> Probe:
    from hostile import MOCK_STATUSES, _junk_string

    rng = gen.rng
    key = gen.keys.plaintext[rng.choice(("member", "member", "limited", "other_org", "revoked"))]
    model = rng.choice(GEMINI_MODELS) if rng.random() < 0.9 else quote(_junk_string(rng), safe="")
    method = rng.choice(METHODS) if rng.random() < 0.95 else rng.choice(("nope", "", "predict"))
    path = rng.choice(BASES) + (model or "m") + ":" + method
    headers: list[tuple[str, str]] = []
    query: list[str] = []
    roll = rng.random()
    if roll < 0.5:
        headers.append(("x-goog-api-key", key))
    elif roll < 0.7:
        query.append(f"key={key}")
    elif roll < 0.85:
        headers.append(("Authorization", f"Bearer {key}"))
    elif roll < 0.9:
        query.append("key=")
    if method == "streamGenerateContent" and rng.random() < 0.7:
        query.append("alt=sse")
    if rng.random() < 0.3:
        headers.append(("x-mock-output-tokens", str(rng.randint(0, 40))))
    mock_status = None
    if rng.random() < 0.05:
        mock_status = rng.choice(MOCK_STATUSES)
        headers.append(("x-mock-status", str(mock_status)))
    body = _body(gen, method)
    data = json.dumps(body).encode()
    note = " gemini"
    if rng.random() < 0.1:
        data, note = gen._raw_body(body)
        note += " gemini"
    if query:
        path += "?" + "&".join(query)
    return gen._probe(
        "POST", path, headers=headers, body=data, llm=True, mock_status=mock_status, note=note
    )


def is_google_path(path: str) -> bool:
    """Errors in Google's shape: everything under ``v1beta``; under ``/v1/models/`` (OpenAI's
    too) only a known method."""
    path = path.split("?", 1)[0]
    return path.startswith(("/v1beta/", "/api/v1/llm/v1beta/")) or (
        path.startswith("/v1/models/") and path.rpartition(":")[2] in METHODS
    )


def check_error(body: dict[str, Any], where: str) -> None:
    """Google's error shape: ``code``, ``message``, ``status`` (and ``details`` when the proxy
    wrote it; the mock's relayed errors have none)."""
    assert isinstance(body, dict) and set(body) == {"error"}, where
    error = body["error"]
    assert isinstance(error, dict), where
    assert {"code", "message", "status"} <= set(error) <= {"code", "message", "status", "details"}
    assert isinstance(error["message"], str) and error["message"], where
    assert isinstance(error["status"], str) and isinstance(error["code"], int), where
