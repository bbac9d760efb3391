"""OpenAI's routes beyond the chat family: moderations, metered like embeddings (a prompt,
no output), and the routes this proxy cannot meter yet, which it refuses in OpenAI's shape.

A route the proxy does not serve must never answer a bare 404: the SDKs read that as "not
found", and an application then points a second client straight at the provider, outside
every budget. Each route of OpenAI's SDK the proxy does not meter yet is declared in
``UNMETERED`` and answered ``unmetered_refusal`` (403, ``route_not_metered``), whatever its body:
a refusal reads nothing, so a multi-gigabyte upload costs nothing either.
"""

from __future__ import annotations

from typing import Any

from proxy.errors import ApiError, bad_request

MODERATION_TEXTS_MAX = 32_768
"""Inputs one moderation request may carry (OpenAI accepts far fewer): a bound, so a hostile
array cannot make counting it the expensive part."""

UNMETERED_FAMILIES = (
    "files",
    "uploads",
    "batches",
    "realtime",
    "fine_tuning",
    "vector_stores",
    "assistants",
    "threads",
    "containers",
    "conversations",
    "evals",
    "videos",
    "chatkit",
)
"""APIs of OpenAI's SDK the proxy does not meter yet: each path under them is refused."""
UNMETERED: tuple[tuple[str, str], ...] = (
    ("POST", "responses/input_tokens"),
    *(
        (method, family + "{tail:[\\s\\S]*}")
        for family in UNMETERED_FAMILIES
        for method in ("GET", "POST", "DELETE")
    ),
)
"""(method, path under each OpenAI prefix) of the routes refused until they are metered."""


def unmetered_refusal(method: str, path: str) -> ApiError:
    """The answer of a route in ``UNMETERED``: why, and that nothing was forwarded."""
    return ApiError(
        403,
        f"{method} {path} is not metered by this proxy yet, so it is refused rather than "
        "forwarded outside your budgets; nothing was sent upstream.",
        type="permission_error",
        code="route_not_metered",
    )


def background_refusal() -> ApiError:
    """``background: true`` answers at once (``queued``) and generates afterwards: settled at
    that first answer, the generation itself would never be charged."""
    return ApiError(
        400,
        "Background responses ('background': true) are not metered by this proxy yet: send the "
        "request without it (streamed if it is long).",
        param="background",
        code="background_not_metered",
    )


def moderation_texts(body: dict[str, Any]) -> list[str]:
    """The texts a moderation request carries (``input``: a string, strings, or multi-modal
    parts whose text parts count; images are priced by no moderation model)."""
    value = body.get("input")
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise bad_request(
            "'input' must be a string or a non-empty array of strings or input parts.",
            param="input",
        )
    if len(value) > MODERATION_TEXTS_MAX:
        raise bad_request(
            f"'input' may hold at most {MODERATION_TEXTS_MAX} items.", param="input"
        )
    texts: list[str] = []
    for item in value:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and item.get("type") == "text":
            text = item.get("text")
            if not isinstance(text, str):
                raise bad_request("A text part of 'input' must have a string 'text'.", "input")
            texts.append(text)
        elif not (isinstance(item, dict) and item.get("type") == "image_url"):
            raise bad_request(
                "Each item of 'input' must be a string, a text part or an image_url part.",
                param="input",
            )
    return texts
