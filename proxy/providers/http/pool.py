"""The connection pool and the one call the upstream hop makes: POST a body, get the answer's
head, read the body as it arrives.

Idle connections older than ``keepalive`` are not reused: the upstream may have closed them
already, and a POST is never sent twice (no retries here: an LLM call is not idempotent)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable

from proxy.providers.http.connection import Connection
from proxy.providers.http.errors import UpstreamConnectError, UpstreamConnectTimeout
from proxy.providers.http.models import Origin, Target, Timeouts
from proxy.providers.http.response import Response

_IDLE_PER_HOST = 256


class Client:
    """The connection pool: idle connections per origin, busy ones tracked for ``close``."""

    def __init__(
        self,
        timeouts: Timeouts,
        keepalive: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._timeouts = timeouts
        self._keepalive = keepalive
        self._idle: dict[Origin, list[Connection]] = {}
        self._busy: set[Connection] = set()
        self._ssl = ssl_context
        """Verifies https upstreams; the system's CAs (and ``SSL_CERT_FILE``) by default."""

    async def post(
        self,
        target: Target,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        method: str = "POST",
    ) -> Response:
        """Sends the request in one write and returns once the answer's head has arrived
        (``method``: GET and DELETE read and delete what an upstream stored)."""
        connection = self._idle_connection(target.origin) or await self._connect(target.origin)
        self._busy.add(connection)
        lines = [f"{method} {target.path} HTTP/1.1\r\nHost: {target.origin.host_header}\r\n"]
        for name, value in headers:
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                continue  # never let a header split the request
            lines.append(f"{name}: {value}\r\n")
        lines.append(f"Content-Length: {len(body)}\r\n\r\n")
        head = "".join(lines).encode("latin-1", "replace")
        connection.start(head, body, self._timeouts)
        try:
            return await connection.headers()
        except BaseException:
            connection.close()
            raise

    def _idle_connection(self, origin: Origin) -> Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        oldest = asyncio.get_running_loop().time() - self._keepalive
        while idle:
            connection = idle.pop()
            if not connection.closed and connection.idle_since > oldest:
                return connection
            connection.close()
        return None

    async def _connect(self, origin: Origin) -> Connection:
        loop = asyncio.get_running_loop()
        secure = origin.scheme == "https"
        if secure and self._ssl is None:
            self._ssl = ssl.create_default_context()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(
                    lambda: Connection(self, origin),
                    origin.host,
                    origin.port,
                    ssl=self._ssl if secure else None,
                    server_hostname=origin.host if secure else None,
                ),
                self._timeouts.connect,
            )
        except TimeoutError:
            raise UpstreamConnectTimeout(
                f"connecting to {origin.host}:{origin.port} timed out"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamConnectError(
                f"cannot connect to {origin.host}:{origin.port}: {exc}"
            ) from None
        return connection

    def put_back(self, connection: Connection) -> None:
        self._busy.discard(connection)
        idle = self._idle.setdefault(connection.origin, [])
        if len(idle) >= _IDLE_PER_HOST:
            connection.close()
            return
        connection.idle_since = asyncio.get_running_loop().time()
        idle.append(connection)

    def forget(self, connection: Connection) -> None:
        self._busy.discard(connection)
        idle = self._idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)

    async def close(self) -> None:
        for connection in [*self._busy, *(c for idle in self._idle.values() for c in idle)]:
            connection.close()
        self._idle.clear()
        self._busy.clear()
