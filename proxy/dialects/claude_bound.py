"""A worst-case bound on a Claude prompt's input tokens, computed without Claude's tokenizer.

Claude's tokenizers are not public, and zero overshoot needs the reservation to be a worst
case, never an estimate. The bound rests on one property of byte-level BPE tokenizers — every
token stands for at least one byte of UTF-8 — plus published figures for what is not text:

* **Text** (system prompt, messages, tool results, thinking, text documents): at most its
  UTF-8 length in tokens.
* **Structure** (tool definitions, tool-call inputs, anything passed as JSON): its compact JSON
  text in bytes, plus ``MEMBER_FRAMING`` tokens per object member and array element for the
  markup the upstream may render around each one.
* **Framing**: ``REQUEST_FRAMING`` per request, ``MESSAGE_FRAMING`` per message and
  ``BLOCK_FRAMING`` per content block, for role and block markers (Anthropic's own example,
  a system prompt and one message, has 6 tokens of framing in 14).
* **Tools**: ``TOOL_PROMPT`` for the system prompt Anthropic adds when tools are present
  (the largest published figure is 804 tokens, Claude Opus 4.7 with ``tool_choice`` any/tool),
  and ``ANTHROPIC_TOOL`` more for each Anthropic-defined client tool (computer use: 735 tokens
  per definition plus up to 499 of system prompt; text editor 700; bash 245).
  Server tools (web search, web fetch, code execution, tool search, MCP servers) are refused:
  they run several model calls inside one request, so their input is not bounded by the prompt.
* **Images**: ``max(⌈w·h/750⌉, ⌈w/28⌉·⌈h/28⌉)`` from the size in the image's header (both
  published formulas; resizing only lowers it), at most ``IMAGE_MAX`` — which is also the bound
  of an image whose size cannot be read (a URL, a file id, an unknown format). The largest
  published native resolution (2,576 px on the long edge, about 3.75 megapixels, Claude Opus
  4.7) costs at most ≈5,000 tokens by either formula.
* **PDFs and other binary documents**, documents and search results with citations enabled
  (split into indexed sentences upstream), and opaque blocks (encrypted server-tool results):
  no local bound exists, so they are bounded by the context window.

The whole input is at most the model's context window (a longer prompt is refused by the
upstream before anything is billed): the bound is ``min(sum, context_window)``, with the
context window raised to 1M tokens when the request asks for Anthropic's ``context-1m`` beta.
Settlement always uses the usage the upstream reports; the bound only decides what is held.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from typing import Any

from proxy.errors import bad_request

REQUEST_FRAMING = 32
MESSAGE_FRAMING = 16
BLOCK_FRAMING = 16
MEMBER_FRAMING = 16
TOOL_PROMPT = 1024
ANTHROPIC_TOOL = 2048
IMAGE_MAX = 6000
LONG_CONTEXT = 1_000_000
"""The context window of Anthropic's ``context-1m`` beta."""

_CLIENT_TOOL_PREFIXES = ("bash_", "text_editor_", "computer_", "memory_")
"""Anthropic-defined tools that the client executes: one model call per request, like custom
tools. Every other ``type`` is a server tool (or unknown) and is refused."""
_HEADER_BYTES = 96 * 1024
"""How much of a base64 image is decoded to find its size (JPEG puts EXIF data first)."""


class Unbounded(Exception):
    """Part of the prompt has no local bound: the context window is its bound."""


