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


def _accuracy(method: str, seed: int) -> tuple[float, float]:
    """(single, turn 2) accuracy of a row in a seed: turn 2 drops 2 points for vanilla, 2 + k for the k-th method in
    cache mode and 2 in reprefill mode; single = 60 + seed."""
    name, mode = method.rsplit(" (", 1)
    names = ["Vanilla", "VisionZip", *COMPARISON_METHODS]
    extra = names.index(name) if mode == "cache)" else 0
    return 60.0 + seed, 58.0 + seed - extra - 0.5 * seed * (extra > 0)


def _write(folder: Path, task: str, value: float) -> None:
    """An lmms-eval results file of one task (exact match as a fraction)."""
    out = folder / task / "model"
    out.mkdir(parents=True, exist_ok=True)
    results = {"results": {task: {"alias": task, "exact_match,none": value / 100.0}}}
    (out / "20260101_000000_results.json").write_text(json.dumps(results))


def test_rows_and_drops(tmp_path: Path) -> None:
    cfg = ReproConfig()
    rows = multiturn_rows(cfg)
    assert len(rows) == (2 + len(COMPARISON_METHODS)) * len(MULTITURN_MODES)
    assert {r["model_args"]["multiturn"] for r in rows} == set(MULTITURN_MODES)
    assert all(r["tokens"] == cfg.multiturn_budget for r in rows if not r["method"].startswith("Vanilla"))
    assert multiturn_rows(ReproConfig(multiturn_questions=0)) == []
    with pytest.raises(ValueError, match="multiturn_budget"):
        ReproConfig(multiturn_budget=9)
    paths = Paths(tmp_path)
    spec = write_multiturn_spec(cfg, paths)
    dirs = []
    for seed in range(SEEDS):
        for row in rows:
            single, turn2 = _accuracy(row["method"], seed)
            _write(tmp_path / f"s{seed}" / row_id(row), f"{PAIR_TASK}_single", single)
            _write(tmp_path / f"s{seed}" / row_id(row), PAIR_TASK, turn2)
        dirs.append(tmp_path / f"s{seed}")
    text = multiturn_markdown(spec, dirs)
    assert "| Vanilla (cache) | 64 | 61.0 | 59.0 | -2.0, -2.0, -2.0 | -2.0 | 0.25 | - | - |" in text
    assert "| VisionZip (reprefill) | 7 | 61.0 | 59.0 | -2.0, -2.0, -2.0 | -2.0 | 0.25 | +0.0 | 1 |" in text
    # FastV (cache): 2 + 2 more in seed 0, + 0.5 more per seed after: beyond vanilla -2.0, -2.5, -3.0
    assert "| FastV (cache) | 7 | 61.0 | 56.5 | -4.0, -4.5, -5.0 | -4.5 | 0.25 | -2.5 | 0.25 |" in text
    (tmp_path / "s2" / "fastv-cache-7" / PAIR_TASK).rename(tmp_path / "gone")  # a seed without turn 2: no numbers
    assert "| FastV (cache) | 7 | - | - | - | - | - | - | - |" in multiturn_markdown(spec, dirs)
