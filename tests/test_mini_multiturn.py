"""The miniature's multi-turn table: rows per method and mode, and the drops computed from lmms-eval results files
as the numbers written say (per seed, beyond vanilla's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.mini.config import COMPARISON_METHODS, PAIR_TASK, Paths, ReproConfig, multiturn_rows, row_id
from eval.mini.multiturn import multiturn_markdown, write_multiturn_spec
from visionzip.methods import MULTITURN_MODES

SEEDS = 3


def _accuracy(method: str, tokens: int, seed: int) -> tuple[float, float]:
    """(single, turn 2) accuracy of a row in a seed: turn 2 drops 2 points for vanilla, 2 + k for the k-th method in
    cache mode and 2 in reprefill mode; single = 60 + seed, 10 more at 22 tokens (rows of one method at two budgets
    must not be confused)."""
    name, mode = method.rsplit(" (", 1)
    names = ["Vanilla", "VisionZip", *COMPARISON_METHODS]
    extra = names.index(name) if mode == "cache)" else 0
    more = 10.0 * (tokens == 22)
    return 60.0 + seed + more, 58.0 + seed + more - extra - 0.5 * seed * (extra > 0)


def _write(folder: Path, task: str, value: float) -> None:
    """An lmms-eval results file of one task (exact match as a fraction)."""
    out = folder / task / "model"
    out.mkdir(parents=True, exist_ok=True)
    results = {"results": {task: {"alias": task, "exact_match,none": value / 100.0}}}
    (out / "20260101_000000_results.json").write_text(json.dumps(results))


def test_rows_and_drops(tmp_path: Path) -> None:
    cfg = ReproConfig()
    rows = multiturn_rows(cfg)
    per_budget = (1 + len(COMPARISON_METHODS)) * len(MULTITURN_MODES)
    assert len(rows) == len(MULTITURN_MODES) + per_budget * len(cfg.multiturn_budgets)
    assert {r["model_args"]["multiturn"] for r in rows} == set(MULTITURN_MODES)
    compressed = [r["tokens"] for r in rows if not r["method"].startswith("Vanilla")]
    assert sorted(set(compressed)) == sorted(cfg.multiturn_budgets) == [7, 14, 22]
    assert all(compressed.count(n) == per_budget for n in cfg.multiturn_budgets)
    assert multiturn_rows(ReproConfig(multiturn_questions=0)) == []
    for bad in ((9,), ()):
        with pytest.raises(ValueError, match="multiturn_budgets"):
            ReproConfig(multiturn_budgets=bad)
    paths = Paths(tmp_path)
    spec = write_multiturn_spec(cfg, paths)
    dirs = []
    for seed in range(SEEDS):
        for row in rows:
            single, turn2 = _accuracy(row["method"], row["tokens"], seed)
            _write(tmp_path / f"s{seed}" / row_id(row), f"{PAIR_TASK}_single", single)
            _write(tmp_path / f"s{seed}" / row_id(row), PAIR_TASK, turn2)
        dirs.append(tmp_path / f"s{seed}")
    text = multiturn_markdown(spec, dirs)
    assert "| Vanilla (cache) | 64 | 61.0 | 59.0 | -2.0, -2.0, -2.0 | -2.0 | 0.25 | - | - |" in text
    assert "| VisionZip (reprefill) | 7 | 61.0 | 59.0 | -2.0, -2.0, -2.0 | -2.0 | 0.25 | +0.0 | 1 |" in text
    # FastV (cache): 2 + 2 more in seed 0, + 0.5 more per seed after: beyond vanilla -2.0, -2.5, -3.0
    assert "| FastV (cache) | 7 | 61.0 | 56.5 | -4.0, -4.5, -5.0 | -4.5 | 0.25 | -2.5 | 0.25 |" in text
    assert "| FastV (cache) | 22 | 71.0 | 66.5 | -4.0, -4.5, -5.0 | -4.5 | 0.25 | -2.5 | 0.25 |" in text
    (tmp_path / "s2" / "fastv-cache-7" / PAIR_TASK).rename(tmp_path / "gone")  # a seed without turn 2: no numbers
    assert "| FastV (cache) | 7 | - | - | - | - | - | - | - |" in multiturn_markdown(spec, dirs)
