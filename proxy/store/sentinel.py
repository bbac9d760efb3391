"""Routing hot-path calls under Redis Sentinel: one pipelined link to the current master.

The sentinels are asked (``SENTINEL get-master-addr-by-name``) for the master's address at the
first call and again whenever a call finds the master gone or read-only (the old master came
back and was turned into a replica). Until the sentinels have agreed on a new master they keep
naming the old one, so calls during a failover fail fast (503, or a deferred settle) instead of
waiting; the first call after it reaches the new master.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio.sentinel import MasterNotFoundError
from redis.exceptions import RedisError, ResponseError

from proxy.store.pipelined import Link, ask_once

log = logging.getLogger(__name__)

Address = tuple[str, int]


class SentinelRouter:
    def __init__(
        self,
        sentinels: Sequence[Address],
        service: str,
        data_link: Callable[[str, int], Link],
        sentinel_link: Callable[[str, int], Link],
    ) -> None:
        self._sentinels = list(sentinels)
        self._service = service
        self._data_link = data_link
        self._sentinel_link = sentinel_link
        self._link: Link | None = None
        self._refreshing: asyncio.Future[None] | None = None

    async def link_for(self, command: tuple[Any, ...]) -> Link:
        if self._link is None:
            await self.refresh(None)
            if self._link is None:
                raise MasterNotFoundError(f"no sentinel names a master for {self._service!r}")
        return self._link

    def link_at(self, host: str, port: int) -> Link:
        raise ResponseError(f"ASK {host}:{port} from a server that is not in a cluster")

    def moved(self, slot: int, host: str, port: int) -> None:
        raise ResponseError(f"MOVED to {host}:{port} from a server that is not in a cluster")

    async def refresh(self, failed: Link | None) -> None:
        """Asks the sentinels again; concurrent callers share one round of questions."""
        if self._refreshing is None:
            self._refreshing = asyncio.ensure_future(self._ask())
        refreshing = self._refreshing
        try:
            await asyncio.shield(refreshing)
        finally:
            if self._refreshing is refreshing and refreshing.done():
                self._refreshing = None

    async def _ask(self) -> None:
        errors = []
        for index, (host, port) in enumerate(self._sentinels):
            try:
                reply = await ask_once(
                    self._sentinel_link(host, port),
                    "SENTINEL",
                    "get-master-addr-by-name",
                    self._service,
                )
            except (RedisError, OSError) as exc:
                errors.append(f"{host}:{port}: {exc}")
                continue
            if not reply:
                errors.append(f"{host}:{port}: does not know {self._service!r}")
                continue
            # The sentinel that answered is asked first next time.
            self._sentinels.insert(0, self._sentinels.pop(index))
            address = (str(reply[0]), int(reply[1]))
            if self._link is None or self._link.address != address:
                if self._link is not None:
                    log.warning(
                        "sentinels name a new master for %s: %s:%d", self._service, *address
                    )
                    self._link.close()
                self._link = self._data_link(*address)
            return
        log.warning("no sentinel answered for %s: %s", self._service, "; ".join(errors))

    def close(self) -> None:
        if self._link is not None:
            self._link.close()
