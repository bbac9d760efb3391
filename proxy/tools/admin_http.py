"""The admin commands' HTTP client: one session, the admin key as a Bearer token, and the
proxy's OpenAI-shaped errors turned into a message and an exit status."""

from __future__ import annotations

import argparse
import os
from types import TracebackType
from typing import Any

import aiohttp

URL_ENV = "PROXY_URL"
KEY_ENV = "PROXY_ADMIN_KEY"


class AdminError(Exception):
    """Printed as ``llm-proxy: <message>``; ``status`` is the process exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get(URL_ENV, "http://127.0.0.1:8080"),
        help=f"proxy base URL (env {URL_ENV})",
    )
    parser.add_argument("--admin-key", help=f"admin key (default: env {KEY_ENV})")


class AdminHttp:
    def __init__(self, args: argparse.Namespace) -> None:
        key = args.admin_key or os.environ.get(KEY_ENV)
        if not key:
            raise AdminError(f"an admin key is needed (--admin-key or {KEY_ENV})", status=2)
        self._base = args.url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {key}"}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AdminHttp:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(
        self,
        method: str,
        path: str,
        params: list[tuple[str, str]] | None = None,
        body: Any = None,
    ) -> Any:
        assert self._session is not None
        url = self._base + path
        try:
            async with self._session.request(
                method, url, params=params, json=body, headers=self._headers
            ) as response:
                status = response.status
                payload = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AdminError(f"cannot reach {url}: {exc}") from None
        except ValueError:
            raise AdminError(f"{url} did not answer JSON") from None
        if status >= 400:
            error = payload.get("error") if isinstance(payload, dict) else None
            message = error.get("message") if isinstance(error, dict) else str(payload)
            raise AdminError(f"HTTP {status}: {message}")
        return payload
