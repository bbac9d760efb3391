"""The ledger's scripts, composed at load time from one small ``.lua`` file per rule.

Redis has no include, and a request must stay one round trip: so each script called is the
concatenation of the key names (``keys.lua_prelude()``, generated from ``proxy.ledger.keys``),
the rule files it needs, and its own body. Each rule file keeps to one concern, the way a
rate-limit library keeps one script per algorithm; what they share is local functions.
"""

from __future__ import annotations

from importlib import resources

from proxy.ledger.keys import lua_names, lua_prelude
from proxy.store.scripts import LuaScript

_LUA = resources.files("proxy.ledger").joinpath("lua")


def compose(*files: str) -> str:
    """The prelude, then ``files`` (``lua/<name>.lua``) in order: each may use what the ones
    before it define. Key suffixes and scope tags become literals here (``keys.lua_names``)."""
    parts = [lua_prelude()]
    parts.extend(_LUA.joinpath(f"{name}.lua").read_text() for name in files)
    return lua_names("\n".join(parts))


def script(*files: str) -> LuaScript:
    return LuaScript(files[-1], compose(*files))


_BOOKS = ("prelude", "events", "leases", "budget_fields", "spend")
"""What every charge needs: numbers, crossings, leases, budget fields, spend."""
_CHARGES = (*_BOOKS, "usage_counters", "reclaims")

ADMIT = script(
    *_CHARGES, "rate_limits", "scopes", "budgets", "clamp", "end_user_cap", "admit"
)
SETTLE = script(*_CHARGES, "settle_one", "settle")
SETTLE_BATCH = script(*_CHARGES, "settle_one", "settle_batch")
RECLAIM = script(*_CHARGES, "reclaim")
PUT_BUDGET = script("prelude", "events", "budget_put")
HASH_SWAP = script("hash_swap")
KEY_RECORD = script("key_record")
KEY_INDEX = script("key_index")
OUTBOX = script("webhook_outbox")
