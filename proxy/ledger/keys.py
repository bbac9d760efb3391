"""Every Redis key name and every budget field, built here and only here.

Everything one admission touches carries the org's hash tag (``bp:{o:<org>}:``), so the same
scripts work on one Redis, under Sentinel and on a cluster. Only the key-digest index, the
key-to-org index and the org set are global (they are read before the org is known); on a
cluster they live in slots of their own, and nothing writes them in one transaction with an
org's keys.

The Lua scripts name the same keys: ``lua_prelude()`` renders ``SUFFIX`` and the scope tags
into a Lua table that is put in front of every ledger script when it is loaded, so a suffix
is spelled once, in this file, for both languages.

Scope tags and budget fields. A scope whose spend is kept has a tag: ``k:<key id>``, ``o``
(the org), ``u:<hex of the end-user id's UTF-8 bytes>`` (nothing in it can break a key name, a
field or the hash tag). A budget is the field ``<tag>:<owner>`` of the org's budget hashes,
or ``ud:<owner>`` for the org's default for each end user (no spend of its own: it judges
each end user's).
"""

from __future__ import annotations

import re
from typing import Literal

ORGS_KEY = "bp:orgs"
"""The set of orgs that ever had a key, a limit or a budget (the sweeper walks it)."""
SWEEPER_LOCK = "bp:sweeper"
"""Held by the one process sweeping expired leases this round."""
_DIGEST = "bp:kd:"
_KEY_ORG = "bp:ki:"
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")

SUFFIX: dict[str, str] = {
    "key": "key:",  # key:<kid>  hash: one API key's record (status, limits, digest, ...)
    "keys": "keys",  # set: the org's key ids
    "limits": "limits",  # hash: the org's limits and its end-user policy
    "budgets": "budgets",  # hash: field -> budget JSON
    "budget_rules": "budget_rules",  # hash: field -> what the request path needs of it
    "budget_ids": "budget_ids",  # hash: field -> id (kept across a replace)
    "spend": "spend:",  # spend:<tag>:<window>  hash: c (nano-units), t (tokens)
    "infl": "infl:",  # infl:<tag>  hash: n, c, t of the scope's live leases
    "rl": "rl:",  # rl:<tag>  hash: rate-limit levels and when they were drained
    "lease": "lease:",  # lease:<rid>  hash: one admitted request's reservation
    "leases": "leases",  # zset: rid by lease expiry (ms)
    "stuck": "leases:stuck",  # zset: records set aside, by when
    "stuck_why": "leases:stuck:why",  # hash: rid -> why
    "done": "done:",  # done:<rid>  tombstone of a settle that found nothing to settle
    "reclaimed": "reclaimed:",  # reclaimed:<rid>  what a reclaim charged, for a late settle
    "usage": "usage",  # stream: one record per charge
    "response": "rsp:",  # rsp:<response id>  string: the upstream storing the org's response
    "counters": "usage:",  # usage:<m|h|d>:<bucket start>  hash: usage counters
    "fired": "fired:",  # fired:<budget id>[:<tag>]:<window>  set: crossings recorded
    "events": "events:",  # events:<tag | ud>  list: budget events, newest first
    "delivery": "wh:",  # wh:<event id>  hash: one webhook delivery
    "outbox": "outbox",  # zset: deliveries due, by when
    "whlog": "whlog",  # zset: deliveries done, by when
    "users_seen": "users:",  # users:<month>  set: end users named this month (hashed)
}
"""Suffixes of an org's keys (after ``org_prefix``), by the name both languages use."""

KEY_TAG = "k:"
ORG_TAG = "o"
USER_TAG = "u:"
USER_DEFAULT = "ud"
"""The budget-field head (and events list) of the org's default for each end user."""
OWNERS = ("cluster", "org")

USAGE_SEP = "\x1f"
"""Separates the dimensions of a usage-counter field (key, model, endpoint, end user)."""
COUNTER_WIDTHS = {"1m": "m", "1h": "h", "1d": "d"}

Scope = Literal["apikey", "org", "external_user", "external_user_default"]


def valid_id(value: str) -> bool:
    """Ids become part of Redis key names; a narrow alphabet keeps tags and separators intact."""
    return bool(_ID_PATTERN.match(value))


def org_prefix(org_id: str) -> str:
    return f"bp:{{o:{org_id}}}:"


def org_key(org_id: str, name: str, *parts: str) -> str:
    """``org_key(org, "spend", tag, window)`` -> ``bp:{o:<org>}:spend:<tag>:<window>``."""
    return org_prefix(org_id) + SUFFIX[name] + ":".join(parts)


