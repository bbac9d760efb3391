"""A stream whose upstream never reported usage (the client left, the upstream broke off) is
charged by counting what was relayed: never below what reached the client (issue 21, item 1).

Tokens are counted per delta, as the upstream produced them: the concatenated text tokenizes
into fewer tokens than the deltas it was sent in (" hel" + "lo" is one token, " hello"), so
counting the joined text charged one chunk less than the client received.
"""

from __future__ import annotations

import json

from conftest import make_settings

from proxy.catalog.routes import build_routes
from proxy.catalog.tokenizer import count_text
from proxy.dialects import OPENAI


def _chunk(text: str) -> bytes:
    delta = {"choices": [{"index": 0, "delta": {"content": text}}]}
    return b"data: " + json.dumps(delta).encode() + b"\n\n"


def test_a_dropped_stream_is_charged_at_least_one_token_per_content_chunk() -> None:
    route = build_routes(make_settings("http://127.0.0.1:1/v1"))["gpt-4o-mini"]
    deltas = [" hel", "lo", " wor", "ld"] * 5
    joined = count_text(route.encoding, "".join(deltas))
    assert joined < len(deltas), "premise: the joined text is fewer tokens than its deltas"
    meter = OPENAI.stream_meter("chat/completions", route, 7, 1000, False)
    for text in deltas:
        meter.relay(_chunk(text))
    usage = meter.usage()
    assert not usage.reported
    assert usage.input_tokens == 7
    assert usage.output_tokens >= len(deltas)

