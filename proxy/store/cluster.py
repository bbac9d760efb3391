"""Routing hot-path calls on a Redis Cluster: one pipelined link per master, chosen by slot.

Every key an admission touches carries its org's hash tag, so a script call has one slot — that
of its first key (``KEYS[1]``, the org prefix ``bp:{o:<org>}:``). The slot → master map comes
from ``CLUSTER SLOTS``, asked of any node that answers (known masters first, then the URL's
seed nodes). It is read again when a call finds its master gone, when a node answers
``CLUSTERDOWN``/``TRYAGAIN``, and in the background after a ``MOVED`` (which patches the one
slot at once): a failover moves every slot of a shard, a resharding many.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import ClusterDownError, RedisError

from proxy.store.pipelined import Link, ask_once

log = logging.getLogger(__name__)

Address = tuple[str, int]
_MIN_REFRESH_INTERVAL = 0.05
"""Calls failing together share a refresh; one that fails after it must not start another at
once (a dead master keeps failing until the cluster has promoted its replica)."""


def command_key(command: tuple[Any, ...]) -> str:
    """The key that decides a command's slot: the first key of a script call."""
    name = str(command[0]).upper()
    if name in ("EVALSHA", "EVAL"):
        return str(command[3])
    return str(command[1])


class ClusterRouter:
    def __init__(
        self,
        seeds: Sequence[Address],
        data_link: Callable[[str, int], Link],
        control_link: Callable[[str, int], Link],
    ) -> None:
        self._seeds = list(seeds)
        self._data_link = data_link
        self._control_link = control_link
        self._slots: list[Link | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        self._links: dict[Address, Link] = {}
        self._slot_of: dict[str, int] = {}
        self._refreshing: asyncio.Future[None] | None = None
        self._refreshed_at = float("-inf")
        self._background: set[asyncio.Future[None]] = set()

    def slot(self, key: str) -> int:
        slot = self._slot_of.get(key)
        if slot is None:
            if len(self._slot_of) > 100_000:  # one entry per org; bounded all the same
                self._slot_of.clear()
            slot = self._slot_of[key] = key_slot(key.encode())
        return slot

    async def link_for(self, command: tuple[Any, ...]) -> Link:
        slot = self.slot(command_key(command))
        link = self._slots[slot]
        if link is None:
            await self.refresh(None)
            link = self._slots[slot]
            if link is None:
                raise ClusterDownError(f"CLUSTERDOWN no master serves slot {slot}")
        return link

    def _link(self, host: str, port: int) -> Link:
        link = self._links.get((host, port))
        if link is None:
            link = self._links[(host, port)] = self._data_link(host, port)
        return link

    def link_at(self, host: str, port: int) -> Link:
        return self._link(host, port)

    def moved(self, slot: int, host: str, port: int) -> None:
        self._slots[slot] = self._link(host, port)
        if self._refreshing is None:
            task = asyncio.ensure_future(self.refresh(None))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def refresh(self, failed: Link | None) -> None:
        """Reads the slot map again; concurrent callers share one reading."""
        if self._refreshing is not None:
            await asyncio.shield(self._refreshing)
            return
        if failed is not None and time.monotonic() - self._refreshed_at < _MIN_REFRESH_INTERVAL:
            return
        self._refreshing = asyncio.ensure_future(self._read_slots(failed))
        try:
            await asyncio.shield(self._refreshing)
        finally:
            self._refreshing = None
            self._refreshed_at = time.monotonic()

    async def _read_slots(self, failed: Link | None) -> None:
        masters = list(dict.fromkeys(link.address for link in self._slots if link is not None))
        candidates = list(dict.fromkeys([*masters, *self._seeds]))
        if failed is not None and failed.address in candidates:
            candidates.remove(failed.address)
            candidates.append(failed.address)  # asked last: it is probably the one down
        errors = []
        for host, port in candidates:
            try:
                reply = await ask_once(self._control_link(host, port), "CLUSTER", "SLOTS")
            except (RedisError, OSError) as exc:
                errors.append(f"{host}:{port}: {exc}")
                continue
            if reply:
                self._install(reply, host)
                return
            errors.append(f"{host}:{port}: no slots")
        log.warning("cluster slot map not refreshed: %s", "; ".join(errors) or "no nodes")

    def _install(self, reply: list[Any], asked_host: str) -> None:
        slots: list[Link | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        for entry in reply:
            start, end, master = int(entry[0]), int(entry[1]), entry[2]
            host = str(master[0]) or asked_host  # empty: the node does not know its own name
            link = self._link(host, int(master[1]))
            for slot in range(start, end + 1):
                slots[slot] = link
        self._slots = slots
        serving = {link.address for link in slots if link is not None}
        for address in [a for a in self._links if a not in serving]:
            self._links.pop(address).close()

    def close(self) -> None:
        for link in self._links.values():
            link.close()
        self._links.clear()
        for task in self._background:
            task.cancel()
