"""The rules a reservation meets before admission: a worst case the ledger can record
exactly, and the terms on which the admit script may lower (clamp) its output cap."""

from __future__ import annotations

from collections.abc import Mapping

from proxy.dialects.base import Reservation
from proxy.errors import bad_request
from proxy.ledger.admission import ClampTerms

CLAMP_HEADER = "x-budget-clamp"
MAX_EXACT = 2**53 - 1
"""Reservations are checked in Lua, whose numbers are doubles: exact only up to here."""


def check_reservation(tokens: int, cost_nano: int, param: str | None) -> None:
    """A worst case no ledger could record exactly is refused up front (400), before anything
    is reserved: it could never be paid for anyway."""
    if tokens > MAX_EXACT or cost_nano > MAX_EXACT:
        raise bad_request(
            f"This request's worst case ({tokens} tokens, {cost_nano} nano-units) is too large "
            "to account for; lower the output cap or the number of choices.",
            param=param or "max_tokens",
            code="reservation_too_large",
        )


def clamp_terms(reservation: Reservation, lowest: int) -> ClampTerms | None:
    """What the admit script needs to lower the output cap instead of refusing; None when it
    cannot be lowered: no output, already at or below ``lowest``, or a cost that does not
    follow the clamp formula exactly."""
    if reservation.input_cost is None or reservation.choices < 1:
        return None
    if reservation.output_tokens % reservation.choices:
        return None
    cap = reservation.output_tokens // reservation.choices
    if cap <= lowest:
        return None
    exact = reservation.input_cost + reservation.output_tokens * reservation.output_rate
    if -(-exact // 1_000_000) != reservation.cost_nano:
        return None
    return ClampTerms(
        reservation.choices, cap, lowest, reservation.input_cost, reservation.output_rate
    )


def clamp_asked(headers: Mapping[str, str]) -> bool:
    value = headers.get(CLAMP_HEADER)
    if value is None:
        return False
    if value.lower() not in ("true", "false"):
        raise bad_request(f"{CLAMP_HEADER} must be 'true' or 'false'.", param=CLAMP_HEADER)
    return value.lower() == "true"
