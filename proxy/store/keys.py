"""API keys and orgs in Redis: created once, shown once, stored only as SHA-256 digests.

A key lives twice: its record in its org's slot (``bp:{o:org}:key:<id>``, read atomically by
the admit script, so revocation is seen by the very next request), and a small identity in the
global digest index (``bp:kd:<sha256>``), which is how a bearer token finds its org.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from proxy.config import Role
from proxy.store.connection import ORGS_KEY, Redis, digest_key, org_prefix, valid_id

KEY_PREFIX = "sk-bp-"
KEY_ORG_PREFIX = "bp:ki:"
LIMIT_FIELDS = ("rps", "rpm", "rph", "rpd", "tpm", "concurrency")
Status = Literal["active", "revoked"]


def digest(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def new_plaintext() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class Limits(BaseModel):
    """Per-key or per-org limits; absent means unlimited."""

    model_config = ConfigDict(extra="forbid")

    rps: int | None = Field(None, gt=0, strict=True)
    rpm: int | None = Field(None, gt=0, strict=True)
    rph: int | None = Field(None, gt=0, strict=True)
    rpd: int | None = Field(None, gt=0, strict=True)
    tpm: int | None = Field(None, gt=0, strict=True)
    concurrency: int | None = Field(None, gt=0, strict=True)


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

    def public(self) -> dict[str, Any]:
        return {
            "object": "api_key",
            "id": self.id,
            "org_id": self.org_id,
            "name": self.name,
            "role": self.role,
            "status": self.status,
            "models": self.models,
            "limits": {name: self.limits.get(name) for name in LIMIT_FIELDS},
            "created_at": self.created_at,
            "key_prefix": self.prefix,
        }


def _record_from_hash(data: dict[str, str]) -> KeyRecord:
    return KeyRecord(
        id=data["id"],
        org_id=data["org"],
        name=data.get("name", ""),
        role=data["role"],  # type: ignore[arg-type]
        status=data.get("status", "revoked"),  # type: ignore[arg-type]
        models=json.loads(data["models"]) if data.get("models") else None,
        created_at=int(data.get("created_at", "0")),
        prefix=data.get("prefix", ""),
        limits={name: int(data[name]) for name in LIMIT_FIELDS if data.get(name)},
    )


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
        prefix = org_prefix(org_id)
        pipe = self._redis.pipeline(transaction=False)
        pipe.delete(prefix + "key:" + key_id)
        pipe.hset(prefix + "key:" + key_id, mapping=record)
        pipe.sadd(prefix + "keys", key_id)
        pipe.sadd(ORGS_KEY, org_id)
        pipe.set(KEY_ORG_PREFIX + key_id, org_id)
        pipe.hset(
            digest_key(hashed),
            mapping={"org": org_id, "kid": key_id, "role": spec.role, "models": models},
        )
        await pipe.execute()
        return _record_from_hash({k: str(v) for k, v in record.items()}), plaintext

    async def identity(self, plaintext: str) -> Identity | None:
        data = await self._redis.hgetall(digest_key(digest(plaintext)))  # type: ignore[misc]
        if not data:
            return None
        models = json.loads(data["models"]) if data.get("models") else None
        return Identity(
            key_id=data["kid"],
            org_id=data["org"],
            role=data["role"],
            models=frozenset(models) if models is not None else None,
        )

    async def get(self, org_id: str, key_id: str) -> KeyRecord | None:
        data = await self._redis.hgetall(org_prefix(org_id) + "key:" + key_id)  # type: ignore[misc]
        return _record_from_hash(data) if data else None

    async def org_of(self, key_id: str) -> str | None:
        """A key id alone does not name its org slot; this global index does."""
        org_id: str | None = await self._redis.get(KEY_ORG_PREFIX + key_id)
        return org_id

    async def find(self, key_id: str) -> KeyRecord | None:
        org_id = await self.org_of(key_id)
        return await self.get(org_id, key_id) if org_id else None

    async def list_org(self, org_id: str) -> list[KeyRecord]:
        prefix = org_prefix(org_id)
        ids = sorted(await self._redis.smembers(prefix + "keys"))  # type: ignore[misc]
        pipe = self._redis.pipeline(transaction=False)
        for key_id in ids:
            pipe.hgetall(prefix + "key:" + key_id)
        return [_record_from_hash(data) for data in await pipe.execute() if data]

    async def orgs(self) -> list[str]:
        return sorted(await self._redis.smembers(ORGS_KEY))  # type: ignore[misc]

    async def revoke(self, record: KeyRecord) -> None:
        """Status first: the admit script refuses from this moment; then the index goes."""
        key_hash = org_prefix(record.org_id) + "key:" + record.id
        hashed = await self._redis.hget(key_hash, "digest")  # type: ignore[misc]
        await self._redis.hset(key_hash, "status", "revoked")  # type: ignore[misc]
        if hashed:
            await self._redis.delete(digest_key(hashed))

    async def update(self, record: KeyRecord, change: KeyUpdate) -> KeyRecord:
        key_hash = org_prefix(record.org_id) + "key:" + record.id
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
        pipe = self._redis.pipeline(transaction=False)
        if fields:
            pipe.hset(key_hash, mapping=fields)
        if cleared:
            pipe.hdel(key_hash, *cleared)
        pipe.hget(key_hash, "digest")
        result = await pipe.execute()
        hashed = result[-1]
        index_fields = {k: v for k, v in fields.items() if k in ("role", "models")}
        if hashed and index_fields and record.status == "active":
            await self._redis.hset(digest_key(hashed), mapping=index_fields)  # type: ignore[misc]
        updated = await self.get(record.org_id, record.id)
        assert updated is not None
        return updated

    async def get_org_limits(self, org_id: str) -> dict[str, int]:
        data = await self._redis.hgetall(org_prefix(org_id) + "limits")  # type: ignore[misc]
        return {name: int(data[name]) for name in LIMIT_FIELDS if data.get(name)}

    async def set_org_limits(self, org_id: str, limits: Limits) -> dict[str, int]:
        """Replaces the org's limits: fields left out are removed. The same hash holds the
        org's end-user policy (``proxy.store.end_users``), which stays."""
        key = org_prefix(org_id) + "limits"
        values = limits.model_dump(exclude_none=True)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hdel(key, *LIMIT_FIELDS)
        if values:
            pipe.hset(key, mapping={k: str(v) for k, v in values.items()})
        pipe.sadd(ORGS_KEY, org_id)
        await pipe.execute()
        return values
