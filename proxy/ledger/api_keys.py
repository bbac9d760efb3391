"""API keys and orgs in Redis: created once, shown once, stored only as SHA-256 digests.

A key lives twice: its record in its org's slot (``bp:{o:org}:key:<id>``, read atomically by
the admit script, so revocation is seen by the very next request), and a small identity in the
global digest index (``bp:kd:<sha256>``), which is how a bearer token finds its org.

The two live in different hash slots (on Redis Cluster, on different nodes), so no single
atomic step can change both. Each change is therefore atomic per slot and ordered so that no
interleaving corrupts the index: the record first (``key_record.lua``: only while the key is
active, and versioned), then the index (``key_index.lua``: only an entry that is still this
key's, and only to a newer version). A revoked key's entry is deleted and never written again.
An index entry that is malformed anyway is treated as no key at all (401), never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from proxy.config import Role
from proxy.ledger.key_specs import KeyCreate as KeyCreate
from proxy.ledger.key_specs import KeyUpdate as KeyUpdate
from proxy.ledger.key_specs import Limits as Limits
from proxy.ledger.keys import ORGS_KEY, digest_key, key_org_key, org_key, valid_id
from proxy.ledger.scripts import KEY_INDEX, KEY_RECORD
from proxy.store.client import Redis

log = logging.getLogger(__name__)

KEY_PREFIX = "sk-bp-"
LIMIT_FIELDS = ("rps", "rpm", "rph", "rpd", "tpm", "concurrency")
ROLES: frozenset[str] = frozenset(("cluster_admin", "org_admin", "member"))
Status = Literal["active", "revoked"]


def digest(plaintext: str) -> str:
    """Of the bytes as sent: aiohttp decodes header bytes that are not UTF-8 to lone
    surrogates, which plain ``encode()`` refuses; such a key is simply unknown (401)."""
    return hashlib.sha256(plaintext.encode("utf-8", "surrogateescape")).hexdigest()


def new_plaintext() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Identity:
    """What authentication learns from a bearer token; cached briefly per process."""

    key_id: str
    org_id: str
    role: Role
    models: frozenset[str] | None = None
    expires_at: int = 0
    """Unix seconds from which this token is refused (0: never): the key's expiry, or the end
    of a rotated-out secret's grace period."""

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass
class KeyRecord:
    id: str
    org_id: str
    name: str
    role: Role
    status: Status
    models: list[str] | None
    created_at: int
    prefix: str
    limits: dict[str, int] = field(default_factory=dict)
    expires_at: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    last_used_at: int | None = None
    rotated_at: int | None = None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


def _models(raw: str | None) -> list[str] | None:
    """A stored model allow-list ("" = all models); ValueError when it is not one."""
    if not raw:
        return None
    models = json.loads(raw)
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise ValueError("models is not a list of names")
    return models


def _int_or_none(raw: str | None) -> int | None:
    return int(raw) if raw else None


def _metadata(raw: str | None) -> dict[str, str]:
    if not raw:
        return {}
    value = json.loads(raw)
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError("metadata is not a string map")
    return value


def _record_from_hash(data: dict[str, str]) -> KeyRecord | None:
    """None for a record that is not one (missing fields, bad values): treated as absent."""
    try:
        if data.get("role") not in ROLES:
            raise ValueError("unknown role")
        return KeyRecord(
            id=data["id"],
            org_id=data["org"],
            name=data.get("name", ""),
            role=data["role"],  # type: ignore[arg-type]
            status="active" if data.get("status") == "active" else "revoked",
            models=_models(data.get("models")),
            created_at=int(data.get("created_at", "0")),
            prefix=data.get("prefix", ""),
            limits={name: int(data[name]) for name in LIMIT_FIELDS if data.get(name)},
            expires_at=_int_or_none(data.get("exp")),
            metadata=_metadata(data.get("metadata")),
            last_used_at=_int_or_none(data.get("last_used")),
            rotated_at=_int_or_none(data.get("rotated_at")),
        )
    except (KeyError, ValueError) as exc:
        log.warning("ignoring a malformed key record %s: %s", data.get("id", "?"), exc)
        return None


