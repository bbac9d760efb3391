"""Where a request goes and how long it may take: values parsed once per upstream endpoint,
so the per-request path does no URL work."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Timeouts:
    connect: float
    read: float
    """Longest silence tolerated while waiting for the upstream's bytes."""
    total: float


@dataclass(frozen=True)
class Origin:
    """What a pooled connection is keyed by: connections are reused per origin only."""

    scheme: str
    host: str
    port: int

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Target:
    """A parsed URL, computed once per upstream endpoint."""

    origin: Origin
    path: str

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(Origin(parts.scheme, parts.hostname, port), path)
