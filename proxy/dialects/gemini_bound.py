"""A worst-case bound on a Gemini prompt's input tokens, computed without Gemini's tokenizer.

Gemini's tokenizer (SentencePiece with byte fallback) is not shipped with any package this
proxy may use, and zero overshoot needs a worst case, not an estimate. Every SentencePiece
token stands for at least one character, so at least one byte of UTF-8; the rest follows the
figures Google publishes for media:

* **Text** parts, ``systemInstruction`` and text-like ``inlineData`` (``text/*``, JSON, XML,
  …): at most their UTF-8 length (decoded length for inline data) in tokens.
* **Structure** (``functionCall`` / ``functionResponse`` parts, ``tools``, ``toolConfig``):
  compact JSON bytes plus markup per member, as for Claude (``claude_bound.structure``).
* **Framing**: ``REQUEST_FRAMING`` per request, ``CONTENT_FRAMING`` per content (turn) and
  ``PART_FRAMING`` per part, for role and turn markers.
* **Images** (``inlineData`` with an ``image/*`` type whose size its header tells): Gemini
  2.x bills 258 tokens per tile; tiles are cut at least ``TILE_MIN`` pixels wide, so
  ``258 · ⌈w/256⌉ · ⌈h/256⌉``, and never less than ``IMAGE_MIN`` (the largest per-image
  figure of Gemini 3's ``media_resolution`` levels).
* **Audio, video, PDFs, images of unknown size, ``fileData`` URIs and ``cachedContent``**:
  their tokens depend on a duration, page count or stored content no header gives, so the
  bound is the model's ``context_window`` (the most input it accepts). Operators lower it per
  model (``context_window``) to hold less for such requests.

The whole input is at most the context window: the bound is ``min(sum, context_window)``.
Settlement always uses the ``usageMetadata`` the upstream reports; the bound only decides
what is held. Slack for English prose is about 4x (Google's figure: ~4 characters a token).
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

from proxy.dialects.claude_bound import image_size, structure

REQUEST_FRAMING = 32
CONTENT_FRAMING = 16
PART_FRAMING = 16
TILE_TOKENS = 258
TILE_MIN = 256
IMAGE_MIN = 2240
_HEADER_BYTES = 96 * 1024
_TEXT_TYPES = ("text/", "application/json", "application/xml", "application/x-javascript")


class Unbounded(Exception):
    """Part of the prompt has no local bound: the context window is its bound."""


def _utf8(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _inline(data: dict[str, Any]) -> int:
    mime = data.get("mimeType") or data.get("mime_type")
    payload = data.get("data")
    if not isinstance(mime, str) or not isinstance(payload, str):
        raise Unbounded
    mime = mime.lower()
    if mime.startswith(_TEXT_TYPES):
        return math.ceil(len(payload) * 3 / 4)  # decoded bytes, at most
    if not mime.startswith("image/"):
        raise Unbounded  # audio, video, PDF: tokens follow a duration or a page count
    head = payload[: _HEADER_BYTES // 3 * 4]
    try:
        raw = base64.b64decode(head + "=" * (-len(head) % 4))
    except (binascii.Error, ValueError):
        raise Unbounded from None
    size = image_size(raw)
    if size is None or size[0] <= 0 or size[1] <= 0:
        raise Unbounded
    tiles = math.ceil(size[0] / TILE_MIN) * math.ceil(size[1] / TILE_MIN)
    return max(IMAGE_MIN, TILE_TOKENS * tiles)


def _part(part: Any) -> int:
    if not isinstance(part, dict):
        return PART_FRAMING + structure(part)
    tokens = PART_FRAMING
    for name, value in part.items():
        if name == "text" and isinstance(value, str):
            tokens += _utf8(value)
        elif name in ("inlineData", "inline_data") and isinstance(value, dict):
            tokens += _inline(value)
        elif name in ("fileData", "file_data"):
            raise Unbounded  # a stored file or URI: its size is not in the request
        elif name in ("thought", "thoughtSignature", "thought_signature"):
            continue  # a flag, and an opaque signature the model does not read as tokens
        else:
            tokens += structure(value)
    return tokens


def _content(content: Any) -> int:
    if isinstance(content, str):
        return CONTENT_FRAMING + _utf8(content)
    if not isinstance(content, dict):
        return CONTENT_FRAMING + structure(content)
    parts = content.get("parts")
    tokens = CONTENT_FRAMING
    if isinstance(parts, list):
        for part in parts:
            tokens += _part(part)
    elif parts is not None:
        tokens += _part(parts)
    return tokens


def contents_bound(contents: Any) -> int:
    if isinstance(contents, list):
        return sum(_content(content) for content in contents)
    return _content(contents) if contents is not None else 0


def prompt_bound(body: dict[str, Any], context_window: int) -> int:
    """The most input tokens ``body`` (a ``generateContent``, ``countTokens`` or embedding
    request) can be billed for; never 0."""
    try:
        if body.get("cachedContent") is not None:
            raise Unbounded
        tokens = REQUEST_FRAMING + contents_bound(body.get("contents"))
        tokens += contents_bound(body.get("content"))  # embedContent
        system = body.get("systemInstruction", body.get("system_instruction"))
        if system is not None:
            tokens += _content(system)
        for name in ("tools", "toolConfig", "tool_config"):
            if body.get(name) is not None:
                tokens += structure(body[name])
        requests = body.get("requests")  # batchEmbedContents
        if isinstance(requests, list):
            for request in requests:
                if isinstance(request, dict):
                    tokens += REQUEST_FRAMING + contents_bound(request.get("content"))
    except Unbounded:
        return context_window
    return max(1, min(tokens, context_window))
