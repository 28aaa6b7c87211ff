"""One table spec run with several training seeds: mean ± sd per cell, and paired tests between rows over the seeds.

Each seed's results folder has the grid runner's layout (``<dir>/<row id>/<task>/<model>/<date>_results.json`` and
``<date>_samples_<task>.jsonl``). Cells and the Avg retention are read from the aggregated results, as
``python -m eval.tables`` reads them; a comparison of two rows reads the per-question scores of the samples files
(both rows must have answered the same questions in every seed) and tests each seed's mean difference: the variation
that decides whether a method is better is between training seeds, not between the questions of one model.

Usage::

    python -m eval.tables.seeds --spec eval/tables/table1.yaml \
        --results playground/eval/seed0 playground/eval/seed1 playground/eval/seed2 \
        --compare "VisionZip|Random patches" --compare "VisionZip|Dominant only" --out playground/eval/seeds
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eval.tables.render import MISSING, retention
from eval.tables.results import collect
from eval.tables.seedtest import (  # fmt: skip
    BOOTSTRAPS,
    EFFECT,
    PERMUTATIONS,
    Comparison,
    comparison_lines,
    legend,
    seed_test,
)
from eval.tables.spec import Benchmark, Row, TableSpec, load_spec

logger = logging.getLogger(__name__)

SAMPLES_INFIX = "_samples_"  # lmms-eval: <date>_samples_<task>.jsonl


class NotPerQuestion(ValueError):
    """A column without one number per question (several parts, or a metric lmms-eval aggregates from dicts)."""


# ---------------------------------------------------------------------------------------------------- reading


def samples_files(folder: Path, task: str) -> list[Path]:
    """Every ``<date>_samples_<task>.jsonl`` under ``folder``, oldest first (by mtime, then name)."""
    if not folder.is_dir():
        return []
    found = [
        p for p in folder.rglob(f"*{SAMPLES_INFIX}*.jsonl") if p.name.split(SAMPLES_INFIX, 1)[1] == f"{task}.jsonl"
    ]
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))


def per_doc(results_dir: str | Path, row: Row, benchmark: Benchmark) -> dict[int, float]:
    """``{doc_id: metric * scale}`` of one row and (single-part) column, from the newest samples file of its task.

    Raises FileNotFoundError naming ``<results_dir>/<row id>`` when no samples file is there, NotPerQuestion when
    the column has several parts or the metric's per-question value is not a number, ValueError on a doc repeated.
    """
    if len(benchmark.parts) != 1:
        raise NotPerQuestion(f"column {benchmark.column} combines {len(benchmark.parts)} parts: no per-question score")
    part = benchmark.parts[0]
    folder = Path(results_dir) / row.id
    files = samples_files(folder, part.task)
    if not files:
        raise FileNotFoundError(
            f"no {SAMPLES_INFIX}{part.task}.jsonl under {folder} (run lmms-eval with --log_samples)"
        )
    path = files[-1]
    values: dict[int, float] = {}
    with open(path) as handle:
        for line in filter(str.strip, handle):
            record = json.loads(line)
            if part.metric not in record:
                raise ValueError(f"{path}: a sample has no {part.metric!r} (keys: {sorted(record)})")
            value = record[part.metric]
            if not isinstance(value, (int, float)):
                raise NotPerQuestion(f"{path}: {part.metric} per question is a {type(value).__name__}, not a number")
            doc = int(record["doc_id"])
            if doc in values:
                raise ValueError(f"{path}: doc_id {doc} appears twice")
            values[doc] = benchmark.scale * float(value)
    return values


def doc_matrix(results_dirs: Sequence[str | Path], row: Row, benchmark: Benchmark) -> dict[int, np.ndarray]:
    """``{doc_id: scores over seeds, shape (seeds,)}``; ValueError unless every seed has the same questions."""
    seeds = [per_doc(d, row, benchmark) for d in results_dirs]
    for directory, scores in zip(results_dirs[1:], seeds[1:], strict=True):
        _same_docs(seeds[0], scores, f"{row.id} / {benchmark.column}: {results_dirs[0]} vs {directory}")
    return {doc: np.array([s[doc] for s in seeds]) for doc in sorted(seeds[0])}


def _same_docs(first: Mapping[int, object], second: Mapping[int, object], where: str) -> None:
    if first.keys() != second.keys():
        only_a, only_b = sorted(first.keys() - second.keys()), sorted(second.keys() - first.keys())
        raise ValueError(
            f"{where}: the question sets differ ({len(first)} vs {len(second)} docs; only in the first "
            f"{only_a[:5]}{'...' if len(only_a) > 5 else ''}, only in the second {only_b[:5]}"
            f"{'...' if len(only_b) > 5 else ''})"
        )


# ---------------------------------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (ddof 1; NaN for one seed) over ``n`` seeds."""

    mean: float
    sd: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat | None:
        """The statistic of ``values``; None when empty."""
        if not values:
            return None
        array = np.asarray(values, dtype=float)
        return cls(float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else math.nan, len(array))


