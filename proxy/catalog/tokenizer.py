"""Offline tiktoken encodings and prompt token counting for admission control.

The counts here reserve budget *before* the upstream answers; the upstream's reported usage
settles the bill afterwards. Exact for plain text; chat/responses framing follows OpenAI's
cookbook rule, and images, tool definitions and non-text parts are documented estimates.

Encodings load without network access: ``cl100k_base`` and ``o200k_base`` are vendored (gzip,
sha256-checked) in ``proxy/catalog/encodings``. Any other name goes through
``tiktoken.get_encoding``, which reads ``TIKTOKEN_CACHE_DIR`` first, so a deployment can supply
e.g. ``r50k_base`` there.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import gzip
import hashlib
import json
import threading
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import tiktoken
from tiktoken_ext.openai_public import (
    ENDOFPROMPT,
    ENDOFTEXT,
    FIM_MIDDLE,
    FIM_PREFIX,
    FIM_SUFFIX,
)

__all__ = [
    "EncodingUnavailable",
    "count_chat_prompt",
    "count_completion_prompt",
    "count_embedding_input",
    "count_prompt",
    "count_responses_input",
    "count_text",
    "get_encoding",
    "preload",
]

_ENCODINGS_DIR = Path(__file__).resolve().parent / "encodings"

TOKENS_PER_MESSAGE = 3
"""Cookbook: each message is framed as ``<|start|>{role}<|message|>{content}<|end|>``."""
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3
"""Cookbook: every reply is primed with ``<|start|>assistant<|message|>``."""
IMAGE_TOKENS = 85
"""Estimate: the low-detail cost of one image on gpt-4o-class models. High-detail images cost
more (tiles of 170 tokens), which the upstream's reported usage settles afterwards."""
OFFLOAD_CHARS = 32 * 1024
"""Above about this many characters (≈0.4 ms of counting), counting moves to a worker thread;
below it, the ~50 µs thread hand-off is not worth it. See ``_is_large`` for the estimate."""


class _Vendored(NamedTuple):
    filename: str
    sha256: str
    pat_str: str
    special_tokens: dict[str, int]


# Identical to tiktoken_ext.openai_public's constructors (which inline these values rather than
# exposing them); tests/test_tokenizer.py asserts the equality against the installed tiktoken.
_VENDORED: dict[str, _Vendored] = {
    "cl100k_base": _Vendored(
        "cl100k_base.tiktoken.gz",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",  # noqa: E501
        {
            ENDOFTEXT: 100257,
            FIM_PREFIX: 100258,
            FIM_MIDDLE: 100259,
            FIM_SUFFIX: 100260,
            ENDOFPROMPT: 100276,
        },
    ),
    "o200k_base": _Vendored(
        "o200k_base.tiktoken.gz",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        "|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        {ENDOFTEXT: 199999, ENDOFPROMPT: 200018},
    ),
}


class EncodingUnavailable(RuntimeError):
    """The encoding cannot be loaded offline; the proxy must not start a model that needs it."""

    def __init__(self, name: str, reason: str = "") -> None:
        self.name = name
        detail = f": {reason}" if reason else ""
        super().__init__(
            f"tiktoken encoding {name!r} is unavailable{detail}. Only cl100k_base and o200k_base "
            "are bundled; provide others by pointing TIKTOKEN_CACHE_DIR at a directory holding "
            "tiktoken's cached file for it (populate it once on a machine with network access)."
        )


