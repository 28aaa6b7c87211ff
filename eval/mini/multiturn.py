"""The miniature's multi-turn test: two small objects per image, turn 1 asks about one (answered by its ground truth),
turn 2 about the other, scored; every method in both multi-turn modes, against its own single-turn accuracy.

The task is :mod:`eval.multiturn`'s format (``mini_pairs`` and its twin ``mini_pairs_single``, the same scored
questions asked alone), written from images drawn by :func:`eval.mini.shapes.make_pair_example`: "what is the color
of the <shape>?" about each object, the small split's own words. A method that keeps the first turn's selection
(``multiturn=cache``: FastV, PDrop, SparseVLM and CDPruner chose their tokens for turn 1's question) may have dropped
the second object; ``reprefill`` chooses again for turn 2. The stage-2 model was trained on one object and one turn
per image, so every row, vanilla included, answers out of its training distribution: the drop that belongs to a
method is its drop beyond vanilla's.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from eval.mini.config import (
    FULL_TOKENS,
    PAIR_TASK,
    Paths,
    ReproConfig,
    done_checks,
    multiturn_rows,
    pending_multiturn_rows,
)
from eval.mini.evaluate import run_grid_rows
from eval.mini.jobs import Timer, run_logged
from eval.mini.shapes import SmallConfig, make_pair_example
from eval.tables.results import collect
from eval.tables.seedtest import seed_test
from eval.tables.spec import load_spec
from visionzip.methods import MULTITURN_MODES

SINGLE, TURN2 = "single", "turn 2"  # the spec's columns: the scored question alone, and after turn 1


def pairs_dir(paths: Paths) -> Path:
    """Where the pair images and items are written (beside the other local tasks)."""
    return paths.tasks / "pairs"


def write_pair_items(cfg: ReproConfig, paths: Paths) -> Path:
    """``cfg.multiturn_questions`` two-object test images and their two-turn LLaVA items (seeded by ``cfg.seed``)."""
    folder = pairs_dir(paths)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    items = []
    for index in range(cfg.multiturn_questions):
        _, image, (first, second) = make_pair_example(cfg.seed, "test", index, SmallConfig())
        rel = f"images/{index:05d}.png"
        image.save(folder / rel)
        turns = [{"from": "human", "value": "<image>\n" + first.question}, {"from": "gpt", "value": first.answer},
                 {"from": "human", "value": second.question}, {"from": "gpt", "value": second.answer}]  # fmt: skip
        items.append({"id": f"pair-{index}", "image": rel, "conversations": turns})
    path = folder / "items.json"
    path.write_text(json.dumps(items, indent=1))
    return path


def stage_pair_task(cfg: ReproConfig, paths: Paths, timer: Timer) -> None:
    """``mini_pairs`` and ``mini_pairs_single`` through ``python -m eval.multiturn``."""

    def work() -> None:
        items = write_pair_items(cfg, paths)
        command = [sys.executable, "-m", "eval.multiturn", "--data", str(items), "--image-folder", str(items.parent),
                   "--out", str(paths.tasks), "--task", PAIR_TASK,
                   "--max-new-tokens", str(cfg.max_new_tokens)]  # fmt: skip
        run_logged("task-pairs", command, paths)

    timer.stage("task-pairs", done_checks(cfg, paths)["task-pairs"], work)


def write_multiturn_spec(cfg: ReproConfig, paths: Paths) -> Path:
    """The multi-turn table spec: columns single and turn 2, one row per method and mode."""
    spec = {
        "name": "mini_multiturn",
        "title": "The paper in miniature: turn 2 about the other object, every method in both multi-turn modes",
        "include_paths": [str(paths.tasks)],
        "model": {"pretrained": str(paths.stage2), "conv_template": "vicuna_v1"},
        "baseline": {"method": f"Vanilla ({MULTITURN_MODES[0]})", "tokens": FULL_TOKENS},
        "rows": multiturn_rows(cfg),
        "benchmarks": [
            {"column": SINGLE, "task": f"{PAIR_TASK}_single", "metric": "exact_match", "scale": 100},
            {"column": TURN2, "task": PAIR_TASK, "metric": "exact_match", "scale": 100},
        ],
    }
    path = paths.run / "eval" / "mini_multiturn.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    return path


def stage_multiturn(cfg: ReproConfig, paths: Paths, timer: Timer) -> None:
    """The pair tasks, then every multi-turn row through ``eval.grid --in-process`` (:func:`run_grid_rows`)."""
    if not cfg.multiturn_questions:
        return
    stage_pair_task(cfg, paths, timer)
    spec = write_multiturn_spec(cfg, paths)

    def work() -> None:
        run_grid_rows("multiturn", spec, paths.multiturn, lambda: pending_multiturn_rows(cfg, paths), cfg, paths)

    timer.stage("multiturn", done_checks(cfg, paths)["multiturn"], work, accumulate=True)


def multiturn_markdown(spec_path: Path, results_dirs: Sequence[Path]) -> str:
    """Per method and mode: single-turn and turn-2 accuracy (means over seeds), the drop (turn 2 - single) per seed
    with its mean and seed-level p (:func:`eval.tables.seedtest.seed_test`), and the drop beyond vanilla's in the same
    mode (per seed, then the mean and p): what the method itself loses on turn 2."""
    spec = load_spec(spec_path)
    tables = [collect(spec, d) for d in results_dirs]
    scores = {}  # {row id: (single (seeds,), turn 2 (seeds,))}, rows with every seed's two values only
    for row in spec.rows:
        values = [t[row.id] for t in tables if {SINGLE, TURN2} <= set(t.get(row.id, {}))]
        if values and len(values) == len(tables):
            scores[row.id] = tuple(np.array([v[c] for v in values]) for c in (SINGLE, TURN2))
    vanilla = {r.model_args.get("multiturn"): scores.get(r.id) for r in spec.rows if r.method.startswith("Vanilla")}
    seeds = f"{len(tables)} seed{'s' if len(tables) != 1 else ''}"
    lines = [
        f"| Method (mode) | Tokens | Single % | Turn 2 % | Drop per seed | Drop | p ({seeds}) | Beyond vanilla | p |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for row in spec.rows:
        if row.id not in scores:
            lines.append(f"| {row.method} | {row.tokens} |" + " - |" * 7)
            continue
        single, turn2 = scores[row.id]
        drop = seed_test(turn2, single)
        cells = [f"{single.mean():.1f}", f"{turn2.mean():.1f}", ", ".join(f"{d:+.1f}" for d in drop.per_seed),
                 f"{drop.diff:+.1f}", f"{drop.p:.3g}"]  # fmt: skip
        baseline = vanilla.get(row.model_args.get("multiturn"))  # vanilla's scores in the same mode
        if baseline is not None and not row.method.startswith("Vanilla"):
            beyond = seed_test(turn2 - single, baseline[1] - baseline[0])
            cells += [f"{beyond.diff:+.1f}", f"{beyond.p:.3g}"]
        else:
            cells += ["-", "-"]
        lines.append(f"| {row.method} | {row.tokens} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
