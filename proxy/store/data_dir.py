"""One proxy per data directory: an exclusive lock on ``<data_dir>/llm-proxy.lock``.

Two embedded ``redis-server`` processes on one directory would write one append-only file
from two sides. The lock is an ``flock`` on an open file, so the kernel drops it when its
holders are gone, however they ended (even SIGKILL): there is no stale lock to clean up. The
file names its holder (pid and command line) for the error a second process gets.

The embedded ``redis-server`` inherits the locked descriptor, so the directory stays locked
until Redis itself has exited, not just the proxy that started it: after a crash, Redis may
still be writing its last AOF buffer for a moment.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
import time
from pathlib import Path

LOCK_NAME = "llm-proxy.lock"


class DataDirInUse(RuntimeError):
    """Another process holds the data directory; the message names it."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DataDirLock:
    """Held from ``acquire`` until ``release`` (or until every process holding it is gone)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        """Pass it to child processes that must keep the directory locked while they run."""

    @classmethod
    def acquire(cls, data_dir: Path, wait_for_exiting: float = 10.0) -> DataDirLock:
        """Locks ``data_dir`` or raises ``DataDirInUse`` naming the holder.

        When the holder named in the file has exited but the lock is still held, its
        ``redis-server`` is finishing its shutdown: that is waited for, up to
        ``wait_for_exiting`` seconds.
        """
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + wait_for_exiting
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                holder = _read_holder(fd)
                owner = holder.get("pid")
                if isinstance(owner, int) and _alive(owner):
                    raise DataDirInUse(_in_use_message(data_dir, holder))
                if time.monotonic() >= deadline:
                    raise DataDirInUse(_in_use_message(data_dir, holder))
                time.sleep(0.05)
        except BaseException:
            os.close(fd)
            raise
        lock = cls(path, fd)
        lock._write(f"pid={os.getpid()}\ncommand={' '.join(sys.argv)}\n")
        return lock

    def note_child(self, name: str, pid: int) -> None:
        """Records a child that holds the lock too (the embedded redis-server)."""
        with contextlib.suppress(OSError):
            os.lseek(self.fd, 0, os.SEEK_END)
            os.write(self.fd, f"{name}_pid={pid}\n".encode())

    def _write(self, text: str) -> None:
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.write(self.fd, text.encode())

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        os.close(self.fd)  # drops this process's share of the lock
        self.fd = -1


def _read_holder(fd: int) -> dict[str, int | str]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096).decode("utf-8", "replace")
    holder: dict[str, int | str] = {}
    for line in raw.splitlines():
        name, _, value = line.partition("=")
        holder[name] = int(value) if name.endswith("pid") and value.isdigit() else value
    return holder


def _in_use_message(data_dir: Path, holder: dict[str, int | str]) -> str:
    pid = holder.get("pid")
    command = holder.get("command") or "unknown command"
    who = f"pid {pid} ({command})" if pid is not None else "another process"
    redis_pid = holder.get("redis_pid")
    if isinstance(pid, int) and not _alive(pid) and redis_pid is not None:
        who = f"the redis-server (pid {redis_pid}) of {who}, which has exited"
    elif redis_pid is not None:
        who += f", with its redis-server pid {redis_pid}"
    return (
        f"the data directory {data_dir} is in use by {who}. Stop it, or give this process "
        "another directory ([redis] data_dir, or PROXY__REDIS__DATA_DIR)."
    )