def _utf8(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _text(value: Any) -> int:
    return _utf8(value) if isinstance(value, str) else 0


def _members(value: Any) -> int:
    """Object members and array elements, at every depth."""
    count = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            count += len(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            count += len(item)
            stack.extend(item)
    return count


def structure(value: Any) -> int:
    """JSON passed to the model (tool schemas and inputs): bytes plus markup per member."""
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        raise bad_request("The request contains a value that is not JSON.") from None
    return _utf8(text) + MEMBER_FRAMING * _members(value)


def image_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG, GIF, WebP or JPEG header; None when not found."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
        return width, height
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        return _webp_size(data)
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(data) >= 30:
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    return None


_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    at = 2
    while at + 9 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            at += 2
            continue
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if marker in _SOF:
            height = int.from_bytes(data[at + 5 : at + 7], "big")
            width = int.from_bytes(data[at + 7 : at + 9], "big")
            return width, height
        at += 2 + length
    return None


def image_tokens(width: int, height: int) -> int:
    if width <= 0 or height <= 0:
        return IMAGE_MAX
    by_area = math.ceil(width * height / 750)
    by_patch = math.ceil(width / 28) * math.ceil(height / 28)
    return min(max(by_area, by_patch), IMAGE_MAX)


def _image(block: dict[str, Any]) -> int:
    source = block.get("source")
    if not isinstance(source, dict) or source.get("type") != "base64":
        return IMAGE_MAX
    data = source.get("data")
    if not isinstance(data, str):
        return IMAGE_MAX
    head = data[: _HEADER_BYTES // 3 * 4]
    try:
        raw = base64.b64decode(head + "=" * (-len(head) % 4))
    except (binascii.Error, ValueError):
        return IMAGE_MAX
    size = image_size(raw)
    return IMAGE_MAX if size is None else image_tokens(*size)


def _cites(block: dict[str, Any]) -> bool:
    citations = block.get("citations")
    return isinstance(citations, dict) and bool(citations.get("enabled"))


def _document(block: dict[str, Any]) -> int:
    if _cites(block):
        raise Unbounded
    source = block.get("source")
    extra = _text(block.get("title")) + _text(block.get("context"))
    if isinstance(source, dict) and source.get("type") == "text":
        return extra + _text(source.get("data"))
    if isinstance(source, dict) and source.get("type") == "content":
        return extra + _blocks(source.get("content"))
    raise Unbounded  # PDFs (base64, URL, file id): no local bound


def _block(block: Any) -> int:
    if isinstance(block, str):
        return _utf8(block)
    if not isinstance(block, dict):
        return 0
    kind = block.get("type")
    if kind == "text":
        size = _text(block.get("text"))
        if block.get("citations"):
            size += structure(block["citations"])
        return size
    if kind == "image":
        return _image(block)
    if kind == "document":
        return _document(block)
    if kind in ("tool_use", "server_tool_use"):
        return _text(block.get("name")) + structure(block.get("input", {}))
    if kind == "tool_result":
        return _blocks(block.get("content"))
    if kind == "thinking":
        return _text(block.get("thinking"))
    if kind == "redacted_thinking":
        return _text(block.get("data"))
    if kind == "search_result" and not _cites(block):
        texts = _text(block.get("title")) + _text(block.get("source"))
        return texts + _blocks(block.get("content"))
    if kind == "search_result" or any(
        key in block for key in ("encrypted_content", "file_id", "source")
    ):
        raise Unbounded  # opaque or binary content
    return structure(block)


def _blocks(content: Any) -> int:
    if isinstance(content, str):
        return _utf8(content)
    if not isinstance(content, list):
        return 0
    return sum(BLOCK_FRAMING + _block(block) for block in content)


def _tools(tools: Any) -> int:
    if tools is None:
        return 0
    if not isinstance(tools, list):
        raise bad_request("'tools' must be an array.", param="tools")
    if not tools:
        return 0
    total = TOOL_PROMPT
    for tool in tools:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind not in (None, "custom"):
            if not isinstance(kind, str) or not kind.startswith(_CLIENT_TOOL_PREFIXES):
                raise bad_request(
                    f"The tool type '{kind}' is not supported through this proxy: server tools "
                    "run several model calls inside one request, so its cost cannot be bounded "
                    "before it runs.",
                    param="tools",
                    code="unsupported_tool",
                )
            total += ANTHROPIC_TOOL
        total += BLOCK_FRAMING + structure(tool)
    return total


def prompt_bound(body: dict[str, Any], context_window: int, long_context: bool = False) -> int:
    """The most input tokens (uncached, cache reads and cache writes together) the request
    can be billed for. Raises a 400 ``ApiError`` for what cannot be bounded or is malformed."""
    if body.get("mcp_servers"):
        raise bad_request(
            "MCP servers run tool calls inside one request, so its cost cannot be bounded "
            "before it runs: they are not supported through this proxy.",
            param="mcp_servers",
            code="unsupported_tool",
        )
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise bad_request("'messages' must be an array.", param="messages")
    cap = max(context_window, LONG_CONTEXT) if long_context else context_window
    tools = _tools(body.get("tools"))
    try:
        total = REQUEST_FRAMING + tools + _blocks(body.get("system"))
        for message in messages:
            if not isinstance(message, dict):
                raise bad_request("Each message must be an object.", param="messages")
            total += MESSAGE_FRAMING + _text(message.get("role"))
            total += _blocks(message.get("content"))
    except Unbounded:
        return cap
    return min(total, cap)
