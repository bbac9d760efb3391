"""Which Redis the proxy talks to, read from its URL (the conventions of the ``limits`` library).

* ``redis://``, ``rediss://``, ``unix://`` — one server, as redis-py reads these URLs.
* ``redis+sentinel://[user:password@]host:port[,host:port…]/<service>[/<db>]`` — the sentinels
  watching the master set ``<service>``; the proxy asks them where the master is.
* ``redis+cluster://[user:password@]host:port[,host:port…]`` — seed nodes of a Redis Cluster;
  the proxy reads the slot map from them.

``rediss+sentinel://`` and ``rediss+cluster://`` use TLS. Credentials in the URL apply to the
data nodes and the sentinels alike; ``REDIS_PASSWORD`` (data nodes) and
``REDIS_SENTINEL_PASSWORD`` (sentinels) override them, so a secret can stay out of the file.
This module imports nothing of the proxy: the configuration validates URLs with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import unquote, urlsplit

Kind = Literal["single", "sentinel", "cluster"]
SINGLE_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
_DEFAULT_PORT = {"sentinel": 26379, "cluster": 6379, "single": 6379}


@dataclass(frozen=True)
class Topology:
    kind: Kind
    url: str = field(repr=False)
    nodes: tuple[tuple[str, int], ...]
    """Sentinels, cluster seed nodes, or the one server (empty for ``unix://``)."""
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    tls: bool = False

    @property
    def tcp(self) -> bool:
        """What the pipelined hot path speaks: TCP, with or without TLS (not a unix socket)."""
        return bool(self.nodes)


def _nodes(netloc: str, kind: Kind, url: str) -> tuple[tuple[str, int], ...]:
    hosts = netloc.rpartition("@")[2]
    nodes: list[tuple[str, int]] = []
    for part in hosts.split(","):
        host, colon, port = part.strip().rpartition(":")
        if not colon:
            host, port = port, ""
        host = host.strip("[]")
        if not host or (port and not port.isdigit()):
            raise ValueError(f"{_redacted(url)}: bad host:port {part!r}")
        nodes.append((host, int(port) if port else _DEFAULT_PORT[kind]))
    return tuple(nodes)


def _redacted(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    return url.replace(f"{user}:{parts.password}@", f"{user}:***@", 1)


def parse(url: str, environ: Mapping[str, str] | None = None) -> Topology:
    """Raises ValueError, naming what is wrong (never echoing a password)."""
    env = environ or {}
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    parts = urlsplit(url)
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if scheme in SINGLE_SCHEMES:
        if scheme == "unix":
            return Topology("single", url, (), tls=False)
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError(f"{_redacted(url)}: bad port") from None
        db_text = parts.path.strip("/") or "0"
        if not db_text.isdigit():
            raise ValueError(f"{_redacted(url)}: the database must be a number")
        return Topology(
            "single",
            url,
            ((parts.hostname or "127.0.0.1", port),),
            db=int(db_text),
            username=username,
            password=password,
            tls=scheme == "rediss",
        )
    if scheme in SENTINEL_SCHEMES:
        path = [p for p in parts.path.split("/") if p]
        if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
            raise ValueError(
                f"{_redacted(url)}: expected redis+sentinel://host:port[,host:port]/"
                "<service_name>[/<db>]"
            )
        return Topology(
            "sentinel",
            url,
            _nodes(parts.netloc, "sentinel", url),
            service=unquote(path[0]),
            db=int(path[1]) if len(path) == 2 else 0,
            username=username,
            password=env.get("REDIS_PASSWORD") or password,
            sentinel_username=username,
            sentinel_password=env.get("REDIS_SENTINEL_PASSWORD") or password,
            tls=scheme.startswith("rediss"),
        )
    if scheme in CLUSTER_SCHEMES:
        if parts.path.strip("/"):
            raise ValueError(f"{_redacted(url)}: a cluster has only database 0 (no /<db>)")
        return Topology(
            "cluster",
            url,
            _nodes(parts.netloc, "cluster", url),
            username=username,
            password=env.get("REDIS_PASSWORD") or password,
            tls=scheme.startswith("rediss"),
        )
    raise ValueError(
        f"{_redacted(url)}: unknown scheme; use redis://, rediss://, unix://, "
        "redis+sentinel:// or redis+cluster:// (rediss+… for TLS)"
    )
