"""Rows for humans and for scripts: an aligned text table (numbers right-aligned, an optional
totals line under a rule), CSV, and JSON. The admin commands print through here."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

NANO = Decimal(1_000_000_000)

Row = dict[str, Any]


def money(nano: int | str) -> str:
    """Nano-units as the major amount, exact (every digit of a nano kept)."""
    return f"{Decimal(int(nano)) / NANO:.9f}"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _numeric(value: Any) -> bool:
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        return True
    return isinstance(value, str) and value.replace(".", "", 1).replace(",", "").isdigit()


def table(columns: Sequence[tuple[str, str]], rows: Sequence[Row], total: Row | None = None) -> str:
    """``columns`` are (field, heading) pairs; a number column is right-aligned."""
    body = [[_cell(row.get(name)) for name, _ in columns] for row in rows]
    footer = (
        [_cell(total.get(name)) if name in total else "" for name, _ in columns] if total else None
    )
    numeric = [
        bool(rows) and all(_numeric(row.get(name)) or row.get(name) is None for row in rows)
        for name, _ in columns
    ]
    lines = [[heading for _, heading in columns], *body]
    if footer:
        lines.append(footer)
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]

    def render(cells: Sequence[str]) -> str:
        out = [
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(cells, widths, numeric, strict=True)
        ]
        return "  ".join(out).rstrip()

    text = [render(lines[0]), render(["-" * w for w in widths])]
    text.extend(render(cells) for cells in body)
    if footer:
        text.append(render(["-" * w for w in widths]))
        text.append(render(footer))
    return "\n".join(text)


def to_csv(columns: Sequence[str], rows: Sequence[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(name) is None else row.get(name) for name in columns])
    return buffer.getvalue()


def to_json(payload: Any) -> str:
    return json.dumps(payload, indent=2)
