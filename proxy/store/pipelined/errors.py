"""The errors of a pipelined call, as redis-py's exception classes, so callers handle both
clients alike; plus the two only this client raises."""

from __future__ import annotations

from collections.abc import Callable

from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    MovedError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError


class ConnectionLost(RedisConnectionError):  # type: ignore[misc]
    """The connection died before this call's reply. ``written``: whether the call had left;
    one that had not was never seen by Redis."""

    def __init__(self, message: str, written: bool) -> None:
        super().__init__(message)
        self.written = written


class ReplicaTimeout(RedisError):  # type: ignore[misc]
    """``durability = "replicated"``: too few replicas acknowledged the batch in time, so the
    call's writes may exist on the master alone (and be lost if it fails over)."""


_REPLY_ERRORS: dict[str, Callable[[str, str], ResponseError | RedisError]] = {
    "NOSCRIPT": lambda message, rest: NoScriptError(message),
    "READONLY": lambda message, rest: ReadOnlyError(message),
    "MOVED": lambda message, rest: MovedError(rest),
    "ASK": lambda message, rest: AskError(rest),
    "TRYAGAIN": lambda message, rest: TryAgainError(message),
    "CLUSTERDOWN": lambda message, rest: ClusterDownError(message),
    "MASTERDOWN": lambda message, rest: MasterDownError(message),
    "LOADING": lambda message, rest: BusyLoadingError(message),
}


def reply_error(message: str) -> RedisError:
    """The redis-py exception for an error reply, so callers handle both clients alike."""
    code, _, rest = message.partition(" ")
    make = _REPLY_ERRORS.get(code)
    if make is None:
        return ResponseError(message)
    try:
        return make(message, rest)
    except ValueError:  # a redirection without a readable address
        return ResponseError(message)