@dataclass(frozen=True)
class SeedRow:
    """One row over seeds: each column's value, its retention vs the baseline (%), and the Avg retention (%)."""

    method: str
    tokens: int
    values: dict[str, Stat] = field(default_factory=dict)
    retention: dict[str, Stat] = field(default_factory=dict)
    avg: Stat | None = None
    avg_columns: int = 0  # the fewest columns an Avg of one seed was computed on


def summarize(spec: TableSpec, results_dirs: Sequence[str | Path]) -> list[SeedRow]:
    """Rows (baseline first, then by tokens, descending) with mean ± sd over the seeds that have each value."""
    tables = [collect(spec, d) for d in results_dirs]
    base_id = next(r.id for r in spec.rows if (r.method, r.tokens) == spec.baseline)
    out = []
    for row in _ordered_rows(spec):
        seeds = [(t[row.id], t.get(base_id, {})) for t in tables if row.id in t]
        if seeds:
            out.append(_seed_row(row, seeds, [b.column for b in spec.benchmarks]))
    return out


def _seed_row(row: Row, seeds: Sequence[tuple[dict[str, float], dict[str, float]]], columns: list[str]) -> SeedRow:
    """A row from its (values, baseline values) of each seed."""
    values = {c: Stat.of([v[c] for v, _ in seeds if c in v]) for c in columns}
    ratios = {c: Stat.of([100.0 * v[c] / b[c] for v, b in seeds if c in v and b.get(c)]) for c in columns}
    avgs = [(a, k) for a, k in (retention(v, b, columns) for v, b in seeds) if a is not None]
    return SeedRow(
        row.method, row.tokens, {c: s for c, s in values.items() if s}, {c: s for c, s in ratios.items() if s},
        Stat.of([a for a, _ in avgs]), min((k for _, k in avgs), default=0),
    )  # fmt: skip


def _ordered_rows(spec: TableSpec) -> list[Row]:
    methods = list(dict.fromkeys(r.method for r in spec.rows))
    return sorted(spec.rows, key=lambda r: ((r.method, r.tokens) != spec.baseline, -r.tokens, methods.index(r.method)))


# ---------------------------------------------------------------------------------------------------- comparisons


