"""Settles that could not be written to Redis, kept on disk until they are.

A settle carries usage the upstream already produced: losing it would under-charge. So a
settle that fails is first appended to this process's spool file and fsynced, and only then
retried in memory; if the process stops (or dies) before Redis takes it, the next process to
look at the spool directory — a sibling worker, another proxy on the host, or the next start —
adopts the file and replays it. Replaying twice is harmless: settle is idempotent by request id.

Format: one JSON object per line, ``{"settle": {...}}`` when deferred and ``{"done": rid}``
when written; a file whose owner is alive is locked (``flock``), so only orphans are adopted.
Items that keep failing for a reason other than Redis being away are moved to
``quarantine.jsonl`` in the same directory: kept for an operator, never blocking the rest.

A spool that cannot hold a settle (a full disk, a read-only mount) must be noticed before it is
needed: ``check()`` writes, fsyncs and removes a probe at start-up (the proxy refuses to start
without it) and ``/readyz`` asks again while an append has failed. An append shares one write
and one fsync among the settles waiting for it, so when that write fails every one of them is
told (``SpoolWriteError``), never only the caller that happened to do the write.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import secrets
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

QUARANTINE_NAME = "quarantine.jsonl"
_PATTERN = "settles-*.jsonl"
_PROBE = b'{"probe":"' + b"x" * 512 + b'"}\n'
"""About the size of one settle line: a disk with less room than this cannot hold one."""


class SpoolUnwritable(OSError):
    """The spool directory cannot durably hold a settle; the message says where and why."""


class SpoolWriteError(OSError):
    """A shared append failed: the settles it carried are not on disk."""


class _Batch:
    """Lines waiting for one shared write; each waiter learns that write's result."""

    __slots__ = ("error", "lines", "sync", "written")

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.sync = False
        self.written = False
        self.error: OSError | None = None


@dataclass(slots=True)
class SettleRequest:
    org_id: str
    request_id: str
    key_id: str
    tokens: int
    cost_nano: int
    at: float
    """When the request ended: its spend belongs to the windows of this moment, even when the
    settle is replayed later."""
    usage_record: list[str | int]
    """Field/value pairs of the usage stream entry."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SettleRequest:
        return cls(**data)


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _read(handle: IO[bytes]) -> list[SettleRequest]:
    """The file's settles not marked done; a torn last line (a crash mid-write) is skipped."""
    handle.seek(0)
    pending: dict[str, SettleRequest] = {}
    for raw in handle.read().splitlines():
        try:
            entry = json.loads(raw)
            if "settle" in entry:
                req = SettleRequest.from_json(entry["settle"])
                pending[req.request_id] = req
            elif "done" in entry:
                pending.pop(entry["done"], None)
        except (ValueError, TypeError, KeyError):
            log.warning("settle spool: skipped an unreadable line")
    return list(pending.values())


