"""eval.mini.recorded: per-seed Markdown tables read back and tested over seeds as the numbers written say."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from eval.mini.config import LAYOUTS
from eval.mini.recorded import main, read_seed_tables, recorded_comparisons
from eval.mini.report import comparisons, summary_markdown

ROWS = ("Vanilla", *dict.fromkeys(m for pair in comparisons(tuple(LAYOUTS)) for m in pair))  # VisionZip first


def _accuracies(seed: int) -> dict[tuple[str, int], dict[str, float]]:
    """A seed's table: row r scores base + r on easy and base - r on small, base = 50 + 3 * seed (one decimal)."""
    table = {("Vanilla", 64): {"easy": 70.0 + seed, "small": 45.0 + seed}}
    for r, method in enumerate(ROWS[1:], start=1):
        table[method, 7] = {"easy": round(50.0 + 3 * seed + r + 0.1 * seed * r, 1), "small": 50.0 - r * (seed + 1)}
    return table


def _markdown(seeds: int) -> str:
    """A results file as RESULTS.md holds them: prose, then one ``### Seed <k>`` section per seed with its table."""
    parts = ["# Results", "", "| not | a seed table |", "|---|---|", "| x | y |", ""]
    for seed in range(seeds):
        table = {key: {**values, "Avg %": 99.0} for key, values in _accuracies(seed).items()}
        ttft = {"64": 10.0, "7": 8.0}
        parts += [f"### Seed {seed} (`seed-{seed}/reproduce.md`)", "", summary_markdown(table, ttft), ""]
    return "\n".join(parts)


def test_tables_read_back_as_written() -> None:
    tables = read_seed_tables(_markdown(3))
    assert sorted(tables) == [0, 1, 2]
    for seed, table in tables.items():
        assert table == _accuracies(seed)  # one decimal each: printed and parsed back exactly


def test_comparisons_are_per_seed_differences() -> None:
    tables = read_seed_tables(_markdown(6))
    found = recorded_comparisons(tables, questions=500, pairs=[("VisionZip", "Random patches")])
    assert [(c.a, c.b, c.tokens, c.column) for c in found] == [
        ("VisionZip", "Random patches", 7, "easy"),
        ("VisionZip", "Random patches", 7, "small"),
    ]
    for c in found:
        expected = [_accuracies(s)["VisionZip", 7][c.column] - _accuracies(s)["Random patches", 7][c.column]
                    for s in range(6)]  # fmt: skip
        assert c.test.per_seed == pytest.approx(tuple(expected)) and c.test.n_docs == 500
    easy, small = found
    assert easy.test.verdict == "worse" and easy.test.p == pytest.approx(2 / 64)  # -1 - 0.1 s: all six negative
    assert small.test.verdict == "better"  # (s + 1) each: all six positive
    with pytest.raises(ValueError, match="VisionZip / FastV: no tokens value"):
        recorded_comparisons(tables, questions=500, pairs=[("VisionZip", "FastV")])
    del tables[3]["Random patches", 7]
    with pytest.raises(ValueError, match="missing from a seed's table"):
        recorded_comparisons(tables, questions=500, pairs=[("VisionZip", "Random patches")])


def test_cli_prints_every_comparison_over_seeds(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text(_markdown(3))
    text = main([str(path), "--questions", "500"])
    assert text in capsys.readouterr().out
    assert "with 3 seeds the smallest p it can give is 0.25, so no difference can reach 5%" in text
    rows = [line for line in text.splitlines() if line.startswith("| VisionZip")]
    assert len(rows) == 2 * len(comparisons(tuple(LAYOUTS)))  # one per pair and split, at the one budget
    per_seed = [
        _accuracies(s)["VisionZip", 7]["small"] - _accuracies(s)["Random patches", 7]["small"] for s in range(3)
    ]
    cells = ", ".join(f"{x:+.1f}" for x in per_seed)
    assert f"| VisionZip | Random patches | 7 | small | {cells} | {np.mean(per_seed):+.2f} |" in text
    with pytest.raises(ValueError, match="no '### Seed"):
        read_seed_tables("# nothing here\n")
