"""Redis connection, key naming and Lua script loading.

Everything one admission touches carries the org's hash tag (``bp:{o:<org>}:``), so the same
scripts work on one Redis and on a cluster. Only the key-digest index and the org set are
global (they are read before the org is known).
"""

from __future__ import annotations

import hashlib
import re
from importlib import resources
from typing import Any, TypeAlias

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from proxy.config import RedisConfig

ORGS_KEY = "bp:orgs"
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")

Redis: TypeAlias = Any  # redis.asyncio.Redis (decode_responses=True); see pyproject


def valid_id(value: str) -> bool:
    """Ids become part of Redis key names; a narrow alphabet keeps tags and separators intact."""
    return bool(_ID_PATTERN.match(value))


def org_prefix(org_id: str) -> str:
    return f"bp:{{o:{org_id}}}:"


def digest_key(digest: str) -> str:
    return f"bp:kd:{digest}"


def connect(config: RedisConfig, url: str) -> Redis:
    """Short socket timeouts: a dead Redis must turn into a fast 503, not a hung request."""
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=config.socket_timeout,
        socket_connect_timeout=config.socket_connect_timeout,
        retry_on_timeout=False,
        health_check_interval=0,
        max_connections=config.max_connections,
    )


class LuaScript:
    """A script made of ``.lua`` files of the ``proxy`` package (paths relative to it, e.g.
    ``gateway/admit.lua``, each beside the Python that calls it), called by SHA (EVALSHA).

    Files listed first are libraries (local functions) the last one uses; Redis has no
    include, so they are concatenated into one script body.
    """

    def __init__(self, *files: str) -> None:
        package = resources.files("proxy")
        self.source = "\n".join(package.joinpath(name).read_text() for name in files)
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()  # noqa: S324 - Redis's id
        self.name = files[-1].rsplit("/", 1)[-1]

    async def load(self, client: Redis) -> None:
        await client.script_load(self.source)

    async def __call__(self, client: Redis, keys: list[str], args: list[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)
