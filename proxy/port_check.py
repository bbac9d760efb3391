"""A port already taken said in one line before anything starts.

Binding late (after Redis, the mock and the app are up) turned a busy port into a 30-line
traceback, and in ``demo`` into a silent hang; a trial bind first costs one syscall pair and
fails in milliseconds. The real bind can still lose a race, which ``PortInUse`` covers too.
"""

from __future__ import annotations

import errno
import socket


class PortInUse(Exception):
    """The message is the whole diagnosis: the address, and what to do about it."""

    def __init__(self, host: str, port: int, command: str) -> None:
        super().__init__(
            f"port {port} on {host} is already in use (another llm-proxy or program is "
            f"listening there): stop it, or choose another port with `llm-proxy {command} "
            f"--port N`"
        )


def check_port_free(host: str, port: int, command: str) -> None:
    """Raises ``PortInUse`` when ``host:port`` cannot be bound (``SO_REUSEADDR`` as aiohttp
    binds, so a port in TIME_WAIT is not mistaken for a taken one). Port 0 is always free."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror:
        return  # a name that does not resolve: the real bind says so
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUse(host, port, command) from None
                return  # not ours to judge (e.g. an address not on this machine)


def is_port_in_use(exc: BaseException) -> bool:
    """An ``OSError`` from a bind that lost the race after the trial bind."""
    return isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE
