"""A private ``redis-server`` child process.

Used by the proxy when no Redis URL is configured (so a bare ``pip install`` gives a working
gateway) and by the test suite to get a real Redis without external services.

``start()`` returns once Redis has loaded its data (a restarted Redis answers ``LOADING`` to
everything until its AOF is read back), saying so when that takes a moment. On Linux the child
gets SIGTERM when the process that started it dies, however it died (``PR_SET_PDEATHSIG``), so
a killed proxy leaves no Redis behind on its data directory.

Finding the binary is ``redis_binary``; watching a spawned server come up is ``redis_probe``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from proxy.process_lifetime import preexec_die_with_parent
from proxy.store.redis_binary import RedisServerNotFound, find_redis_server
from proxy.store.redis_probe import (
    HOST,
    RedisStartError,
    free_port,
    server_pid,
    tail,
    wait_loaded,
)

__all__ = [
    "EmbeddedRedis",
    "RedisServerNotFound",
    "RedisStartError",
    "find_redis_server",
    "free_port",
]

_LOG_NAME = "redis.log"
# redis-server writes here only before it has opened its logfile (e.g. a bad argument).
_STDERR_NAME = "redis.stderr"
# An auto-picked port can be grabbed by someone else between free_port() and the bind.
_AUTO_PORT_ATTEMPTS = 3


class EmbeddedRedis:
    """A redis-server child bound to 127.0.0.1, with its data and log in ``data_dir``.

    ``port=0`` picks a free port on the first start; later starts (``restart`` or ``start``
    after ``kill``) reuse it so clients holding the URL can reconnect.
    """

    def __init__(
        self,
        data_dir: str | Path,
        port: int = 0,
        *,
        persist: bool = True,
        binary: str | None = None,
        extra_args: Sequence[str] = (),
        config_file: str | Path | None = None,
        keep_fds: tuple[int, ...] = (),
    ) -> None:
        """``extra_args`` and ``config_file`` (first on the command line, e.g. a sentinel's
        rewritable config) let the test harness start replicas, cluster nodes and sentinels."""
        self.data_dir = Path(data_dir).absolute()
        self.persist = persist
        self._binary = binary
        self._extra_args = tuple(extra_args)
        self._config_file = config_file
        self._keep_fds = keep_fds
        """Descriptors the child inherits (the data directory's lock, held while it runs)."""
        self._port = port
        # Only an auto-picked port that has never served may be swapped after a bind clash.
        self._port_pinned = port != 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._lock = threading.RLock()

    @property
    def port(self) -> int:
        """The TCP port; 0 until the first ``start`` when auto-picking."""
        return self._port

    @property
    def url(self) -> str:
        if self._port == 0:
            raise RuntimeError("EmbeddedRedis port is not assigned until start()")
        return f"redis://{HOST}:{self._port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def log_path(self) -> Path:
        return self.data_dir / _LOG_NAME

    def _command(self, binary: str) -> list[str]:
        cmd = [binary, *([str(self._config_file)] if self._config_file else [])]
        cmd += [
            "--port", str(self._port),
            "--bind", HOST,
            "--protected-mode", "yes",
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--logfile", str(self.log_path),
            "--save", "",
        ]  # fmt: skip
        if self.persist:
            cmd += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            cmd += ["--appendonly", "no"]
        return cmd + list(self._extra_args)

    def start(self, timeout: float = 10.0) -> None:
        """Spawn redis-server and return once it answers, its data loaded; a no-op if already
        running. ``timeout`` bounds the whole start, loading included."""
        with self._lock:
            if self.running:
                return
            self._reap()
            binary = self._binary or find_redis_server()
            self.data_dir.mkdir(parents=True, exist_ok=True)
            deadline = time.monotonic() + timeout
            attempts = 1 if self._port_pinned else _AUTO_PORT_ATTEMPTS
            for attempt in range(attempts):
                if not self._port_pinned:
                    self._port = free_port()
                try:
                    self._spawn_and_wait(binary, deadline)
                except RedisStartError:
                    self._terminate(timeout=1.0)
                    if attempt + 1 >= attempts or time.monotonic() >= deadline:
                        raise
                    continue
                self._port_pinned = True
                atexit.register(self._atexit_stop)
                return

    def _spawn_and_wait(self, binary: str, deadline: float) -> None:
        cmd = self._command(binary)
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        stderr_path = self.data_dir / _STDERR_NAME
        self._stderr = stderr_path.open("wb")
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._stderr,
                stderr=subprocess.STDOUT,
                close_fds=True,
                pass_fds=self._keep_fds,
                # Own session: a terminal's Ctrl-C must not stop Redis before the proxy has
                # settled its in-flight requests (the proxy stops it last, or at exit).
                start_new_session=True,
                preexec_fn=preexec_die_with_parent(),
            )
        except OSError as exc:
            self._close_stderr()
            raise RedisStartError(f"could not execute {binary!r}: {exc}") from exc

        def failure(reason: str) -> RedisStartError:
            parts = [f"redis-server on port {self._port} {reason}", "command: " + shlex.join(cmd)]
            err = tail(stderr_path)
            if err:
                parts.append(f"stderr:\n{err}")
            log = tail(self.log_path, log_offset)
            if log:
                parts.append(f"log ({self.log_path}):\n{log}")
            return RedisStartError("\n".join(parts))

        proc = self._proc
        client: redis.Redis = redis.Redis(
            host=HOST,
            port=self._port,
            # Short and retry-free: a failed probe just means another poll round, and a
            # non-Redis squatter on the port must not stall us past the child's exit.
            socket_connect_timeout=0.25,
            socket_timeout=0.25,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            while True:
                code = proc.poll()
                if code is not None:
                    raise failure(f"exited with status {code}")
                pid = server_pid(client)
                if pid == proc.pid:
                    wait_loaded(client, proc, deadline, failure, self.data_dir)
                    return
                if pid is not None:
                    # A stranger owns the port; ours will fail to bind and exit.
                    raise failure(f"is taken by another Redis (pid {pid})")
                if time.monotonic() >= deadline:
                    raise failure("did not answer before the timeout")
                # Doubles as the poll interval and wakes early if the server dies.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.02)
        finally:
            client.close()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis fsyncs its AOF on the way out), SIGKILL if it hangs; idempotent."""
        with self._lock:
            self._terminate(timeout)

    def _terminate(self, timeout: float) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._reap()

    def kill(self) -> None:
        """SIGKILL immediately, as if Redis crashed; the port stays reserved for ``start``."""
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            self._reap()

    def restart(self) -> None:
        """Stop and start again on the same port and data dir."""
        with self._lock:
            self.stop()
            self.start()

    def _reap(self) -> None:
        self._proc = None
        self._close_stderr()
        atexit.unregister(self._atexit_stop)

    def _close_stderr(self) -> None:
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def _atexit_stop(self) -> None:
        """Keep an embedded server from outliving the interpreter on a normal exit."""
        with contextlib.suppress(Exception):
            self.stop(timeout=5.0)

    async def astart(self) -> None:
        """``start`` off the event loop: it blocks on process spawn and polling."""
        await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        """``stop`` off the event loop: it blocks waiting for the AOF fsync and exit."""
        await asyncio.to_thread(self.stop)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<EmbeddedRedis {HOST}:{self._port} {state} dir={self.data_dir}>"
