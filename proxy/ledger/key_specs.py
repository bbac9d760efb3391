"""What the key API accepts: a key's limits, its creation and its changes (bounded, so the
admit script only ever reads integers a Lua number holds exactly)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from proxy.config import MAX_CONCURRENCY, MAX_RATE_LIMIT, Role
from proxy.ledger.keys import valid_id

MAX_METADATA = 16


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


Metadata = Annotated[
    dict[Annotated[str, Field(min_length=1, max_length=64)], Annotated[str, Field(max_length=512)]],
    Field(max_length=MAX_METADATA),
]
"""A small string map for the operator's own bookkeeping (team, ticket, owner's email): bounded
so that a key record stays small whatever a client of the admin API sends."""

ExpiresAt = Annotated[int, Field(gt=0, lt=2**41, strict=True)]
"""Unix seconds; bounded so it stays an exact integer everywhere."""


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    org_id: str | None = None
    name: str = Field("", max_length=200)
    role: Role = "member"
    models: list[str] | None = None
    limits: Limits = Limits()
    expires_at: ExpiresAt | None = Field(
        None, description="Unix seconds after which the key is refused (401 `key_expired`)."
    )
    metadata: Metadata = Field(default_factory=dict)

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
    expires_at: ExpiresAt | None = Field(None, description="null: never expires.")
    metadata: Metadata | None = Field(None, description="Replaces the whole map.")


__all__ = ["MAX_METADATA", "ExpiresAt", "KeyCreate", "KeyUpdate", "Limits", "Metadata"]