class SettleSpool:
    """This process's spool file (opened and locked on first use) and its orphans' adoption."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._file: IO[bytes] | None = None
        self._batch: _Batch | None = None
        self._lock = asyncio.Lock()
        self.failing: OSError | None = None
        """The last append's failure, until an append (or a ``check()``) succeeds again."""

    @property
    def path(self) -> Path | None:
        return Path(self._file.name) if self._file is not None else None

    def _open(self) -> IO[bytes]:
        if self._file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            name = f"settles-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
            handle = (self.directory / name).open("a+b", buffering=0)
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._file = handle
        return self._file

    def _write(self, data: bytes, sync: bool) -> None:
        """Unbuffered, so a failed write leaves nothing behind in memory to reach the file
        later; a short or failed write is cut back to the last whole line."""
        fd = self._open().fileno()
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if sync:
                os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise

    async def _append(self, line: bytes, sync: bool) -> None:
        """Durable (when ``sync``) once it returns; raises ``SpoolWriteError`` when the shared
        write that carried this line failed. Concurrent callers share one write and fsync."""
        batch = self._batch
        if batch is None:
            batch = self._batch = _Batch()
        batch.lines.append(line)
        batch.sync = batch.sync or sync
        async with self._lock:
            if not batch.written:
                if self._batch is batch:
                    self._batch = None
                batch.written = True
                try:
                    await asyncio.to_thread(self._write, b"".join(batch.lines), batch.sync)
                except OSError as exc:
                    batch.error = exc
                    self.failing = exc
                else:
                    self.failing = None
        if batch.error is not None:
            raise SpoolWriteError(
                batch.error.errno,
                f"cannot append to the settle spool {self.path or self.directory}: "
                f"{batch.error.strerror or batch.error}",
            ) from batch.error

    async def keep(self, req: SettleRequest) -> None:
        await self._append(_line({"settle": req.to_json()}), sync=True)

    async def done(self, request_id: str) -> None:
        """Not fsynced: losing a ``done`` line only means a harmless (idempotent) replay."""
        with contextlib.suppress(SpoolWriteError):
            await self._append(_line({"done": request_id}), sync=False)

    async def empty(self) -> None:
        """Nothing pending: start the file afresh so it does not grow with every outage."""
        async with self._lock:
            if self._file is not None and self._batch is None:
                await asyncio.to_thread(self._file.truncate, 0)

    def check(self) -> None:
        """Raises ``SpoolUnwritable`` unless the directory takes a settle-sized line durably:
        created if missing, a probe file written, fsynced and removed (blocking: run it in a
        thread once the loop runs)."""
        probe = self.directory / f".probe-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            try:
                with probe.open("wb") as handle:
                    handle.write(_PROBE)
                    handle.flush()
                    os.fsync(handle.fileno())
            finally:
                with contextlib.suppress(OSError):
                    probe.unlink()
        except OSError as exc:
            raise SpoolUnwritable(
                exc.errno,
                f"the settle spool directory {self.directory} cannot hold a settle "
                f"({exc.strerror or exc}); free space or fix its permissions, or set "
                "[limits] spool_dir",
            ) from exc
        self.failing = None

    async def quarantine(self, req: SettleRequest, reason: str) -> Path:
        path = self.directory / QUARANTINE_NAME

        def write() -> None:
            self.directory.mkdir(parents=True, exist_ok=True)
            with path.open("ab") as handle:
                handle.write(_line({"settle": req.to_json(), "reason": reason}))
                handle.flush()
                os.fsync(handle.fileno())

        await asyncio.to_thread(write)
        await self.done(req.request_id)
        return path

    def _lock_orphans(self) -> list[tuple[Path, IO[bytes], list[SettleRequest]]]:
        """Spool files whose owner is gone, each returned open and locked by us."""
        if not self.directory.is_dir():
            return []
        found: list[tuple[Path, IO[bytes], list[SettleRequest]]] = []
        mine = self.path
        for path in sorted(self.directory.glob(_PATTERN)):
            if path == mine:
                continue
            try:
                handle = path.open("r+b")
            except OSError:
                continue
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()  # its owner is alive
                continue
            found.append((path, handle, _read(handle)))
        return found

    async def adopt(self) -> list[SettleRequest]:
        """Takes over every orphan: its pending settles are written to this process's own
        spool (fsynced) before the orphan is deleted, so at no moment do they exist nowhere on
        disk; the orphan stays locked until then, so no one else adopts it too."""
        adopted: list[SettleRequest] = []
        for path, handle, reqs in await asyncio.to_thread(self._lock_orphans):
            try:
                for req in reqs:
                    await self.keep(req)
                with contextlib.suppress(OSError):
                    path.unlink()
            finally:
                handle.close()
            if reqs:
                log.warning(
                    "settle spool: adopted %d pending settle(s) from %s", len(reqs), path.name
                )
            adopted.extend(reqs)
        return adopted

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
