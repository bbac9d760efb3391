"""Routers: which link a call goes to. ``SingleNode`` is the one server of a ``redis://``
URL; the sentinel and cluster routers live with their topologies (``proxy.store.sentinel``,
``proxy.store.cluster``)."""

from __future__ import annotations

from typing import Any, Protocol

from redis.exceptions import ResponseError

from proxy.store.pipelined.link import Link


class Router(Protocol):
    """Which link a call goes to, and what to do when the topology shows it changed."""

    async def link_for(self, command: tuple[Any, ...]) -> Link: ...

    def link_at(self, host: str, port: int) -> Link: ...

    def moved(self, slot: int, host: str, port: int) -> None: ...

    async def refresh(self, failed: Link | None) -> None: ...

    def close(self) -> None: ...


class SingleNode:
    """One server: its link reconnects by itself, there is nothing to look up."""

    def __init__(self, link: Link) -> None:
        self._link = link

    async def link_for(self, command: tuple[Any, ...]) -> Link:
        return self._link

    def link_at(self, host: str, port: int) -> Link:
        raise ResponseError(f"ASK {host}:{port} from a server that is not in a cluster")

    def moved(self, slot: int, host: str, port: int) -> None:
        raise ResponseError(f"MOVED to {host}:{port} from a server that is not in a cluster")

    async def refresh(self, failed: Link | None) -> None:
        return None

    def close(self) -> None:
        self._link.close()
