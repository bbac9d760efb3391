"""Watching a freshly spawned ``redis-server`` come up: a free port for it, whether the
server answering is ours, whether it has loaded its data, and the log tails that explain a
failure."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis

log = logging.getLogger("proxy.store.embedded_redis")

HOST = "127.0.0.1"
_TAIL_CHARS = 2000


class RedisStartError(RuntimeError):
    """redis-server did not come up; the message carries its stderr and log tail."""


def free_port() -> int:
    """Return a loopback port that was free a moment ago (the caller must tolerate a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def tail(path: Path, start: int = 0) -> str:
    """Last few KB of a file written since ``start``, for error messages."""
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(start, size - _TAIL_CHARS))
            return fh.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def data_size(data_dir: Path) -> str:
    """The persisted data's size, for the loading message."""
    total = 0
    for path in data_dir.rglob("*"):
        if path.is_file() and (path.name.startswith("appendonly") or path.suffix == ".rdb"):
            with contextlib.suppress(OSError):
                total += path.stat().st_size
    return f"{total / 1e6:.1f} MB"


def wait_loaded(
    client: redis.Redis,
    proc: subprocess.Popen[bytes],
    deadline: float,
    failure: Callable[[str], RedisStartError],
    data_dir: Path,
) -> None:
    """Until Redis has read its data back: it answers LOADING to every command till then."""
    said = False
    started = time.monotonic()
    while True:
        try:
            client.ping()
        except redis.BusyLoadingError:
            pass
        except redis.RedisError:  # between two polls of a loading server: try again
            pass
        else:
            if said:
                log.warning("Redis loaded its data in %.1f s", time.monotonic() - started)
            return
        if not said:
            said = True
            log.warning(
                "waiting for Redis to load its data (%s in %s)…",
                data_size(data_dir),
                data_dir,
            )
        code = proc.poll()
        if code is not None:
            raise failure(f"exited with status {code} while loading its data")
        if time.monotonic() >= deadline:
            raise failure("did not finish loading its data before the timeout")
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.02)


def server_pid(client: redis.Redis) -> int | None:
    """The answering server's pid: an auto-picked port may belong to someone else."""
    try:
        info = client.info("server")
    except redis.RedisError:  # not up yet, still loading the AOF, or not Redis at all
        return None
    return int(info["process_id"])
