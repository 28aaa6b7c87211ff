"""The seed-level tests recomputed from per-seed tables already recorded in Markdown (python -m eval.mini.recorded).

A run's per-question samples are the input of ``eval.tables.seeds``; a run recorded only as tables (the per-seed
sections of ``eval/mini/RESULTS.md``, each seed's ``reproduce.md`` table) still holds every seed's accuracy per row
and split, which is all a test over seeds needs. This reads those tables and prints the miniature's comparisons with
seeds as the unit (:func:`eval.tables.seedtest.seed_test`), in the same Markdown as ``seeds.md``::

    python -m eval.mini.recorded eval/mini/RESULTS.md --questions 500
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from eval.mini.config import COMPARISON_METHODS, LAYOUTS, SPLITS
from eval.mini.report import comparisons
from eval.tables.seedtest import EFFECT, Comparison, comparison_lines, legend, seed_test

SEED_HEADING = re.compile(r"^#+ Seed (\d+)\b")
Accuracies = dict[tuple[str, int], dict[str, float]]  # {(method, tokens): {split: accuracy %}}


def read_seed_tables(text: str, splits: Sequence[str] = SPLITS) -> dict[int, Accuracies]:
    """``{seed: {(method, tokens): {split: acc}}}`` from every ``### Seed <k>`` section's table (columns
    ``Method | Tokens | <split> acc | ...``, as ``eval.mini.report.summary_markdown`` writes them)."""
    tables: dict[int, Accuracies] = {}
    seed, header = None, None
    for line in text.splitlines():
        heading = SEED_HEADING.match(line)
        if heading:
            seed, header = int(heading.group(1)), None
            tables[seed] = {}
            continue
        if seed is None or not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            missing = [f"{s} acc" for s in splits if f"{s} acc" not in header]
            if missing or header[:2] != ["Method", "Tokens"]:
                expected = missing or "the splits"
                raise ValueError(f"seed {seed}: expected columns Method, Tokens and {expected}, got {header}")
            continue
        row = dict(zip(header, cells, strict=True))
        tables[seed][row["Method"], int(row["Tokens"])] = {s: float(row[f"{s} acc"]) for s in splits}
    if not tables:
        raise ValueError("no '### Seed <k>' section with a table found")
    return tables


def recorded_comparisons(
    tables: dict[int, Accuracies], questions: int, layouts: Sequence[str] = tuple(LAYOUTS), effect: float = EFFECT,
    pairs: Sequence[tuple[str, str]] | None = None,
) -> list[Comparison]:  # fmt: skip
    """The miniature's comparisons (``eval.mini.report.comparisons`` with the comparison methods the tables hold,
    unless ``pairs``), every shared tokens value and split, tested over the seeds; a pair missing from a seed's table
    is an error naming it."""
    seeds = sorted(tables)
    first = tables[seeds[0]]
    methods = [name for name in COMPARISON_METHODS if any(m == name for m, _ in first)]
    out = []
    for method_a, method_b in pairs or comparisons(layouts, methods):
        tokens = sorted({t for m, t in first if m == method_a} & {t for m, t in first if m == method_b}, reverse=True)
        if not tokens:
            raise ValueError(f"{method_a} / {method_b}: no tokens value with both rows in seed {seeds[0]}'s table")
        for n in tokens:
            for split in SPLITS:
                try:
                    a, b = (np.array([tables[s][m, n][split] for s in seeds]) for m in (method_a, method_b))
                except KeyError as error:
                    raise ValueError(f"{method_a} / {method_b} at {n} tokens missing from a seed's table") from error
                out.append(Comparison(method_a, method_b, n, split, seed_test(a, b, questions, effect=effect)))
    return out


def main(argv: Sequence[str] | None = None) -> str:
    """Print the comparisons' legend and table for a Markdown file's per-seed tables."""
    parser = argparse.ArgumentParser(prog="python -m eval.mini.recorded", description=__doc__.splitlines()[0])
    parser.add_argument("markdown", type=Path, help="a file with '### Seed <k>' sections (eval/mini/RESULTS.md)")
    parser.add_argument("--questions", type=int, required=True, help="questions per split each accuracy is over")
    parser.add_argument("--effect", type=float, default=EFFECT, help="points: the real difference to size seeds for")
    args = parser.parse_args(argv)
    tables = read_seed_tables(args.markdown.read_text())
    found = recorded_comparisons(tables, args.questions, effect=args.effect)
    text = "\n".join([legend(found, len(tables), effect=args.effect), "", *comparison_lines(found)]) + "\n"
    print(text)
    return text


if __name__ == "__main__":
    main()