def digest_key(digest: str) -> str:
    """The global index entry of a key's SHA-256 digest (how a bearer token finds its org)."""
    return _DIGEST + digest


def key_org_key(key_id: str) -> str:
    """The global key id -> org id index."""
    return _KEY_ORG + key_id


def counter_key(org_id: str, width: str, start: int) -> str:
    return f"{org_prefix(org_id)}{SUFFIX['counters']}{COUNTER_WIDTHS[width]}:{start}"


# Scope tags and budget fields.


def key_tag(key_id: str) -> str:
    return KEY_TAG + key_id


def end_user_tag(value: str) -> str:
    """The ledger's name for an end user (``valid_end_user`` first: printable text has no
    surrogates, so it always encodes)."""
    return USER_TAG + value.encode("utf-8").hex()


def spend_tag(scope: Scope, scope_id: str) -> str:
    """The scope whose spend a budget judges; the default for each end user has none ("")."""
    if scope == "apikey":
        return key_tag(scope_id)
    if scope == "external_user":
        return end_user_tag(scope_id)
    if scope == "external_user_default":
        return ""
    return ORG_TAG


def budget_field(scope: Scope, scope_id: str, owner: str) -> str:
    if scope == "external_user_default":
        return f"{USER_DEFAULT}:{owner}"
    return f"{spend_tag(scope, scope_id)}:{owner}"


def events_tag(scope: Scope, scope_id: str) -> str:
    return USER_DEFAULT if scope == "external_user_default" else spend_tag(scope, scope_id)


def budget_scope(field: str) -> Scope:
    """The API's scope name of a budget field."""
    if field.startswith(KEY_TAG):
        return "apikey"
    if field.startswith(USER_TAG):
        return "external_user"
    if field.startswith(USER_DEFAULT + ":"):
        return "external_user_default"
    return "org"


def budget_owner(field: str) -> str:
    return field.rsplit(":", 1)[1]


def budget_key_id(field: str) -> str:
    """The key id of an ``apikey`` budget's field (``k:<kid>:<owner>``)."""
    return field[len(KEY_TAG) :].rpartition(":")[0]


def is_end_user_field(field: str) -> bool:
    """Whether the field budgets end users (the org then looks their budgets up)."""
    return field.startswith((USER_TAG, USER_DEFAULT + ":"))


def _lua_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


LUA_TAGS = {"key": KEY_TAG, "org": ORG_TAG, "user": USER_TAG, "user_default": USER_DEFAULT}
_LUA_NAME = re.compile(r"\b(K|TAG)\.([a-z_]+)\b")


_LUA_CONCAT = re.compile(r"'([^'\\]*)' \.\. '([^'\\]*)'")


def lua_names(source: str) -> str:
    """``source`` with every ``K.<name>`` (a key suffix) and ``TAG.<name>`` (a scope tag)
    replaced by its string literal, and literals joined by ``..`` folded into one: spelled
    once, here, and costing a script nothing at run time (Lua 5.1 does not fold constants).
    An unknown name raises KeyError when the script is composed (at import)."""

    def literal(match: re.Match[str]) -> str:
        table = SUFFIX if match[1] == "K" else LUA_TAGS
        return _lua_string(table[match[2]])

    source = _LUA_NAME.sub(literal, source)
    folded = _LUA_CONCAT.sub(r"'\1\2'", source)
    while folded != source:
        source, folded = folded, _LUA_CONCAT.sub(r"'\1\2'", folded)
    return source


def lua_prelude() -> str:
    """The Lua constants of this module that scripts iterate over or compare with, put in front
    of every ledger script; literals only, so defining them costs a call next to nothing."""
    own1, own2 = (f":{owner}" for owner in OWNERS)
    widths = ", ".join(
        f"{{{_lua_string(code)}, {seconds}}}"
        for code, seconds in zip(COUNTER_WIDTHS.values(), (60, 3600, 86400), strict=True)
    )
    return (
        "-- Generated from proxy/ledger/keys.py (K.<name> and TAG.<name> are replaced by their\n"
        "-- literals when a script is composed: proxy/ledger/scripts.py).\n"
        f"local OWNERS = {{{', '.join(_lua_string(o) for o in OWNERS)}}}\n"
        f"local OWN1, OWN2 = {_lua_string(own1)}, {_lua_string(own2)}\n"
        f"local ORG_FIELD1, ORG_FIELD2 = {_lua_string(ORG_TAG + own1)}, "
        f"{_lua_string(ORG_TAG + own2)}\n"
        f"local USAGE_WIDTHS = {{{widths}}} -- usage counter buckets: code, seconds\n"
        "local USAGE_SEP = '\\31'\n"
    )
