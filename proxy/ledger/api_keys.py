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

from pydantic import BaseModel, ConfigDict, Field, field_validator

from proxy.config import MAX_CONCURRENCY, MAX_RATE_LIMIT, Role
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


class Limits(BaseModel):
    """Per-key or per-org limits; absent means unlimited. Bounded so that the admit script
    only ever reads integers a Lua number holds exactly (see ``proxy.config.MAX_RATE_LIMIT``).
    Answers show every field (null where unset), as the serialization schema says."""

    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)

    rps: int | None = Field(None, gt=0, le=MAX_RATE_LIMIT, strict=True)
    rpm: int | None = Field(None, gt=0, le=MAX_RATE_LIMIT, strict=True)
    rph: int | None = Field(None, gt=0, le=MAX_RATE_LIMIT, strict=True)
    rpd: int | None = Field(None, gt=0, le=MAX_RATE_LIMIT, strict=True)
    tpm: int | None = Field(None, gt=0, le=MAX_RATE_LIMIT, strict=True)
    concurrency: int | None = Field(None, gt=0, le=MAX_CONCURRENCY, strict=True)


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    org_id: str | None = None
    name: str = Field("", max_length=200)
    role: Role = "member"
    models: list[str] | None = None
    limits: Limits = Limits()

    @field_validator("org_id")
    @classmethod
    def _org_id(cls, value: str | None) -> str | None:
        if value is not None and not valid_id(value):
            raise ValueError("must be 1-64 characters of letters, digits, '_', '.', '-'")
        return value


class KeyUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=200)
    role: Role | None = None
    models: list[str] | None = None
    limits: Limits | None = None


@dataclass(frozen=True)
class Identity:
    """What authentication learns from a bearer token; cached briefly per process."""

    key_id: str
    org_id: str
    role: Role
    models: frozenset[str] | None = None

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


def _models(raw: str | None) -> list[str] | None:
    """A stored model allow-list ("" = all models); ValueError when it is not one."""
    if not raw:
        return None
    models = json.loads(raw)
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise ValueError("models is not a list of names")
    return models


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
        pipe = self._redis.pipeline(transaction=False)
        pipe.delete(org_key(org_id, "key", key_id))
        pipe.hset(org_key(org_id, "key", key_id), mapping=record)
        pipe.sadd(org_key(org_id, "keys"), key_id)
        pipe.sadd(ORGS_KEY, org_id)
        pipe.set(key_org_key(key_id), org_id)
        pipe.hset(
            digest_key(hashed),
            mapping={"org": org_id, "kid": key_id, "role": spec.role, "models": models},
        )
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
        return Identity(
            key_id=kid,
            org_id=org,
            role=role,  # type: ignore[arg-type]
            models=frozenset(models) if models is not None else None,
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
        hashed, role, models, version = state
        if hashed:
            await KEY_INDEX(
                self._redis, [digest_key(hashed)], ["update", key_id, role, models, version]
            )

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