def _load_vendored(name: str, spec: _Vendored) -> tiktoken.Encoding:
    path = _ENCODINGS_DIR / spec.filename
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as exc:
        raise EncodingUnavailable(name, f"cannot read {path}: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != spec.sha256:
        raise EncodingUnavailable(name, f"{path} is corrupted (sha256 mismatch)")
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():  # same format and parsing as tiktoken.load.load_tiktoken_bpe
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(
        name, pat_str=spec.pat_str, mergeable_ranks=ranks, special_tokens=spec.special_tokens
    )


@functools.cache
def get_encoding(name: str) -> tiktoken.Encoding:
    """Vendored file, else tiktoken: its cache dir, else a download attempt (which, offline,
    fails after the OS connect timeout: tiktoken sets none).

    Loading takes ~0.2 s, so call ``preload`` at start-up rather than on a request's path.
    """
    spec = _VENDORED.get(name)
    if spec is not None:
        return _load_vendored(name, spec)
    try:
        return tiktoken.get_encoding(name)
    except Exception as exc:  # unknown name, failed download, hash mismatch, missing blobfile...
        raise EncodingUnavailable(name, f"{type(exc).__name__}: {exc}") from exc


def preload(names: Iterable[str]) -> None:
    """Load every configured encoding up front so a missing one fails start-up, not a request."""
    for name in dict.fromkeys(names):
        get_encoding(name)


CACHED_MIN_CHARS = 4096
"""Texts at least this long have their counts remembered: a conversation resends its whole
history on every turn, and a 50k-token history costs ~7 ms to encode, ~0.1 ms to hash."""
_CACHED_MAX = 4096
_counts: dict[tuple[str, int, int], int] = {}
_counts_lock = threading.Lock()  # long texts are counted in worker threads


def count_text(enc: tiktoken.Encoding, text: str) -> int:
    """Special-token strings in user text are plain text to the upstream, so never an error.

    Long texts are looked up by (encoding, length, hash): Python's string hash is keyed per
    process, so a client cannot craft a collision to under-reserve; only counts are kept, never
    text."""
    if len(text) < CACHED_MIN_CHARS:
        return len(enc.encode_ordinary(text)) if text else 0
    key = (enc.name, len(text), hash(text))
    count = _counts.get(key)
    if count is None:
        count = len(enc.encode_ordinary(text))
        with _counts_lock:
            if len(_counts) >= _CACHED_MAX:
                del _counts[next(iter(_counts))]  # the oldest: insertion order
            _counts[key] = count
    return count


# --- shared helpers: tolerate any JSON shape, count what is countable ---------------------------


def _str(enc: tiktoken.Encoding, value: Any) -> int:
    return count_text(enc, value) if isinstance(value, str) else 0


def _json(enc: tiktoken.Encoding, value: Any) -> int:
    """Estimate for schemas: the upstream renders them in its own (undocumented) format."""
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):
        return 0
    return count_text(enc, text)


def _parts(enc: tiktoken.Encoding, content: Any) -> int:
    """A content field: a string, or a list of typed parts (chat and responses flavours)."""
    if isinstance(content, str):
        return count_text(enc, content)
    if not isinstance(content, list):
        return 0
    total = 0
    for part in content:
        if isinstance(part, str):
            total += count_text(enc, part)
        elif isinstance(part, dict):
            kind = part.get("type")
            if kind in ("image_url", "input_image", "image"):
                total += IMAGE_TOKENS
            elif kind == "refusal":
                total += _str(enc, part.get("refusal"))
            else:  # text, input_text, output_text, summary_text...; audio/file data is not text
                total += _str(enc, part.get("text"))
    return total


def _function_call(enc: tiktoken.Encoding, call: Any) -> int:
    if not isinstance(call, dict):
        return 0
    return _str(enc, call.get("name")) + _str(enc, call.get("arguments"))


def _tool_calls(enc: tiktoken.Encoding, calls: Any) -> int:
    if not isinstance(calls, list):
        return 0
    return sum(_function_call(enc, c.get("function")) for c in calls if isinstance(c, dict))


def _tool_specs(enc: tiktoken.Encoding, tools: Any) -> int:
    """Chat ``tools`` ({type, function: spec}) or responses ``tools`` (flat); JSON estimate."""
    if not isinstance(tools, list):
        return 0
    total = 0
    for tool in tools:
        spec = tool.get("function") if isinstance(tool, dict) else None
        total += _json(enc, spec if isinstance(spec, dict) else tool)
    return total


def _token_ids_or_text(enc: tiktoken.Encoding, value: Any) -> int:
    """str | list[str] | list[int] | list[list[int]]: token ids are already counted."""
    if isinstance(value, str):
        return count_text(enc, value)
    if not isinstance(value, list):
        return 0
    total = 0
    for item in value:
        if isinstance(item, str):
            total += count_text(enc, item)
        elif isinstance(item, int):
            total += 1
        elif isinstance(item, list):
            total += len(item)  # token ids; anything else in there is invalid, and cheap to count
    return total


# --- per endpoint ------------------------------------------------------------------------------