class KeyStore:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def create(
        self,
        spec: KeyCreate,
        org_id: str,
        *,
        plaintext: str | None = None,
        key_id: str | None = None,
    ) -> tuple[KeyRecord, str]:
        """Returns the record and the plaintext key, which is never stored or shown again."""
        plaintext = plaintext or new_plaintext()
        key_id = key_id or "key_" + secrets.token_hex(8)
        hashed = digest(plaintext)
        models = json.dumps(spec.models) if spec.models is not None else ""
        record: dict[str, str | int] = {
            "id": key_id,
            "org": org_id,
            "name": spec.name,
            "role": spec.role,
            "status": "active",
            "models": models,
            "created_at": int(time.time()),
            "prefix": plaintext[: len(KEY_PREFIX) + 4],
            "digest": hashed,
        }
        limits = spec.limits.model_dump(exclude_none=True)
        record.update(limits)
        if spec.metadata:
            record["metadata"] = json.dumps(spec.metadata)
        index: dict[str, str | int] = {
            "org": org_id,
            "kid": key_id,
            "role": spec.role,
            "models": models,
        }
        if spec.expires_at is not None:
            record["exp"] = index["exp"] = spec.expires_at
        pipe = self._redis.pipeline(transaction=False)
        pipe.delete(org_key(org_id, "key", key_id))
        pipe.hset(org_key(org_id, "key", key_id), mapping=record)
        pipe.sadd(org_key(org_id, "keys"), key_id)
        pipe.sadd(ORGS_KEY, org_id)
        pipe.set(key_org_key(key_id), org_id)
        pipe.hset(digest_key(hashed), mapping=index)
        await pipe.execute()
        created = _record_from_hash({k: str(v) for k, v in record.items()})
        assert created is not None
        return created, plaintext

    async def identity(self, plaintext: str) -> Identity | None:
        hashed = digest(plaintext)
        data = await self._redis.hgetall(digest_key(hashed))
        if not data:
            return None
        kid, org, role = data.get("kid", ""), data.get("org", ""), data.get("role")
        try:
            if not (valid_id(kid) and valid_id(org) and role in ROLES):
                raise ValueError("missing or invalid kid, org or role")
            models = _models(data.get("models"))
        except ValueError as exc:
            log.warning("key index entry %s… is malformed (%s): refused", hashed[:8], exc)
            return None
        ends = [int(data[name]) for name in ("exp", "until") if data.get(name, "").isdigit()]
        return Identity(
            key_id=kid,
            org_id=org,
            role=role,  # type: ignore[arg-type]
            models=frozenset(models) if models is not None else None,
            expires_at=min(ends) if ends else 0,
        )

    async def get(self, org_id: str, key_id: str) -> KeyRecord | None:
        data = await self._redis.hgetall(org_key(org_id, "key", key_id))
        return _record_from_hash(data) if data else None

    async def org_of(self, key_id: str) -> str | None:
        """A key id alone does not name its org slot; this global index does."""
        org_id: str | None = await self._redis.get(key_org_key(key_id))
        return org_id

    async def find(self, key_id: str) -> KeyRecord | None:
        org_id = await self.org_of(key_id)
        return await self.get(org_id, key_id) if org_id else None

    async def list_org(self, org_id: str) -> list[KeyRecord]:
        ids = sorted(await self._redis.smembers(org_key(org_id, "keys")))
        pipe = self._redis.pipeline(transaction=False)
        for key_id in ids:
            pipe.hgetall(org_key(org_id, "key", key_id))
        records = (_record_from_hash(data) for data in await pipe.execute() if data)
        return [record for record in records if record is not None]

    async def orgs(self) -> list[str]:
        return sorted(await self._redis.smembers(ORGS_KEY))

    async def revoke(self, record: KeyRecord) -> None:
        """Status first: the admit script refuses from this moment; then the index goes."""
        hashed = await KEY_RECORD(self._redis, [self._record_key(record)], ["revoke"])
        if hashed:
            await KEY_INDEX(self._redis, [digest_key(hashed)], ["drop", record.id])

    async def update(self, record: KeyRecord, change: KeyUpdate) -> KeyRecord | None:
        """The updated record; None when the key was revoked meanwhile (nothing changed)."""
        fields: dict[str, str] = {}
        if change.name is not None:
            fields["name"] = change.name
        if change.role is not None:
            fields["role"] = change.role
        if "models" in change.model_fields_set:
            fields["models"] = json.dumps(change.models) if change.models is not None else ""
        cleared: list[str] = []
        if "expires_at" in change.model_fields_set:
            if change.expires_at is None:
                cleared.append("exp")
            else:
                fields["exp"] = str(change.expires_at)
        if change.metadata is not None:
            fields["metadata"] = json.dumps(change.metadata)
        if change.limits is not None:
            for name in change.limits.model_fields_set:
                value = getattr(change.limits, name)
                if value is None:
                    cleared.append(name)
                else:
                    fields[name] = str(value)
        state = await self.update_record(record, fields, cleared)
        if state is None:
            return None
        await self.update_index(record.id, state)
        return await self.get(record.org_id, record.id)

    async def update_record(
        self, record: KeyRecord, fields: dict[str, str], cleared: Sequence[str]
    ) -> list[str] | None:
        """Step one of an update, atomic in the org's slot: the record's digest, role, models
        and version afterwards, or None when the key is no longer active."""
        pairs = [item for name, value in fields.items() for item in (name, value)]
        args: list[str | int] = ["update", len(fields), *pairs, *cleared]
        state = await KEY_RECORD(self._redis, [self._record_key(record)], args)
        return [str(value) for value in state] if state else None

    async def update_index(self, key_id: str, state: list[str]) -> None:
        """Step two: the index entry takes the record's state, unless it is gone or newer."""
        hashed, role, models, version, expires = state
        if hashed:
            await KEY_INDEX(
                self._redis,
                [digest_key(hashed)],
                ["update", key_id, role, models, version, expires],
            )

    async def rotate(self, record: KeyRecord, grace_seconds: int, now: int) -> str | None:
        """A new secret for the same key id (its limits, budgets and spend are keyed by the id,
        so all carry over); the old one works ``grace_seconds`` more, or stops at once. Record
        first, then the new index entry, then the old one (the order ``revoke`` and ``update``
        keep). None when the key is not active."""
        plaintext = new_plaintext()
        hashed = digest(plaintext)
        args: list[str | int] = ["rotate", hashed, plaintext[: len(KEY_PREFIX) + 4], now]
        state = await KEY_RECORD(self._redis, [self._record_key(record)], args)
        if not state:
            return None
        old, role, models, version, expires = (str(value) for value in state)
        entry: dict[str, str] = {
            "org": record.org_id,
            "kid": record.id,
            "role": role,
            "models": models,
            "v": version,
        }
        if expires:
            entry["exp"] = expires
        await self._redis.hset(digest_key(hashed), mapping=entry)
        if old and grace_seconds > 0:
            until = now + grace_seconds
            await KEY_INDEX(self._redis, [digest_key(old)], ["grace", record.id, until, until + 60])
        elif old:
            await KEY_INDEX(self._redis, [digest_key(old)], ["drop", record.id])
        return plaintext

    async def touch(self, org_id: str, key_id: str, now: int) -> None:
        """``last_used_at``: written by each process at most once a minute per key. A plain
        HSET, not a script: the record exists whenever its index entry does (written first,
        never deleted), and this stays off the admit/settle script budget."""
        await self._redis.hset(org_key(org_id, "key", key_id), "last_used", str(now))

    @staticmethod
    def _record_key(record: KeyRecord) -> str:
        return org_key(record.org_id, "key", record.id)

    async def get_org_limits(self, org_id: str) -> dict[str, int]:
        data = await self._redis.hgetall(org_key(org_id, "limits"))
        return {name: int(data[name]) for name in LIMIT_FIELDS if data.get(name)}

    async def set_org_limits(self, org_id: str, limits: Limits) -> dict[str, int]:
        """Replaces the org's limits: fields left out are removed. The same hash holds the
        org's end-user policy (``proxy.ledger.end_users``), which stays."""
        key = org_key(org_id, "limits")
        values = limits.model_dump(exclude_none=True)
        # The org set has a slot of its own: on a cluster one MULTI cannot span both. Listing
        # the org first is harmless if the replacement then fails.
        await self._redis.sadd(ORGS_KEY, org_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hdel(key, *LIMIT_FIELDS)
        if values:
            pipe.hset(key, mapping={k: str(v) for k, v in values.items()})
        await pipe.execute()
        return values
