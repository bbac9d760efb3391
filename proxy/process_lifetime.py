"""Child processes that end with their parent, however the parent ends.

A proxy killed with SIGKILL runs no cleanup: its embedded ``redis-server`` and its workers
would live on, holding the data directory and the port. On Linux the kernel can send a child
a signal when its parent dies (``prctl(PR_SET_PDEATHSIG)``); the child then stops as it does
on any SIGTERM (Redis writes its AOF, a worker drains its requests).

The signal follows the *thread* that created the child, so it is asked for only when that is
the main thread (which lives as long as the process). Elsewhere these are no-ops.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


def preexec_die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen`` (None where it cannot apply)."""
    prctl = _prctl()
    if prctl is None or threading.current_thread() is not threading.main_thread():
        return None
    parent = os.getpid()

    def die_with_parent() -> None:
        # Runs between fork and exec: one system call, nothing that could take a lock.
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    return die_with_parent


def die_with_parent(parent: int) -> None:
    """Called first thing in a child started by ``parent`` (e.g. a spawned worker)."""
    prctl = _prctl()
    if prctl is None:
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)
