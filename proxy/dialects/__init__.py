"""The wire dialects clients speak to the proxy: one module each, registered here.

A dialect (``base.Dialect``) owns everything specific to its API — its routes, where the key
is, parsing and the worst case, the upstream body, usage (buffered and streamed), stream
ends, its error shape and its rate-limit header names. The gateway serves every dialect of
``DIALECTS`` with the one request path; adding one is a new module and a line here.
"""

from __future__ import annotations

from proxy.dialects.anthropic import ANTHROPIC
from proxy.dialects.base import Dialect
from proxy.dialects.bedrock import BEDROCK
from proxy.dialects.gemini import GEMINI
from proxy.dialects.openai import OPENAI

DIALECTS: tuple[Dialect, ...] = (OPENAI, ANTHROPIC, BEDROCK, GEMINI)
DEFAULT: Dialect = OPENAI
"""The shape of every error no dialect claims by path: OpenAI's, the proxy's own."""

_BY_NAME: dict[str, Dialect] = {dialect.name: dialect for dialect in DIALECTS}
_BY_PREFIX = tuple((prefix, dialect) for dialect in DIALECTS for prefix in dialect.error_prefixes)
_ERROR_PREFIXES = tuple(dict.fromkeys(prefix for prefix, _ in _BY_PREFIX))
"""Each once (Vertex's ``/v1/projects/`` is claimed by two dialects): the one test every
request's path gets."""


def by_name(name: str) -> Dialect:
    """The dialect of that name (``DialectName``: a model route's, a config's)."""
    return _BY_NAME[name]


def for_path(path: str) -> Dialect:
    """The dialect whose shape a path's errors take: the one claiming its prefix (and the
    path, where dialects share a prefix), else the default (one ``startswith`` for the
    default's paths)."""
    if path.startswith(_ERROR_PREFIXES):
        for prefix, dialect in _BY_PREFIX:
            if path.startswith(prefix) and dialect.claims(path):
                return dialect
    return DEFAULT


__all__ = [
    "ANTHROPIC",
    "BEDROCK",
    "DEFAULT",
    "DIALECTS",
    "GEMINI",
    "OPENAI",
    "Dialect",
    "by_name",
    "for_path",
]
