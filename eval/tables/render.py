"""Render a table: each cell ours and the paper's, Avg retention as the paper computes it, CSV and a plot.

Avg (the paper's definition): the mean over benchmarks of score / vanilla score, in %. Ours is computed against our
vanilla run on the benchmarks both rows have; the paper's is recomputed from its own rows and compared with the
published figure, which is flagged when the two differ by more than ``tolerance`` (Table 1, FastV at 128 tokens:
84.4 recomputed, 83.5 published). Figures a spec lists as published elsewhere (a method's Avg in another paper's
harness, ``published:``) are shown beside ours in the Avg cell, each marked with a note giving its harness and source.
"""

from __future__ import annotations

import csv
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from eval.tables.spec import Published, TableSpec

DEFAULT_TOLERANCE = 0.1  # the paper rounds Avg to 0.1
MISSING = "—"
MARKS = "¹²³⁴⁵⁶⁷⁸⁹"  # notes on figures published elsewhere, in the spec's order


@dataclass
class PaperRow:
    """One row of the paper's CSV: benchmark values and the published Avg (%)."""

    values: dict[str, float]
    published: float | None


@dataclass
class TableRow:
    """A rendered row: our and the paper's values per column, and the Avg retention of both."""

    method: str
    tokens: int
    ours: dict[str, float] = field(default_factory=dict)
    paper: dict[str, float] = field(default_factory=dict)
    avg_ours: float | None = None
    avg_ours_count: int = 0
    avg_paper: float | None = None
    avg_published: float | None = None
    flagged: bool = False
    achieved: tuple[float, float] | None = None  # an in-LLM method's layer-average in our runs (inputs, outputs)
    elsewhere: tuple[Published, ...] = ()  # this method's Avg at these tokens as published in other harnesses

    @property
    def avg_paper_or_published(self) -> float | None:
        """The paper's Avg recomputed from its row, or its published Avg where it gives no per-benchmark numbers."""
        return self.avg_paper if self.avg_paper is not None else self.avg_published

    @property
    def avg_delta(self) -> float | None:
        """Our Avg minus the paper's (recomputed; published where the paper gives only the Avg), in points."""
        if self.avg_ours is None or self.avg_paper_or_published is None:
            return None
        return self.avg_ours - self.avg_paper_or_published


def read_paper(path: str | Path) -> dict[tuple[str, int], PaperRow]:
    """The paper's CSV (``method, tokens, <benchmarks>..., avg_published``) keyed by (method, tokens)."""
    rows: dict[tuple[str, int], PaperRow] = {}
    with open(path, newline="") as handle:
        for record in csv.DictReader(handle):
            published = record.pop("avg_published", "") or None
            key = (record.pop("method"), int(record.pop("tokens")))
            rows[key] = PaperRow({k: float(v) for k, v in record.items() if v}, float(published) if published else None)
    return rows


def retention(values: dict[str, float], base: dict[str, float], columns: Sequence[str]) -> tuple[float | None, int]:
    """(mean of values[c] / base[c] over the columns both have, in %; how many columns that was)."""
    ratios = [values[c] / base[c] for c in columns if c in values and c in base and base[c]]
    return (100.0 * sum(ratios) / len(ratios), len(ratios)) if ratios else (None, 0)


def _order(spec: TableSpec, keys: set[tuple[str, int]], paper_keys: Sequence[tuple[str, int]]) -> list:
    """Baseline first, then by tokens (descending), methods in the paper's order, then the spec's."""
    methods = list(dict.fromkeys([m for m, _ in paper_keys] + [r.method for r in spec.rows]))
    return sorted(keys, key=lambda k: (k != spec.baseline, -k[1], methods.index(k[0])))


def build_table(
    spec: TableSpec, ours: dict[str, dict[str, float]], tolerance: float = DEFAULT_TOLERANCE,
    achieved: dict[str, tuple[float, float]] | None = None,
) -> list[TableRow]:  # fmt: skip
    """Rows with our values (``{row id: {column: value}}``), the paper's, and both Avg retentions; ``achieved``
    (``{row id: (inputs, outputs)}``): the visual tokens our in-LLM method rows averaged."""
    paper = read_paper(spec.paper) if spec.paper else {}
    columns = [b.column for b in spec.benchmarks]
    ours_by_key = {(r.method, r.tokens): ours[r.id] for r in spec.rows if r.id in ours}
    achieved_by_key = {(r.method, r.tokens): (achieved or {})[r.id] for r in spec.rows if r.id in (achieved or {})}
    # a paper row with only its Avg (Table 14's 192/128 and VisionZip-FT rows) is shown too
    keys = set(ours_by_key) | {
        k for k, p in paper.items() if p.published is not None or any(c in p.values for c in columns)
    }
    elsewhere: dict[tuple[str, int], tuple[Published, ...]] = {}
    for figure in spec.published:
        elsewhere[(figure.method, figure.tokens)] = (*elsewhere.get((figure.method, figure.tokens), ()), figure)
    keys |= set(elsewhere)
    base_ours = ours_by_key.get(spec.baseline, {})
    base_paper = paper[spec.baseline].values if spec.baseline in paper else {}
    rows = []
    for method, tokens in _order(spec, keys, list(paper)):
        key = (method, tokens)
        row = TableRow(method, tokens, ours_by_key.get(key, {}), achieved=achieved_by_key.get(key))
        row.elsewhere = elsewhere.get(key, ())
        if (method, tokens) in paper:
            entry = paper[(method, tokens)]
            row.paper = {c: entry.values[c] for c in columns if c in entry.values}
            row.avg_paper, _ = retention(row.paper, base_paper, columns)
            row.avg_published = entry.published
            if row.avg_paper is not None and row.avg_published is not None:
                row.flagged = abs(row.avg_paper - row.avg_published) > tolerance + 1e-9
        row.avg_ours, row.avg_ours_count = retention(row.ours, base_ours, columns)
        rows.append(row)
    return rows


def _fmt(value: float | None, digits: int = 1) -> str:
    return MISSING if value is None or math.isnan(value) else f"{value:.{digits}f}"


def mark(spec: TableSpec, figure: Published) -> str:
    """The note mark of a figure published elsewhere (its place in the spec's ``published`` list)."""
    index = spec.published.index(figure)
    return MARKS[index] if index < len(MARKS) else f"[{index + 1}]"


def _avg_cell(row: TableRow, columns: int, spec: TableSpec) -> str:
    """``ours / the paper's``; figures published elsewhere after it, marked: ``94.2 / 94.0; 94.4¹``, or in place of
    a paper's figure the row lacks: ``95.1 / 97.0¹``."""
    ours = _fmt(row.avg_ours) + (f" ({row.avg_ours_count}/{columns})" if 0 < row.avg_ours_count < columns else "")
    paper = _fmt(row.avg_paper)
    if row.flagged:
        paper += f" ⚠ published {_fmt(row.avg_published)}"
    elif row.avg_published is not None and _fmt(row.avg_published) != paper:
        paper += f" (published {_fmt(row.avg_published)})"  # within rounding: both shown
    others = "; ".join(f"{_fmt(f.avg)}{mark(spec, f)}" for f in row.elsewhere)
    if others:
        paper = others if row.avg_paper is None and row.avg_published is None else f"{paper}; {others}"
    return f"{ours} / {paper}"


def _cells(row: TableRow, columns: Sequence[str], with_paper: bool, spec: TableSpec) -> list[str]:
    """The benchmark cells and the Avg cell of one row (``ours / paper``, or ours alone without a paper)."""
    if not with_paper:
        count = f" ({row.avg_ours_count}/{len(columns)})" if 0 < row.avg_ours_count < len(columns) else ""
        return [_fmt(row.ours.get(c)) for c in columns] + [_fmt(row.avg_ours) + count]
    delta = MISSING if row.avg_delta is None else f"{row.avg_delta:+.1f}"
    cells = [f"{_fmt(row.ours.get(c))} / {_fmt(row.paper.get(c))}" for c in columns]
    return [*cells, _avg_cell(row, len(columns), spec), delta]


def _tokens_cell(row: TableRow) -> str:
    """``64``, or ``64 (63.8 in, 61.2 out)`` where our in-LLM method's run reports what it achieved."""
    if row.achieved is None:
        return str(row.tokens)
    return f"{row.tokens} ({row.achieved[0]:.1f} in, {row.achieved[1]:.1f} out)"


