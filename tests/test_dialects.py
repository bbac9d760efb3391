"""The dialects registry: error shapes chosen by path, lookups by name, and the layering that
keeps a dialect below the request path (no import of ``proxy.gateway``)."""

from __future__ import annotations

import json
import subprocess
import sys

from proxy.dialects import ANTHROPIC, DEFAULT, DIALECTS, GEMINI, OPENAI, by_name, for_path
from proxy.errors import ApiError


def test_error_shape_follows_the_path() -> None:
    for path in ("/v1/messages", "/api/v1/llm/messages/x", "/api/v1/llm/v1/messages/count_tokens"):
        assert for_path(path) is ANTHROPIC, path
    for path in ("/v1/chat/completions", "/api/v1/llm/responses", "/v1/models", "/metrics"):
        assert for_path(path) is OPENAI, path
    assert DEFAULT is OPENAI


def test_google_paths_take_googles_shape_and_vertex_claude_anthropics() -> None:
    vertex = "/v1/projects/p/locations/l/publishers"
    for path in (
        "/v1beta/models/gemini-2.5-flash:generateContent",
        "/v1/models/gemini-2.5-flash:streamGenerateContent",
        "/api/v1/llm/v1beta/models/x:countTokens",
        f"{vertex}/google/models/gemini-2.5-pro:generateContent",
        "/v1beta1/projects/p/locations/l/publishers/google/models/m:embedContent",
        "/v1beta/anything",
    ):
        assert for_path(path) is GEMINI, path
    claude = "/projects/p/locations/l/publishers/anthropic/models/c"
    for path in (f"/v1{claude}:rawPredict", f"{claude}:streamRawPredict"):
        assert for_path(path) is ANTHROPIC, path
    for path in ("/v1/models/gpt-4o", "/v1/models/ft:gpt-4o:org::id", "/v1/models"):
        assert for_path(path) is OPENAI, path


def test_lookup_by_name_and_every_dialect_is_complete() -> None:
    assert [dialect.name for dialect in DIALECTS] == ["openai", "anthropic", "bedrock", "gemini"]
    for dialect in DIALECTS:
        assert by_name(dialect.name) is dialect
        assert set(dialect.endpoint_kinds) == set(dialect.endpoints)
        assert set(dialect.docs.descriptions) == set(dialect.endpoints)
        assert dialect.docs.streamed <= set(dialect.endpoints)


def test_each_dialect_renders_its_own_error_shape() -> None:
    error = ApiError(429, "slow down", type="requests", code="rate_limit_exceeded")
    assert error.body(OPENAI) == error.body() == {
        "error": {
            "message": "slow down",
            "type": "requests",
            "code": "rate_limit_exceeded",
            "param": None,
        }
    }
    assert error.body(ANTHROPIC) == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "slow down"},
    }


def test_dialects_sit_below_the_gateway() -> None:
    code = (
        "import sys, json; import proxy.dialects, proxy.catalog.routes; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('proxy.gateway', "
        "'proxy.admin', 'proxy.app')))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == []
