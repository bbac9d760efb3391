"""The Claude reservation bound: never below a published token count, and how loose it is."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from proxy.errors import ApiError
from proxy.gateway import claude_bound
from proxy.gateway.claude_bound import IMAGE_MAX, image_size, image_tokens, prompt_bound
from proxy.gateway.tokenizer import get_encoding

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "anthropic_token_counts.json"
EXAMPLES: list[dict[str, Any]] = json.loads(FIXTURE.read_text())["examples"]
MESSAGES = [{"role": "user", "content": "Hello"}]


@pytest.mark.parametrize("context_window", [200_000, 1_000_000])
def test_the_bound_covers_every_published_count_and_reports_its_slack(
    context_window: int,
) -> None:
    rows = []
    for example in EXAMPLES:
        bound = prompt_bound(example["body"], context_window)
        published = example["published_input_tokens"]
        assert bound >= published, example["name"]
        rows.append(f"{example['name']}: bound {bound} / published {published} = "
                    f"{bound / published:.2f}x")  # fmt: skip
    print(f"\ncontext window {context_window}:\n  " + "\n  ".join(rows))


def test_text_is_bounded_by_its_utf8_length_which_no_byte_level_bpe_exceeds() -> None:
    samples = [
        "plain English prose, with punctuation!",
        "日本語のテキストと絵文字 🎉🚀",
        "def f(x):\n    return {'a': [1, 2, 3]}\n" * 20,
        "ﷺ" * 50 + "\u200b" * 30,
    ]
    for name in ("cl100k_base", "o200k_base"):
        encoding = get_encoding(name)
        for text in samples:
            assert len(encoding.encode_ordinary(text)) <= len(text.encode())
    body = {"messages": [{"role": "user", "content": samples[1]}]}
    framing = claude_bound.REQUEST_FRAMING + claude_bound.MESSAGE_FRAMING + len("user")
    assert prompt_bound(body, 10**6) == framing + len(samples[1].encode())


def test_tools_add_the_tool_prompt_and_their_json_with_markup_per_member() -> None:
    tool = {"name": "f", "input_schema": {"type": "object", "properties": {"a": {"type": "x"}}}}
    with_tool = prompt_bound({"messages": MESSAGES, "tools": [tool]}, 10**6)
    without = prompt_bound({"messages": MESSAGES}, 10**6)
    members = 2 + 2 + 1 + 1  # name, input_schema; type, properties; a; type
    size = len(json.dumps(tool, separators=(",", ":")))
    assert with_tool - without == (
        claude_bound.TOOL_PROMPT
        + claude_bound.BLOCK_FRAMING
        + size
        + claude_bound.MEMBER_FRAMING * members
    )
    # An Anthropic-defined client tool adds its own system prompt on top.
    bash = {"type": "bash_20250124", "name": "bash"}
    with_bash = prompt_bound({"messages": MESSAGES, "tools": [bash]}, 10**6)
    assert with_bash - without > claude_bound.TOOL_PROMPT + claude_bound.ANTHROPIC_TOOL


@pytest.mark.parametrize(
    "tool",
    [
        {"type": "web_search_20250305", "name": "web_search"},
        {"type": "web_fetch_20250910", "name": "web_fetch"},
        {"type": "code_execution_20250825", "name": "code_execution"},
        {"type": "something_new_20990101", "name": "x"},
    ],
)
def test_server_tools_and_unknown_tool_types_are_refused(tool: dict[str, Any]) -> None:
    with pytest.raises(ApiError) as caught:
        prompt_bound({"messages": MESSAGES, "tools": [tool]}, 10**6)
    assert caught.value.status == 400 and caught.value.code == "unsupported_tool"
    with pytest.raises(ApiError):
        prompt_bound({"messages": MESSAGES, "mcp_servers": [{"url": "https://x"}]}, 10**6)


def png(width: int, height: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I4sII", 13, b"IHDR", width, height) + b"\0" * 5


def jpeg(width: int, height: int) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0" + b"\0" * 9
    sof = b"\xff\xc0" + struct.pack(">HBHH", 17, 8, height, width) + b"\0" * 10
    return b"\xff\xd8" + app0 + sof


def gif(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\0" * 4


def webp(width: int, height: int) -> bytes:
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\0" * 4
    return (
        b"RIFF\0\0\0\0WEBP"
        + vp8x
        + (width - 1).to_bytes(3, "little")
        + (height - 1).to_bytes(3, "little")
    )


@pytest.mark.parametrize("make", [png, jpeg, gif, webp])
def test_image_sizes_are_read_from_their_headers(make: Any) -> None:
    assert image_size(make(1092, 1092)) == (1092, 1092)
    assert image_size(make(200, 300)) == (200, 300)


def image_block(data: bytes) -> dict[str, Any]:
    encoded = base64.b64encode(data).decode()
    return {"type": "image", "source": {"type": "base64", "media_type": "x", "data": encoded}}


def test_images_are_bounded_by_both_published_formulas_and_never_zero() -> None:
    # 1092 x 1092: 1590 by w*h/750 (Anthropic's table says ~1590), 39 * 39 = 1521 patches.
    assert image_tokens(1092, 1092) == 1590
    assert image_tokens(200, 200) == 64  # 8 * 8 patches > 54 by area
    assert image_tokens(8000, 8000) == IMAGE_MAX  # resized upstream, never above the cap
    small = {"messages": [{"role": "user", "content": [image_block(png(200, 200))]}]}
    unknown = {"messages": [{"role": "user", "content": [image_block(b"not an image")]}]}
    by_url = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "u"}}]}
        ]
    }
    base = prompt_bound({"messages": [{"role": "user", "content": []}]}, 10**6)
    block = claude_bound.BLOCK_FRAMING
    assert prompt_bound(small, 10**6) - base == block + 64
    assert prompt_bound(unknown, 10**6) - base == block + IMAGE_MAX
    assert prompt_bound(by_url, 10**6) - base == block + IMAGE_MAX


def test_pdfs_and_cited_documents_take_the_context_window_text_documents_their_bytes() -> None:
    def doc(**fields: Any) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": [{"type": "document", **fields}]}]}

    pdf = doc(source={"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="})
    assert prompt_bound(pdf, 200_000) == 200_000
    text = {"type": "text", "media_type": "text/plain", "data": "a short note"}
    assert prompt_bound(doc(source=text), 200_000) < 200
    cited = doc(source=text, citations={"enabled": True})
    assert prompt_bound(cited, 200_000) == 200_000


def test_the_context_window_caps_the_bound_and_the_1m_beta_raises_it() -> None:
    long = {"messages": [{"role": "user", "content": "x" * 300_000}]}
    assert prompt_bound(long, 200_000) == 200_000
    assert prompt_bound(long, 200_000, long_context=True) > 300_000
    pdf = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "document", "source": {"type": "file", "file_id": "f"}}],
            }
        ]
    }
    assert prompt_bound(pdf, 200_000, long_context=True) == 1_000_000