def markdown(spec: TableSpec, rows: Sequence[TableRow]) -> str:
    """The table in the paper's layout; each cell ``ours / paper``; notes on splits and flags below."""
    columns = [b.column for b in spec.benchmarks]
    with_paper = spec.paper is not None or bool(spec.published)
    legend = "Each cell: ours / the paper's published number. " if with_paper else ""
    if spec.published:
        legend += f"Avg figures marked {MARKS[0]}...: published in another harness (notes). "
    lines = [f"### {spec.title}", "", legend + "Avg: retention % vs the vanilla row (the paper's definition).", ""]
    extra = ["Avg %", "Δ Avg"] if with_paper else ["Avg %"]
    lines.append("| Method | Tokens | " + " | ".join(columns + extra) + " |")
    lines.append("|---|---:|" + "---:|" * (len(columns) + len(extra)))
    for row in rows:
        lines.append(
            f"| {row.method} | {_tokens_cell(row)} | " + " | ".join(_cells(row, columns, with_paper, spec)) + " |"
        )
    notes = [f"- **{b.column}** (`{', '.join(b.tasks)}`, {b.split or 'default split'}): {b.note}"
             for b in spec.benchmarks if b.note]  # fmt: skip
    notes += [
        f"- ⚠ {r.method} at {r.tokens} tokens: the paper publishes Avg {_fmt(r.avg_published)}, its own row gives "
        f"{_fmt(r.avg_paper)}." for r in rows if r.flagged
    ]  # fmt: skip
    notes += [
        f"- {mark(spec, f)} {f.method} at {f.tokens} tokens: Avg {_fmt(f.avg)} % in {f.harness}'s harness "
        f"(its benchmarks and vanilla row, not this table's): {f.source}" for f in spec.published
    ]  # fmt: skip
    if any(r.achieved for r in rows):
        notes.append(
            "- Tokens `64 (63.8 in, 61.2 out)`: the nominal budget, and the layer-average of visual tokens our "
            "in-LLM method's run achieved, counting what each layer takes in and what it puts out."
        )
    notes += [f"- {note}" for note in spec.notes]
    return "\n".join(lines + (["", *notes] if notes else [])) + "\n"


def write_csv(spec: TableSpec, rows: Sequence[TableRow], path: str | Path) -> Path:
    """Long format: one line per (row, column) plus one ``Avg %`` line per row."""
    header = ["method", "tokens", "column", "ours", "paper", "delta", "paper_published", "flag"]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            for column in [b.column for b in spec.benchmarks]:
                ours, paper = row.ours.get(column), row.paper.get(column)
                delta = ours - paper if ours is not None and paper is not None else None
                writer.writerow([row.method, row.tokens, column, ours, paper, delta, None, ""])
            flag = "published avg differs from recomputed" if row.flagged else ""
            writer.writerow([row.method, row.tokens, "Avg %", row.avg_ours, row.avg_paper, row.avg_delta,
                             row.avg_published, flag])  # fmt: skip
            for figure in row.elsewhere:  # the ours / published pair; delta across harnesses
                delta = None if row.avg_ours is None else row.avg_ours - figure.avg
                writer.writerow([row.method, row.tokens, f"Avg % ({figure.harness}'s harness)", row.avg_ours,
                                 figure.avg, delta, figure.avg, figure.source])  # fmt: skip
    return Path(path)


def plot(spec: TableSpec, rows: Sequence[TableRow], path: str | Path) -> Path:
    """Avg retention (%) vs visual tokens: the paper's points (hollow, dashed) and ours (filled, solid)."""
    figure = Figure(figsize=(8.4, 4.2), layout="constrained")
    axes = figure.add_subplot()
    methods = list(dict.fromkeys(r.method for r in rows if (r.method, r.tokens) != spec.baseline))
    for i, method in enumerate(methods):
        colour = f"C{i % 10}"
        mine = sorted((r.tokens, r.avg_ours) for r in rows if r.method == method and r.avg_ours is not None)
        theirs = sorted(
            (r.tokens, r.avg_paper_or_published) for r in rows if r.method == method and r.avg_paper_or_published
        )
        if theirs:
            axes.plot(*zip(*theirs, strict=True), "o--", color=colour, mfc="none", label=f"{method} (paper)")
        if mine:
            axes.plot(*zip(*mine, strict=True), "o-", color=colour, label=f"{method} (ours)")
        others = sorted((r.tokens, f.avg) for r in rows if r.method == method for f in r.elsewhere)
        if others:
            axes.plot(*zip(*others, strict=True), "*", color=colour, ms=9, label=f"{method} (published elsewhere)")
    flagged = [(r.tokens, r.avg_published) for r in rows if r.flagged]
    if flagged:
        axes.plot(*zip(*flagged, strict=True), "kx", label="published Avg (differs from its row)")
    axes.axhline(100.0, color="gray", lw=0.8, ls=":", label=f"{spec.baseline[0]} ({spec.baseline[1]} tokens)")
    axes.set(xlabel="visual tokens", ylabel="Avg retention (%)")
    axes.set_title(textwrap.fill(spec.title, 70), fontsize=10)  # wrapped: a long title is not cut off at the sides
    axes.grid(alpha=0.3)
    figure.legend(loc="outside right upper", fontsize=7)  # beside the axes, where it covers no point
    figure.savefig(path, dpi=120)
    return Path(path)
