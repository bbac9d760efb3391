"""The ledger's names are built in one place: ``proxy.ledger.keys`` for Python and, through
the names it puts into composed scripts, for Lua. No Redis needed."""

from __future__ import annotations

import re
from importlib import resources

import pytest

from proxy.ledger import keys, scripts


def lua_files() -> dict[str, str]:
    folder = resources.files("proxy.ledger").joinpath("lua")
    return {f.name: f.read_text() for f in folder.iterdir() if f.name.endswith(".lua")}


def test_no_script_spells_a_key_suffix_or_a_scope_tag() -> None:
    """Keys are the org prefix and a K.<name>; tags are TAG.<name> (keys.py has both)."""
    inline = re.compile(r"\bP \.\. '|'(?:k|u|ud|o):'|'ud'")
    for name, source in lua_files().items():
        assert not inline.search(source), f"{name} spells a key suffix or a tag inline"


def test_every_script_is_small() -> None:
    for name, source in lua_files().items():
        assert source.count("\n") <= 150, name


def test_composed_scripts_name_only_known_keys() -> None:
    for script in (scripts.ADMIT, scripts.SETTLE, scripts.RECLAIM, scripts.PUT_BUDGET):
        assert not re.search(r"\b(K|TAG)\.[a-z_]", script.source), script.name
    with pytest.raises(KeyError):
        keys.lua_names("local h = P .. K.no_such_key")


def test_literals_are_folded() -> None:
    assert keys.lua_names("x = '(' .. TAG.user .. '%x+)'") == "x = '(u:%x+)'"
    assert keys.lua_names("x = P .. K.lease .. rid") == "x = P .. 'lease:' .. rid"


@pytest.mark.parametrize(
    ("scope", "scope_id", "owner", "field"),
    [
        ("apikey", "key_1", "org", "k:key_1:org"),
        ("org", "acme", "cluster", "o:cluster"),
        ("external_user", "ann", "org", "u:616e6e:org"),
        ("external_user_default", "", "cluster", "ud:cluster"),
    ],
)
def test_budget_fields_round_trip(
    scope: keys.Scope, scope_id: str, owner: str, field: str
) -> None:
    assert keys.budget_field(scope, scope_id, owner) == field
    assert keys.budget_scope(field) == scope
    assert keys.budget_owner(field) == owner
    if scope == "apikey":
        assert keys.budget_key_id(field) == scope_id


def test_key_names() -> None:
    assert keys.org_key("acme", "spend", "k:key_1", "2026-12-07") == (
        "bp:{o:acme}:spend:k:key_1:2026-12-07"
    )
    assert keys.org_key("acme", "leases") == "bp:{o:acme}:leases"
    assert keys.counter_key("acme", "1h", 3600) == "bp:{o:acme}:usage:h:3600"
    assert keys.digest_key("ab") == "bp:kd:ab"
