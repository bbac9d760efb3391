"""The mock's generated text: the words of ``WORDS`` in order, repeating. Each one has a
leading space and is exactly one token in tiktoken's ``cl100k_base`` and ``o200k_base``, so
tokenizing the text gives exactly the visible completion tokens."""

from __future__ import annotations

import itertools
import json
from typing import Any

WORDS: tuple[str, ...] = (
    " the", " of", " and", " to", " in", " is", " it", " that",
    " for", " on", " with", " as", " was", " at", " by", " be",
    " this", " from", " are", " or", " an", " not", " have", " but",
    " they", " we", " you", " all", " one", " can", " had", " more",
)  # fmt: skip
"""Each word is one token in cl100k_base and o200k_base (checked by the tests)."""

_CYCLE = "".join(WORDS)
_CYCLE_OFFSETS = tuple(itertools.accumulate((len(w) for w in WORDS), initial=0))
_WORDS_JSON = tuple(json.dumps(w) for w in WORDS)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def words_text(words: int) -> str:
    laps, rest = divmod(words, len(WORDS))
    return _CYCLE * laps + _CYCLE[: _CYCLE_OFFSETS[rest]]


def word_count(value: Any) -> int:
    return len(value.split()) if isinstance(value, str) else 0


def visible_words_json(count: int) -> list[str]:
    laps, rest = divmod(count, len(_WORDS_JSON))
    return list(_WORDS_JSON) * laps + list(_WORDS_JSON[:rest])
