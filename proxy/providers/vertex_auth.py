"""OAuth access tokens for Vertex AI upstreams, fetched once per token lifetime, never per
request.

Credentials come from the upstream's ``credentials_file`` (a service-account JSON, whose own
``token_uri`` is honoured, so a test points it at a local token endpoint) or from Application
Default Credentials (``GOOGLE_APPLICATION_CREDENTIALS``, the metadata server, ``gcloud``).
``google-auth`` refreshes with a blocking HTTP call, so a refresh runs in a thread, one at a
time per upstream: requests use the token they have while a refresh runs ``REFRESH_MARGIN``
seconds before it expires, and wait only when there is no valid token at all (the first
request, or after a failed refresh).
"""

from __future__ import annotations

import asyncio
import datetime
from dataclasses import dataclass, field
from typing import Any

from proxy.config import UpstreamConfig
from proxy.errors import ApiError

SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
REFRESH_MARGIN = 300.0
"""Seconds before expiry at which a new token is fetched in the background."""


def _load(upstream: UpstreamConfig) -> Any:
    """The upstream's credentials object (imported here: only Vertex upstreams need it)."""
    try:
        import google.auth
        from google.oauth2 import service_account
    except ImportError as exc:  # pragma: no cover - a runtime dependency
        raise ApiError(
            502,
            f"The upstream '{upstream.name}' is a Vertex AI upstream, which needs the "
            "google-auth package (pip install 'google-auth[requests]').",
            type="server_error",
            code="upstream_auth",
        ) from exc
    if upstream.credentials_file:
        return service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
            upstream.credentials_file, scopes=SCOPES
        )
    credentials, _project = google.auth.default(scopes=SCOPES)  # type: ignore[no-untyped-call]
    return credentials


def _refresh(credentials: Any) -> None:
    from google.auth.transport.requests import Request

    credentials.refresh(Request())  # type: ignore[no-untyped-call]


def _seconds_left(credentials: Any) -> float:
    expiry = credentials.expiry  # naive UTC, as google-auth keeps it
    if not credentials.token:
        return -1.0
    if expiry is None:
        return float("inf")
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    return float((expiry - now).total_seconds())


@dataclass
class _Source:
    credentials: Any
    refreshing: asyncio.Task[None] | None = None
    refreshes: int = 0
    failures: list[str] = field(default_factory=list)


class VertexTokens:
    """Each Vertex upstream's current access token (per process)."""

    def __init__(self) -> None:
        self._sources: dict[str, _Source] = {}

    def _source(self, upstream: UpstreamConfig) -> _Source:
        source = self._sources.get(upstream.name)
        if source is None:
            try:
                credentials = _load(upstream)
            except ApiError:
                raise
            except Exception as exc:  # unreadable file, no ADC: the operator's to fix
                raise _auth_error(upstream, exc) from exc
            source = self._sources[upstream.name] = _Source(credentials)
        return source

    async def ensure(self, upstream: UpstreamConfig) -> str:
        """A valid token: at once when one is held, else after the refresh it waits for."""
        source = self._source(upstream)
        left = _seconds_left(source.credentials)
        if left > REFRESH_MARGIN:
            return str(source.credentials.token)
        task = source.refreshing
        if task is None or task.done():
            task = source.refreshing = asyncio.ensure_future(self._refresh(upstream, source))
        if left > 0:
            return str(source.credentials.token)  # still valid: the refresh runs behind it
        try:
            await asyncio.shield(task)
        except Exception as exc:
            raise _auth_error(upstream, exc) from exc
        return str(source.credentials.token)

    async def _refresh(self, upstream: UpstreamConfig, source: _Source) -> None:
        await asyncio.to_thread(_refresh, source.credentials)
        source.refreshes += 1

    def refreshes(self, name: str) -> int:
        source = self._sources.get(name)
        return source.refreshes if source is not None else 0


def _auth_error(upstream: UpstreamConfig, exc: BaseException) -> ApiError:
    return ApiError(
        502,
        f"The upstream '{upstream.name}' could not be authenticated: no access token "
        f"({type(exc).__name__}).",
        type="server_error",
        code="upstream_auth",
    )

