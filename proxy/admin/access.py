"""Who may see and change what: cluster admins everything, org admins their org, members
only themselves. Ids outside the caller's reach are reported as missing, never as forbidden,
so one org cannot learn another's ids."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, WithJsonSchema

from proxy.errors import bad_request, not_found
from proxy.ledger.api_keys import Identity, KeyRecord, KeyStore
from proxy.ledger.keys import valid_id
from proxy.openapi import ORG_ID_PATTERN

ORG_ID_RULE = "1-64 characters of letters, digits, '_', '.', '-', starting with a letter or digit"


def _org_id(value: str) -> str:
    if not valid_id(value):
        raise ValueError(f"must be {ORG_ID_RULE}")
    return value


OrgId = Annotated[
    str, AfterValidator(_org_id), WithJsonSchema({"type": "string", "pattern": ORG_ID_PATTERN})
]
"""An org id in a query model: the rule's own 400, and its pattern in the document."""


def org_id_param(value: str, param: str) -> str:
    """An org id from a path or query; 400 naming ``param`` when it cannot be one (ids become
    part of Redis key names, so ``../x``, ``a\nb`` or 5,000 characters are never registered)."""
    if not valid_id(value):
        raise bad_request(f"'{param}' must be {ORG_ID_RULE}.", param=param)
    return value


def sees_org(identity: Identity, org_id: str) -> bool:
    return identity.role == "cluster_admin" or identity.org_id == org_id


async def find_key(keys: KeyStore, identity: Identity, key_id: str) -> KeyRecord:
    """The key, if the caller may see it; 404 otherwise (also for other orgs' keys)."""
    if identity.role == "member":
        if key_id != identity.key_id:
            raise not_found(f"No API key '{key_id}'.")
        record = await keys.get(identity.org_id, key_id)
    elif identity.role == "org_admin":
        record = await keys.get(identity.org_id, key_id)
    else:
        record = await keys.find(key_id)
    if record is None:
        raise not_found(f"No API key '{key_id}'.")
    return record