def count_chat_prompt(enc: tiktoken.Encoding, body: dict[str, Any]) -> int:
    """Cookbook rule: matches the API's prompt_tokens for plain text messages (129 with cl100k
    and 124 with o200k on the cookbook example); tools, images and tool calls are estimates."""
    if not isinstance(body, dict):
        return 0
    total = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            total += TOKENS_PER_MESSAGE
            if not isinstance(message, dict):
                continue
            for key, value in message.items():
                if key == "content":
                    total += _parts(enc, value)
                elif key == "tool_calls":
                    total += _tool_calls(enc, value)
                elif key == "function_call":
                    total += _function_call(enc, value)
                elif isinstance(value, str):  # role, name, tool_call_id...
                    total += count_text(enc, value)
                    if key == "name":
                        total += TOKENS_PER_NAME
        total += REPLY_PRIMING_TOKENS
    total += _tool_specs(enc, body.get("tools"))
    functions = body.get("functions")
    if isinstance(functions, list):
        total += sum(_json(enc, spec) for spec in functions)
    return total


def count_completion_prompt(enc: tiktoken.Encoding, body: dict[str, Any]) -> int:
    """Each prompt of a batch is billed, so a list of prompts sums."""
    if not isinstance(body, dict):
        return 0
    return _token_ids_or_text(enc, body.get("prompt")) + _str(enc, body.get("suffix"))


def count_embedding_input(enc: tiktoken.Encoding, body: dict[str, Any]) -> int:
    """Embeddings have no framing: the count is exact."""
    if not isinstance(body, dict):
        return 0
    return _token_ids_or_text(enc, body.get("input"))


def count_responses_input(enc: tiktoken.Encoding, body: dict[str, Any]) -> int:
    """Chat's framing estimate: ``instructions`` as a system message, a string ``input`` as a
    user message. Context held upstream (``previous_response_id``, ``conversation``) is
    invisible here and only appears in the reported usage."""
    if not isinstance(body, dict):
        return 0
    total = 0
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        total += TOKENS_PER_MESSAGE + count_text(enc, "system") + count_text(enc, instructions)
    items = body.get("input")
    if isinstance(items, str):
        total += TOKENS_PER_MESSAGE + count_text(enc, "user") + count_text(enc, items)
    elif isinstance(items, list):
        for item in items:
            if not isinstance(item, dict):
                total += _str(enc, item)
                continue
            kind = item.get("type", "message")
            if kind == "message" or "role" in item:
                total += TOKENS_PER_MESSAGE + _str(enc, item.get("role"))
                total += _parts(enc, item.get("content"))
            elif kind == "function_call":
                total += _function_call(enc, item)
            elif kind in ("function_call_output", "custom_tool_call_output"):
                total += _parts(enc, item.get("output"))
            elif kind == "custom_tool_call":
                total += _str(enc, item.get("name")) + _str(enc, item.get("input"))
            elif kind == "reasoning":
                total += _parts(enc, item.get("summary"))
    total += REPLY_PRIMING_TOKENS
    total += _tool_specs(enc, body.get("tools"))
    return total


_COUNTERS = {
    "chat/completions": count_chat_prompt,
    "completions": count_completion_prompt,
    "embeddings": count_embedding_input,
    "responses": count_responses_input,
}


def _is_large(value: Any, limit: int) -> bool:
    """Whether counting ``value`` costs about as much as encoding ``limit`` characters.

    Weights, measured on o200k: a string costs its length plus ~16 characters' worth of call
    overhead, an array element or object member ~4. Token-id arrays are not descended into (their
    count is ``len``). Every pushed item was paid for by its parent's length, so the walk stops
    after O(limit / 4) items.
    """
    stack = [value]
    size = 0
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            size += 16 + len(item)
        elif isinstance(item, dict):
            size += 4 * len(item)
            if size <= limit:
                stack.extend(item.values())
        elif isinstance(item, list):
            size += 4 * len(item)
            if size <= limit and item and not isinstance(item[0], int):
                stack.extend(item)
        if size > limit:
            return True
    return False


async def count_prompt(enc: tiktoken.Encoding, endpoint: str, body: dict[str, Any]) -> int:
    """Large prompts are encoded in a worker thread (tiktoken releases the GIL) so that a
    50k-token request does not stall every other request on the event loop."""
    try:
        counter = _COUNTERS[endpoint]
    except KeyError:
        raise ValueError(f"no prompt counter for endpoint {endpoint!r}") from None
    if _is_large(body, OFFLOAD_CHARS):
        return await asyncio.to_thread(counter, enc, body)
    return counter(enc, body)