def compare(
    spec: TableSpec, results_dirs: Sequence[str | Path], pairs: Sequence[tuple[str, str]], seed: int = 0,
    permutations: int = PERMUTATIONS, bootstraps: int = BOOTSTRAPS, effect: float = EFFECT,
) -> tuple[list[Comparison], dict[str, str]]:  # fmt: skip
    """Each (method A, method B) at every tokens value both have, on every column with per-question scores, tested
    with seeds as the unit (:func:`seed_test` on each seed's mean over the questions both rows answered).

    Returns the comparisons and ``{column: why it was skipped}``. ValueError on an unknown method or on question
    sets that differ between rows or seeds.
    """
    cache: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    out, skipped = [], {}
    for row_a, row_b in row_pairs(spec, pairs):
        for benchmark in spec.benchmarks:
            if benchmark.column in skipped:
                continue
            try:
                first, second = (_cached(cache, results_dirs, r, benchmark) for r in (row_a, row_b))
            except NotPerQuestion as error:
                skipped[benchmark.column] = str(error)
                logger.warning("not tested: %s", error)
                continue
            _same_docs(first, second, f"{benchmark.column}: {row_a.id} vs {row_b.id}")
            a, b = (np.stack([s[doc] for doc in sorted(s)], axis=1).mean(axis=1) for s in (first, second))  # (seeds,)
            test = seed_test(a, b, len(first), permutations, bootstraps, seed, effect=effect)
            out.append(Comparison(row_a.method, row_b.method, row_a.tokens, benchmark.column, test))
    return out, skipped


def row_pairs(spec: TableSpec, pairs: Sequence[tuple[str, str]]) -> list[tuple[Row, Row]]:
    """(row A, row B) for each (method A, method B) at every tokens value both have, most tokens first."""
    by_key = {(r.method, r.tokens): r for r in spec.rows}
    unknown = sorted({m for pair in pairs for m in pair} - {m for m, _ in by_key})
    if unknown:
        raise ValueError(f"methods {unknown} are not rows of {spec.name} ({sorted({m for m, _ in by_key})})")
    out = []
    for method_a, method_b in pairs:
        tokens = sorted({t for m, t in by_key if m == method_a} & {t for m, t in by_key if m == method_b}, reverse=True)
        if not tokens:
            logger.warning("%s and %s share no tokens value: nothing to compare", method_a, method_b)
        out += [(by_key[method_a, t], by_key[method_b, t]) for t in tokens]
    return out


def _cached(
    cache: dict[tuple[str, str], dict[int, np.ndarray]], dirs: Sequence[str | Path], row: Row, benchmark: Benchmark
) -> dict[int, np.ndarray]:
    key = (row.id, benchmark.column)
    if key not in cache:
        cache[key] = doc_matrix(dirs, row, benchmark)
    return cache[key]


# ---------------------------------------------------------------------------------------------------- rendering


def _fmt(value: float | None, digits: int = 1) -> str:
    return MISSING if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _stat_cell(stat: Stat | None, seeds: int) -> str:
    if stat is None:
        return MISSING
    return f"{_fmt(stat.mean)} ± {_fmt(stat.sd)}" + (f" ({stat.n}/{seeds} seeds)" if stat.n < seeds else "")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def markdown(
    spec: TableSpec, rows: Sequence[SeedRow], comparisons: Sequence[Comparison], seeds: int,
    skipped: dict[str, str] | None = None,
) -> str:  # fmt: skip
    """Table 1: mean ± sd over seeds per cell and Avg %; table 2: the paired comparisons, with their legend."""
    columns = [b.column for b in spec.benchmarks]
    lines = [
        f"### {spec.title}: mean ± sd over {seeds} seeds",
        "",
        "Avg: retention % vs the baseline row of the same seed (mean over benchmarks of score / baseline score), "
        "then mean ± sd over seeds.",
        "",
        "| Method | Tokens | " + " | ".join([*columns, "Avg %"]) + " |",
        "|---|---:|" + "---:|" * (len(columns) + 1),
    ]
    for row in rows:
        cells = [_stat_cell(row.values.get(c), seeds) for c in columns] + [_avg_cell(row, seeds, len(columns))]
        lines.append(f"| {row.method} | {row.tokens} | " + " | ".join(cells) + " |")
    if comparisons or skipped:
        lines += ["", "### Paired comparisons, seeds as the unit", "", legend(comparisons, seeds), ""]
    lines += comparison_lines(comparisons)
    if skipped:
        lines += ["", *(f"- not tested: {column}: {why}" for column, why in skipped.items())]
    return "\n".join(lines) + "\n"


