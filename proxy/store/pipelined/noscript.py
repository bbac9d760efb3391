"""NOSCRIPT on the pipelined path: a node that lacks a script (a promoted replica never
loaded it, or a restarted server lost its script cache) gets it loaded, on that very node, so
the call can be sent again. Kept apart so the store has one place that answers NOSCRIPT."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.store.pipelined.link import Link


async def load_missing_script(
    link: Link, command: tuple[Any, ...], scripts: Mapping[str, str]
) -> bool:
    """Loads the script an ``EVALSHA`` named on ``link``'s node; False when its source is
    unknown (the caller then raises the NOSCRIPT error as it came)."""
    source = scripts.get(command[1]) if command[0] == "EVALSHA" else None
    if source is None:
        return False
    await link.call("SCRIPT", "LOAD", source)
    return True
