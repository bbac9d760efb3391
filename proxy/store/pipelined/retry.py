"""Routing, redirection and retry of one call (``PipelinedConnection``): what a restart, a
failover or a resharding throws at a call, as the package's docstring lists it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy.store.pipelined.errors import ConnectionLost
from proxy.store.pipelined.noscript import load_missing_script
from proxy.store.pipelined.router import Router

_SCRIPT_CALLS = ("EVALSHA", "EVAL")
_NOT_RUN = (ReadOnlyError, TryAgainError, ClusterDownError, BusyLoadingError)
"""Errors with which Redis refuses a call without running it."""


class _Attempt:
    __slots__ = ("written",)

    def __init__(self) -> None:
        self.written = False


class PipelinedConnection:
    """The hot path's ``execute(*command)``: routed, redirected and retried as described in
    the package's docstring. ``scripts``: SHA → source, to load a script a node lacks."""

    def __init__(
        self,
        router: Router,
        scripts: Mapping[str, str] | None = None,
        *,
        attempts: int = 3,
        redirects: int = 5,
    ) -> None:
        self._router = router
        self._scripts = scripts or {}
        self._attempts = attempts
        self._redirects = redirects

    async def execute(self, *command: Any) -> Any:
        """The reply; or the error, as ``ConnectionLost(written=True)`` whenever an attempt
        may have run (even if a later one failed before it left): a caller that gives up on
        the call must know whether Redis may still have applied it."""
        attempt = _Attempt()
        try:
            return await self._execute(command, attempt)
        except RedisError as exc:
            if attempt.written and not (isinstance(exc, ConnectionLost) and exc.written):
                raise ConnectionLost(
                    f"{exc} (after an attempt whose reply was lost)", written=True
                ) from exc
            raise

    async def _execute(self, command: tuple[Any, ...], attempt: _Attempt) -> Any:
        link = await self._router.link_for(command)
        asking = False
        failures = redirects = 0
        resent_written = loaded = False
        while True:
            try:
                if asking:
                    return await link.call_asking(*command)
                return await link.call(*command)
            except ConnectionLost as exc:
                if exc.written:
                    attempt.written = True
                    if resent_written:
                        raise
                    resent_written = True
                error: RedisError = exc
            except AskError as exc:  # MOVED too (a subclass)
                moved = isinstance(exc, MovedError)
                if not moved and command[0] in _SCRIPT_CALLS:
                    error = exc  # not followed: see the package's docstring
                else:
                    redirects += 1
                    if redirects > self._redirects:
                        raise
                    host = exc.host or link.host  # Redis 7 may leave out an unknown endpoint
                    if moved:
                        self._router.moved(exc.slot_id, host, exc.port)
                        link, asking = await self._router.link_for(command), False
                    else:
                        link, asking = self._router.link_at(host, exc.port), True
                    continue
            except NoScriptError:
                if loaded or not await load_missing_script(link, command, self._scripts):
                    raise
                loaded = True
                continue
            except _NOT_RUN as exc:
                error = exc
            except RedisConnectionError as exc:  # could not connect
                error = exc
            failures += 1
            if failures >= self._attempts:
                raise error
            await self._router.refresh(link)
            fresh = await self._router.link_for(command)
            if fresh is link and not isinstance(error, ConnectionLost):
                raise error  # nothing changed: the same node would refuse again (fast 503)
            link, asking = fresh, False

    def close(self) -> None:
        self._router.close()
