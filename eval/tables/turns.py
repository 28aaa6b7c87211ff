"""The multi-turn table: each row's accuracy on the scored turn after a ground-truth first turn, beside its accuracy
on the same questions asked alone, and the drop (:mod:`eval.multiturn`'s ``<task>`` and ``<task>_single``).

A spec names its two columns with ``multiturn: {turn2: <column>, alone: <column>}``; each row's mode is its
``multiturn`` model arg (``cache``, the default, or ``reprefill``). The drop is turn 2 minus alone, in points: what
asking the question second costs the method, against its own single-turn accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from eval.tables.spec import TableSpec

MISSING = "—"


@dataclass(frozen=True)
class TurnRow:
    """One row: method, tokens, multiturn mode, accuracy alone and at turn 2 (None where not run)."""

    method: str
    tokens: int
    mode: str
    alone: float | None
    turn2: float | None

    @property
    def drop(self) -> float | None:
        """Turn 2 minus alone, in the columns' unit (points for a % scale)."""
        return None if self.alone is None or self.turn2 is None else self.turn2 - self.alone


def turn_rows(spec: TableSpec, ours: dict[str, dict[str, float]]) -> list[TurnRow]:
    """The spec's rows with their two columns from ``ours`` (``{row id: {column: value}}``, as ``collect`` reads)."""
    if spec.multiturn is None:
        raise ValueError(f"spec {spec.name} names no multiturn columns: expected multiturn: {{turn2: .., alone: ..}}")
    turn2, alone = spec.multiturn
    rows = []
    for row in spec.rows:
        values = ours.get(row.id, {})
        mode = str(row.model_args.get("multiturn", "cache"))
        rows.append(TurnRow(row.method, row.tokens, mode, values.get(alone), values.get(turn2)))
    return rows


def _fmt(value: float | None, sign: bool = False) -> str:
    return MISSING if value is None else (f"{value:+.1f}" if sign else f"{value:.1f}")


def turns_markdown(spec: TableSpec, rows: Sequence[TurnRow]) -> str:
    """The table: | Method | Tokens | multiturn | alone | turn 2 | drop |."""
    turn2, alone = spec.multiturn or ("turn 2", "alone")
    lines = [
        f"### {spec.title}: turn 2 against the same question alone", "",
        f"{alone}: the scored questions asked alone; {turn2}: asked after a first turn about the same image answered "
        "by its ground truth; drop: turn 2 minus alone. cache: turn 2 continues turn 1's KV cache (a method's choice "
        "of turn 1 kept); reprefill: the whole conversation again (the method chooses for turn 2).", "",
        f"| Method | Tokens | multiturn | {alone} | {turn2} | drop |", "|---|---:|---|---:|---:|---:|",
    ]  # fmt: skip
    for row in rows:
        lines.append(
            f"| {row.method} | {row.tokens} | {row.mode} | {_fmt(row.alone)} | {_fmt(row.turn2)} | "
            f"{_fmt(row.drop, sign=True)} |"
        )
    return "\n".join(lines) + "\n"
