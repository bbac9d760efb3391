"""Proxy-key authentication with a short, bounded in-process cache.

OpenAI routes take the key as ``Authorization: Bearer``; Anthropic's Messages routes also take
it as ``x-api-key`` (what Anthropic's API reference, curl examples and ``ANTHROPIC_API_KEY``
clients send), while the ``anthropic`` Python SDK and Claude Code's ``ANTHROPIC_AUTH_TOKEN``
send a Bearer token.

Keys are looked up by their SHA-256 digest, so the plaintext never reaches Redis and a lookup
reveals nothing through timing. The cache lives at most ``cache_ttl_seconds`` (≤ 2 s), which
bounds how long a revoked key keeps working on admin endpoints; LLM requests see revocation at
once because the admit script reads the key's status itself.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime

from aiohttp import web
from redis.exceptions import RedisError

from proxy.dialects.base import KEY_HINT, client_key
from proxy.errors import ApiError, unauthorized
from proxy.ledger.api_keys import Identity, KeyStore, digest

_CACHE_MAX = 100_000


def key_expired(at: int) -> ApiError:
    when = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return ApiError(
        401,
        f"This API key expired at {when}; ask an admin for a new key (or a rotated secret).",
        type="authentication_error",
        code="key_expired",
    )


def bearer_token(request: web.Request) -> str:
    """The key of the proxy's own API (models, admin routes): in any header a dialect takes
    it in (``client_key``), so an Anthropic SDK's ``models.list()`` is not a 401."""
    token = client_key(request.headers)
    if token is None:
        raise unauthorized(f"Missing API key: {KEY_HINT}.")
    return token


TOUCH_EVERY = 60.0
"""``last_used_at`` is written at most this often per key and process: one small write a
minute for a busy key, never one per request."""


class Authenticator:
    def __init__(
        self, keys: KeyStore, cache_ttl: float, clock: Callable[[], float] = time.time
    ) -> None:
        self._keys = keys
        self._ttl = cache_ttl
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, Identity | None]] = OrderedDict()
        self._lookups: dict[str, asyncio.Future[Identity | None]] = {}
        self._touched: dict[str, float] = {}
        self._touches: set[asyncio.Task[None]] = set()

    async def identify(self, request: web.Request) -> Identity:
        return await self.identify_key(bearer_token(request))

    async def identify_key(self, token: str) -> Identity:
        hashed = digest(token)
        now = time.monotonic()
        hit = self._cache.get(hashed)
        if hit is not None and hit[0] > now:
            identity = hit[1]
        else:
            identity = await self._lookup(token, hashed)
            if self._ttl > 0:
                self._cache[hashed] = (now + self._ttl, identity)
                self._cache.move_to_end(hashed)
                if len(self._cache) > _CACHE_MAX:
                    self._cache.popitem(last=False)
        if identity is None:
            raise unauthorized("Incorrect API key provided (unknown or revoked).")
        if identity.expires_at and self._clock() >= identity.expires_at:
            raise key_expired(identity.expires_at)
        last = self._touched.get(identity.key_id)
        if last is None or now - last >= TOUCH_EVERY:
            self._touch(identity, now)
        return identity

    def _touch(self, identity: Identity, now: float) -> None:
        if len(self._touched) >= _CACHE_MAX:
            self._touched.clear()
        self._touched[identity.key_id] = now
        task = asyncio.get_running_loop().create_task(self._write_touch(identity))
        self._touches.add(task)
        task.add_done_callback(self._touches.discard)

    async def _write_touch(self, identity: Identity) -> None:
        try:
            await self._keys.touch(identity.org_id, identity.key_id, int(self._clock()))
        except (RedisError, OSError):  # bookkeeping only: the request goes on regardless
            self._touched.pop(identity.key_id, None)

    async def _lookup(self, token: str, hashed: str) -> Identity | None:
        """One Redis lookup per key at a time: a burst of first requests with one key (or all
        of them when its cache entry expires) waits for the same answer instead of opening a
        pooled connection each."""
        pending = self._lookups.get(hashed)
        if pending is not None:
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not pending.cancelled() or (task is not None and task.cancelling()):
                    raise
                # The request that was looking it up went away: look it up ourselves.
        future: asyncio.Future[Identity | None] = asyncio.get_running_loop().create_future()
        self._lookups[hashed] = future
        try:
            identity = await self._keys.identity(token)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning without followers
            raise
        finally:
            del self._lookups[hashed]
        future.set_result(identity)
        return identity

    def forget(self, hashed: str | None = None) -> None:
        """Drop cached identities (this process only), e.g. right after a revoke."""
        if hashed is None:
            self._cache.clear()
        else:
            self._cache.pop(hashed, None)
