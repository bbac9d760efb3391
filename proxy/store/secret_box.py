"""Secrets at rest: webhook secrets are sealed (AES-256-GCM) before they reach Redis.

The key comes from the environment, never from Redis or the config file, so a copy of the
database (a backup, an RDB file, a replica) does not carry the secrets that sign deliveries.
``PROXY_SECRET_KEY`` holds 32 random bytes, base64-encoded (``openssl rand -base64 32``);
several keys separated by commas allow rotation: the first seals, any of them opens.

A sealed value reads ``v1:<key id>:<base64url(nonce | ciphertext | tag)>``; the key id (the
first 8 hex digits of the key's SHA-256) names the key that opens it. Without a key, secrets
are stored in plain text as before (the proxy says so at start-up), and records written
before a key was set keep working; ``BudgetStore.seal_stored_secrets`` seals them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ENV = "PROXY_SECRET_KEY"
_VERSION = "v1"
_NONCE_BYTES = 12
_AAD = b"llm-proxy/webhook_secret/v1"


class SecretKeyError(ValueError):
    """``PROXY_SECRET_KEY`` is set but is not a list of base64-encoded 32-byte keys."""


class SecretUnavailable(Exception):
    """A sealed value that cannot be opened: no key, not the key that sealed it, or altered."""


def _key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:8]


def _decode_key(text: str) -> bytes:
    text = text.strip()
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise SecretKeyError(
            f"{ENV} must hold 32 random bytes, base64-encoded (e.g. `openssl rand -base64 32`);"
            " separate several keys with commas"
        )
    return key


class SecretBox:
    def __init__(self, keys: list[bytes]) -> None:
        assert keys, "at least one key"
        self._sealing_id = _key_id(keys[0])
        self._ciphers = {_key_id(key): AESGCM(key) for key in keys}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SecretBox | None:
        """None when no key is set; SecretKeyError when one is set but malformed."""
        value = (os.environ if environ is None else environ).get(ENV, "")
        parts = [part for part in value.split(",") if part.strip()]
        if not parts:
            return None
        return cls([_decode_key(part) for part in parts])

    def seal(self, plaintext: str) -> str:
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._ciphers[self._sealing_id].encrypt(nonce, plaintext.encode(), _AAD)
        encoded = base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")
        return f"{_VERSION}:{self._sealing_id}:{encoded}"

    def open(self, sealed: str) -> str:
        return open_sealed(self, sealed)

    def cipher(self, key_id: str) -> AESGCM | None:
        return self._ciphers.get(key_id)


def open_sealed(box: SecretBox | None, sealed: str) -> str:
    version, _, rest = sealed.partition(":")
    key_id, _, encoded = rest.partition(":")
    if version != _VERSION or not encoded:
        raise SecretUnavailable("not a sealed value")
    if box is None:
        raise SecretUnavailable(f"sealed with key {key_id}, but {ENV} is not set")
    cipher = box.cipher(key_id)
    if cipher is None:
        raise SecretUnavailable(f"sealed with key {key_id}, which {ENV} does not hold")
    try:
        raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        return cipher.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], _AAD).decode()
    except (InvalidTag, ValueError, binascii.Error) as exc:
        raise SecretUnavailable("the sealed value does not open (altered?)") from exc
