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
        self._buffer: list[bytes] = []
        self._lock = asyncio.Lock()

    @property
    def path(self) -> Path | None:
        return Path(self._file.name) if self._file is not None else None

    def _open(self) -> IO[bytes]:
        if self._file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            name = f"settles-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
            handle = (self.directory / name).open("a+b")
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._file = handle
        return self._file

    def _write(self, data: bytes) -> None:
        handle = self._open()
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())

    async def _append(self, line: bytes) -> None:
        """Durable when it returns. Concurrent callers share one write and one fsync."""
        self._buffer.append(line)
        async with self._lock:
            if not self._buffer:
                return  # an earlier holder of the lock wrote this line with its own
            data, self._buffer = b"".join(self._buffer), []
            await asyncio.to_thread(self._write, data)

    async def keep(self, req: SettleRequest) -> None:
        await self._append(_line({"settle": req.to_json()}))

    async def done(self, request_id: str) -> None:
        """Not fsynced: losing a ``done`` line only means a harmless (idempotent) replay."""
        self._buffer.append(_line({"done": request_id}))
        async with self._lock:
            if self._buffer:
                data, self._buffer = b"".join(self._buffer), []
                await asyncio.to_thread(self._write_unsynced, data)

    def _write_unsynced(self, data: bytes) -> None:
        handle = self._open()
        handle.write(data)
        handle.flush()

    async def empty(self) -> None:
        """Nothing pending: start the file afresh so it does not grow with every outage."""
        async with self._lock:
            if self._file is not None and not self._buffer:
                await asyncio.to_thread(self._file.truncate, 0)

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