def _avg_cell(row: SeedRow, seeds: int, columns: int) -> str:
    if row.avg is None:
        return MISSING
    return _stat_cell(row.avg, seeds) + (f" ({row.avg_columns}/{columns})" if row.avg_columns < columns else "")


CSV_HEADER = ["table", "method", "method_b", "tokens", "column", "mean", "sd", "seeds", "retention_mean",
              "retention_sd", "diff", "ci_low", "ci_high", "p", "docs", "significant", "per_seed", "diff_sd",
              "p_floor", "seeds_needed", "verdict"]  # fmt: skip


def write_csv(rows: Sequence[SeedRow], comparisons: Sequence[Comparison], path: str | Path) -> Path:
    """Long format: ``summary`` lines (one per row and column, ``Avg %`` too), then ``comparison`` lines."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_HEADER)
        for row in rows:
            for column, stat in [*row.values.items(), ("Avg %", row.avg)]:
                if stat is None:
                    continue
                ratio = row.retention.get(column) if column != "Avg %" else stat
                ratios = [ratio.mean, ratio.sd] if ratio else ["", ""]
                writer.writerow(
                    ["summary", row.method, "", row.tokens, column, stat.mean, stat.sd, stat.n, *ratios, *[""] * 11]
                )
        for c in comparisons:
            t = c.test
            per_seed = ";".join(f"{x:.6g}" for x in t.per_seed)
            needed = "" if t.seeds_needed is None else t.seeds_needed
            writer.writerow(["comparison", c.a, c.b, c.tokens, c.column, "", "", t.n_seeds, "", "", t.diff, t.ci_low,
                             t.ci_high, t.p, t.n_docs, _yes(t.significant), per_seed, t.sd, t.p_floor, needed,
                             t.verdict])  # fmt: skip
    return Path(path)


# ---------------------------------------------------------------------------------------------------- CLI


def _pair(text: str) -> tuple[str, str]:
    a, sep, b = text.partition("|")
    if not sep or not a.strip() or not b.strip():
        raise argparse.ArgumentTypeError(f"expected 'METHOD A|METHOD B', got {text!r}")
    return a.strip(), b.strip()


def build_parser() -> argparse.ArgumentParser:
    """``--spec``, ``--results`` (one folder per seed), ``--compare 'A|B'`` (repeatable), ``--out``, ``--name``."""
    parser = argparse.ArgumentParser(prog="python -m eval.tables.seeds", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, required=True, help="a table or sweep spec YAML")
    parser.add_argument("--results", type=Path, nargs="+", required=True, help="one grid output folder per seed")
    parser.add_argument("--compare", type=_pair, action="append", default=[], help="'METHOD A|METHOD B'")
    parser.add_argument("--out", type=Path, required=True, help="where to write <name>.md and <name>.csv")
    parser.add_argument("--name", default=None, help="file name stem (default: <spec name>_seeds)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the permutation and bootstrap draws")
    parser.add_argument("--permutations", type=int, default=PERMUTATIONS)
    parser.add_argument("--bootstraps", type=int, default=BOOTSTRAPS)
    parser.add_argument("--effect", type=float, default=EFFECT, help="points: the real difference to size seeds for")
    return parser


def main(argv: Sequence[str] | None = None) -> str:
    """Summarize and compare; write ``<name>.md`` and ``<name>.csv``, print the Markdown and return it."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    spec = load_spec(args.spec)
    rows = summarize(spec, args.results)
    if not rows:
        logger.warning("no lmms-eval results for %s under %s", spec.name, [str(d) for d in args.results])
    comparisons, skipped = compare(
        spec, args.results, args.compare, args.seed, args.permutations, args.bootstraps, args.effect
    )
    text = markdown(spec, rows, comparisons, len(args.results), skipped)
    name = args.name or f"{spec.name}_seeds"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.md").write_text(text)
    write_csv(rows, comparisons, args.out / f"{name}.csv")
    logger.info("wrote %s/%s.{md,csv}", args.out, name)
    print(text)
    return text


if __name__ == "__main__":
    main()
