"""Lua scripts called by SHA, and the one way a script that a node lacks gets (re)loaded.

A script is loaded once and called with ``EVALSHA``. A node that does not know it (a promoted
replica, a restarted server, a cluster node that joined later) answers ``NOSCRIPT``; then the
source is loaded and the call made once more. That happens in one of two places, both reading
the same registry: here for redis-py clients, and inside the pipelined hot path
(``proxy.store.pipelined``), which loads on the very link that answered, without a round trip
through redis-py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from redis.exceptions import NoScriptError

if TYPE_CHECKING:
    from proxy.store.client import Redis
    from proxy.store.pipelined import PipelinedConnection

ScriptArg = str | int | float


class LuaScript:
    """One script body (Redis has no include: libraries are concatenated in by its maker)."""

    sources: ClassVar[dict[str, str]] = {}
    """Every script by SHA: the hot path loads one on a node that lacks it."""

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 - Redis's id
        LuaScript.sources[self.sha] = source

    async def load(self, client: Redis) -> None:
        """On a cluster, redis-py sends SCRIPT LOAD to every master."""
        await client.script_load(self.source)

    async def __call__(self, client: Redis, keys: Sequence[str], args: Sequence[ScriptArg]) -> Any:
        return await self.run(client, keys, args)

    async def run(
        self,
        client: Redis,
        keys: Sequence[str],
        args: Sequence[ScriptArg],
        hot: PipelinedConnection | None = None,
    ) -> Any:
        """Through the pipelined hot path when there is one (it reloads a missing script
        itself, from ``sources``), else through redis-py."""
        try:
            if hot is not None:
                return await hot.execute("EVALSHA", self.sha, len(keys), *keys, *args)
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.source)
            if hot is not None:
                return await hot.execute("EVALSHA", self.sha, len(keys), *keys, *args)
            return await client.evalsha(self.sha, len(keys), *keys, *args)
