"""End users: the people an application serves, named per request in ``X-On-Behalf-Of``.

An end user has no key and no record; they exist in the ledger as the scope tag
``u:<hex of the id's UTF-8 bytes>`` of their org (in-flight counters, spend windows, rate-limit
levels — all expiring), so no id, whatever characters it holds, can break a key name, a field or
the org's hash tag. The org's end-user policy (require the header, limits for each end user,
track spend ahead of any budget) lives in the org's policy hash beside its own limits, so the
admit script reads it in the same command. ``u_on`` there says the org has had an end-user
budget or policy: before that, a named end user costs an admission nothing extra.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, StrictBool

from proxy.ledger.api_keys import LIMIT_FIELDS, Limits
from proxy.ledger.keys import ORGS_KEY, org_key
from proxy.store.client import Redis

MAX_END_USER_ID = 256
"""Characters of an end-user id (``X-On-Behalf-Of``); its tag is at most 2 * 4 * 256 + 2 bytes."""
USER_LIMIT_FIELDS = tuple(f"u_{name}" for name in LIMIT_FIELDS)
_FLAG_FIELDS = ("u_required", "u_track")


def valid_end_user(value: str) -> bool:
    return 0 < len(value) <= MAX_END_USER_ID and value.isprintable()


class EndUserPolicy(BaseModel):
    """What an org asks of its end users' requests."""

    model_config = ConfigDict(extra="forbid")

    require_on_behalf_of: StrictBool = False
    """Every LLM request of the org must name its end user (400 otherwise)."""
    track_spend: StrictBool = False
    """Keep every named end user's spend even where no budget or limit applies to them, so a
    budget created later is judged against the window's real spend."""
    limits: Limits = Limits()
    """Rate limits for each end user of the org separately."""


class EndUserPolicies:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def get(self, org_id: str) -> EndUserPolicy:
        names = (*_FLAG_FIELDS, *USER_LIMIT_FIELDS)
        values = await self._redis.hmget(org_key(org_id, "limits"), *names)
        found = dict(zip(names, values, strict=True))
        return EndUserPolicy(
            require_on_behalf_of=found["u_required"] == "1",
            track_spend=found["u_track"] == "1",
            limits=Limits(
                **{
                    name: int(value)
                    for name in LIMIT_FIELDS
                    if (value := found[f"u_{name}"]) is not None
                }
            ),
        )

    async def put(self, org_id: str, policy: EndUserPolicy) -> EndUserPolicy:
        """Replaces the policy: anything left out is off. The org's own limits stay."""
        key = org_key(org_id, "limits")
        values: dict[str, str] = {
            f"u_{name}": str(value)
            for name, value in policy.limits.model_dump(exclude_none=True).items()
        }
        if policy.track_spend:
            values["u_track"] = "1"
        if values:
            values["u_on"] = "1"  # the admit script looks end users up from now on (it stays)
        if policy.require_on_behalf_of:
            values["u_required"] = "1"
        pipe = self._redis.pipeline(transaction=True)
        pipe.hdel(key, *_FLAG_FIELDS, *USER_LIMIT_FIELDS)
        if values:
            pipe.hset(key, mapping=values)
        pipe.sadd(ORGS_KEY, org_id)
        await pipe.execute()
        return policy
