"""A Bedrock request's worst case, without the models' tokenizers: the model id's shape, the
output cap (Converse's ``inferenceConfig.maxTokens`` or the model family's own field of an
InvokeModel body), and a bound on the prompt.

The prompt bound rests on what ``proxy.dialects.claude_bound`` states for Claude and holds for
the byte-level tokenizers of the other families Bedrock serves: a token is at least one byte
of UTF-8. Text counts its bytes; JSON structure (tool schemas and inputs, a whole body of a
family without messages) its compact bytes plus markup per member; framing per message and
block; an image ``IMAGE_MAX`` tokens (never 0); a document or video has no local bound, so
the context window bounds the request. Anthropic bodies sent to InvokeModel use Claude's own
bound (``claude_bound.prompt_bound``).
"""

from __future__ import annotations

import re
from typing import Any

from proxy.dialects.base import MAX_OUTPUT_CAP
from proxy.dialects.claude_bound import (
    BLOCK_FRAMING,
    IMAGE_MAX,
    MESSAGE_FRAMING,
    REQUEST_FRAMING,
    TOOL_PROMPT,
    Unbounded,
    prompt_bound,
    structure,
)
from proxy.errors import bad_request

MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+@-]{0,2047}")
"""Model ids, inference-profile ids and ARNs (what Bedrock's own pattern admits, loosely)."""
_REGION_PREFIXES = ("us.", "eu.", "apac.", "global.", "jp.", "au.", "ca.", "us-gov.")
CAP_FIELDS: dict[str, tuple[str, ...]] = {
    "anthropic": ("max_tokens",),
    "meta": ("max_gen_len",),
    "mistral": ("max_tokens",),
    "amazon.nova": ("inferenceConfig", "max_new_tokens"),
    "amazon.titan": ("textGenerationConfig", "maxTokenCount"),
    "cohere": ("max_tokens",),
    "ai21": ("max_tokens",),
    "deepseek": ("max_tokens",),
    "openai": ("max_completion_tokens",),
    "qwen": ("max_tokens",),
}
"""The output cap of an InvokeModel body, by model family (the id's provider part; Amazon's
by model line). A family not listed has no known cap field: its model's
``max_output_tokens`` is reserved and the body passes unchanged."""


def model_id(value: str | None) -> str:
    if value is None or not MODEL_ID.fullmatch(value):
        raise bad_request(
            "The modelId in the path is not a model id, inference profile id or ARN.",
            param="modelId",
        )
    return value


def family(model: str) -> str:
    """``meta``, ``amazon.nova``, ``anthropic``...: an ARN's resource, its region prefix off."""
    name = model.rpartition("/")[2]
    for prefix in _REGION_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    provider, _, rest = name.partition(".")
    if provider == "amazon":
        return f"amazon.{rest.partition('-')[0]}"
    return provider


def _cap(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_OUTPUT_CAP:
        raise bad_request(
            f"'{name}' must be a positive integer no greater than {MAX_OUTPUT_CAP}.", param=name
        )
    return value


def output_cap(path: tuple[str, ...], body: dict[str, Any]) -> int | None:
    """The cap the body sets at ``path``, None when it sets none; a malformed one is a 400."""
    node: Any = body
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if node is not None and not isinstance(node, dict):
        raise bad_request(f"'{path[0]}' must be an object.", param=path[0])
    value = node.get(path[-1]) if node is not None else None
    return None if value is None else _cap(value, ".".join(path))


def with_cap(body: dict[str, Any], path: tuple[str, ...], cap: int) -> dict[str, Any]:
    """A copy of the body with the cap at ``path`` (objects on the way copied, not shared)."""
    top = dict(body)
    node = top
    for part in path[:-1]:
        inner = node.get(part)
        node[part] = dict(inner) if isinstance(inner, dict) else {}
        node = node[part]
    node[path[-1]] = cap
    return top


def _content(block: Any) -> int:
    if not isinstance(block, dict):
        return BLOCK_FRAMING + structure(block)
    text = block.get("text")
    if isinstance(text, str) and len(block) == 1:
        return BLOCK_FRAMING + len(text.encode("utf-8", "surrogatepass"))
    if "image" in block:
        return BLOCK_FRAMING + IMAGE_MAX
    if "document" in block or "video" in block:
        raise Unbounded
    result = block.get("toolResult")
    if isinstance(result, dict) and isinstance(result.get("content"), list):
        rest = {k: v for k, v in result.items() if k != "content"}
        return BLOCK_FRAMING + structure(rest) + sum(_content(c) for c in result["content"])
    return BLOCK_FRAMING + structure(block)


def _blocks(value: Any, param: str) -> int:
    if value is None:
        return 0
    if not isinstance(value, list):
        raise bad_request(f"'{param}' must be an array.", param=param)
    return sum(_content(block) for block in value)


def converse_bound(body: dict[str, Any], context_window: int) -> int:
    """Converse's ``system``, ``messages`` and ``toolConfig`` (and a Nova InvokeModel body,
    which has the same blocks); anything else of the body counts as structure."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise bad_request("'messages' must be an array.", param="messages")
    try:
        total = REQUEST_FRAMING + _blocks(body.get("system"), "system")
        for message in messages:
            if not isinstance(message, dict):
                raise bad_request("Each message must be an object.", param="messages")
            total += MESSAGE_FRAMING + _blocks(message.get("content"), "messages.content")
        if body.get("toolConfig") is not None:
            total += TOOL_PROMPT + structure(body["toolConfig"])
        for name in ("promptVariables", "additionalModelRequestFields"):
            if body.get(name) is not None:
                total += structure(body[name])
    except Unbounded:
        return context_window
    return min(total, context_window)


def invoke_bound(body: dict[str, Any], model: str, context_window: int) -> int:
    if family(model) == "anthropic" or "anthropic_version" in body:
        return prompt_bound(body, context_window)
    if family(model) == "amazon.nova":  # Converse's blocks in its own body
        return converse_bound(body, context_window)
    return min(REQUEST_FRAMING + structure(body), context_window)
