"""Google's streamed JSON array (``streamGenerateContent`` without ``?alt=sse``): one array
whose elements — objects — arrive one after another, ``[{…}``, ``,\\r\\n{…}``, …, ``]``.

``split`` is a ``StreamFraming.split``: it needs no state between reads, because it reads
depth relative to where it starts (the relay hands it the rest of the last read, which always
starts between elements): outside an element ``[``, ``,``, ``]`` and whitespace are
separators, and an element ends where its braces balance. ``elements`` parses the whole
elements of such a block for the meter.
"""

from __future__ import annotations

import json
import re
from typing import Any

_STRUCTURE = re.compile(rb'[{}\[\]"]')
_IN_STRING = re.compile(rb'["\\]')
_SEPARATORS = " \t\r\n[,]"
_DECODER = json.JSONDecoder()


def split(buffer: bytes) -> tuple[bytes, bytes]:
    """Whole elements (with the separators before them) at the start of ``buffer``, and the
    unfinished rest."""
    depth = 0
    whole = 0
    at = 0
    while True:
        match = _STRUCTURE.search(buffer, at)
        if match is None:
            break
        char = match.group()
        at = match.end()
        if char == b'"':
            while True:  # to the string's closing quote, skipping escapes
                end = _IN_STRING.search(buffer, at)
                if end is None:
                    return buffer[:whole], buffer[whole:]
                at = end.end()
                if end.group() == b"\\":
                    at += 1
                else:
                    break
        elif char in b"{[":
            if depth or char == b"{":  # at depth 0 a '[' is the array's own opening
                depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                whole = at
        else:  # the array's closing ']' between elements
            whole = at
    if depth == 0 and not buffer[whole:].strip(b" \t\r\n,["):
        whole = len(buffer)  # only separators left: nothing is unfinished
    return buffer[:whole], buffer[whole:]


def elements(block: bytes) -> list[Any]:
    """The elements of a block of whole ones (what ``split`` returned)."""
    text = block.decode("utf-8", "replace")
    found: list[Any] = []
    at = 0
    while True:
        while at < len(text) and text[at] in _SEPARATORS:
            at += 1
        if at >= len(text):
            return found
        try:
            element, at = _DECODER.raw_decode(text, at)
        except ValueError:
            return found  # a broken element (a cut stream's last): not counted
        found.append(element)
