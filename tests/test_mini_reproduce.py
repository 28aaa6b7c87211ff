"""The mini reproduction's smoke run: every stage runs and hands the next a loadable artefact; a rerun resumes."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import ClassVar

import pytest

from eval.mini import evaluate, reproduce
from eval.mini.config import LAYOUTS, SMOKE, SPLITS, Paths, ReproConfig, row_id, spec_rows
from eval.mini.jobs import Timer
from eval.mini.report import comparisons, read_table

pytestmark = pytest.mark.slow


def test_config_validates() -> None:
    """Fine-tuned budgets must be evaluated budgets; sizes positive."""
    with pytest.raises(ValueError, match="ft_budgets"):
        ReproConfig(budgets=(7,), ft_budgets=(14,))
    with pytest.raises(ValueError, match="steps"):
        ReproConfig(finetune_steps=0)


def test_spec_rows_cover_baselines(tmp_path: Path) -> None:
    """Vanilla, then per budget and position layout: VisionZip, dominant-only, w/o [CLS], random, and VisionZip‡
    where tuned (its projector trained in the same layout)."""
    cfg = ReproConfig()
    rows = spec_rows(cfg, Paths(tmp_path))
    assert rows[0] == {"method": "Vanilla", "tokens": 64}
    assert len(rows) == 1 + len(cfg.budgets) * (len(LAYOUTS) * 4 + 6) + len(cfg.ft_budgets) * len(LAYOUTS)
    assert len({(r["method"], r["tokens"]) for r in rows}) == len(rows)
    dominant = next(r for r in rows if r["method"] == "Dominant only" and r["tokens"] == 7)
    assert dominant["model_args"] == {"dominant": 7, "contextual": 0, "positions": "packed"}
    ft = next(r for r in rows if r["method"] == "VisionZip-FT (orig. pos.)" and r["tokens"] == 7)
    assert ft["pretrained"] == str(tmp_path / "seed-0" / "ft-original-7")
    assert ft["model_args"] == {"budget": 7, "model_base": str(tmp_path / "seed-0" / "stage2"), "positions": "original"}
    for a, b in comparisons(cfg.layouts, cfg.comparisons):  # every paired test names two rows of the table
        assert {a, b} <= {r["method"] for r in rows}


def _check_artefacts(paths: Paths) -> None:
    """Each stage's output loads as the next stage uses it."""
    from llava.model.builder import load_pretrained_model

    for split in SPLITS:
        assert json.loads((paths.data / split / "train.json").read_text())
    assert (paths.clip / "config.json").exists() and (paths.base / "config.json").exists()
    assert (paths.stage1 / "mm_projector.bin").exists()
    _, model, _, _ = load_pretrained_model(str(paths.stage2), device="cpu", device_map=None)
    assert model.config.mm_projector_type == "mlp2x_gelu"
    for budget in SMOKE.ft_budgets:
        for layout in SMOKE.layouts:
            folder = str(paths.ft(budget, layout))
            _, ft, _, _ = load_pretrained_model(folder, str(paths.stage2), device="cpu", device_map=None)
            assert ft.config.visionzip["positions"] == layout


def test_smoke_pipeline(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The whole pipeline at smoke size: artefacts, one result per (row, task), table, TTFT; a rerun skips all; a
    second seed reuses the inputs and the seeds table gives mean ± sd and the paired tests."""
    text = reproduce.main(["--out", str(tmp_path), "--smoke"])
    paths = Paths(tmp_path)
    _check_artefacts(paths)
    table = read_table(paths.run / "mini.csv")
    assert len(table) == len(spec_rows(SMOKE, paths))
    for values in table.values():
        assert all(0.0 <= values[s] <= 100.0 for s in SPLITS)  # type: ignore[operator]
    ttft = json.loads((paths.run / "ttft.json").read_text())
    assert set(ttft) == {"64", *(str(b) for b in SMOKE.budgets)} and all(v > 0 for v in ttft.values())
    assert (paths.run / "mini.png").exists() and "VisionZip-FT (orig. pos.)" in text
    assert (tmp_path / "preflight" / "times.json").exists()
    times = json.loads((paths.run / "timings.json").read_text())
    caplog.clear()
    with caplog.at_level("INFO", logger="eval.mini.reproduce"):
        text = reproduce.main(["--out", str(tmp_path), "--smoke", "--no-preflight", "--seeds", "0", "1"])
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    # seed 0: data, clip, base, stage1, stage2, tasks x 2, ttft, ft per budget; seed 1: data, clip, base, tasks x 2
    assert len(skipped) >= 8 + len(SMOKE.ft_budgets) + 5
    assert json.loads((paths.run / "timings.json").read_text())["stage2"] == times["stage2"]
    seed1 = Paths(tmp_path, 1)
    assert (seed1.stage2 / "model.safetensors").exists()
    assert "stage2" in json.loads((seed1.run / "timings.json").read_text())
    assert "± " in text and "| p |" in text
    for a, b in comparisons(SMOKE.layouts, SMOKE.comparisons):
        assert f"| {a} | {b} |" in text
    _check_seeds_table(tmp_path / "seeds.csv", seeds=2)
    preflight_log = (tmp_path / "preflight.log").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level("INFO", logger="eval.mini.reproduce"):
        reproduce.main(["--out", str(tmp_path), "--smoke"])  # every stage done, preflight not turned off
    messages = [r.getMessage() for r in caplog.records]
    assert (tmp_path / "preflight.log").stat().st_mtime_ns == preflight_log  # no preflight started
    assert not _timed(messages)


def _check_seeds_table(path: Path, seeds: int) -> None:
    """seeds.csv: every row over every seed; each paired test once per (pair, split), on every test question, its p a
    probability, its difference inside its interval and equal to the difference of the two rows' means."""
    lines = list(csv.DictReader(path.open(newline="")))
    means = {(r["method"], r["column"]): float(r["mean"]) for r in lines if r["table"] == "summary"}
    assert {m for m, _ in means} == {r["method"] for r in spec_rows(SMOKE, Paths(path.parent))}
    assert all(int(r["seeds"]) == seeds for r in lines)
    tests = [r for r in lines if r["table"] == "comparison"]
    assert sorted((r["method"], r["method_b"], r["column"]) for r in tests) == sorted(
        (a, b, split) for a, b in comparisons(SMOKE.layouts, SMOKE.comparisons) for split in SPLITS
    )
    for r in tests:
        diff, low, high, p = (float(r[k]) for k in ("diff", "ci_low", "ci_high", "p"))
        assert 0 < p <= 1 and low <= diff <= high and int(r["docs"]) == SMOKE.eval_questions
        assert diff == pytest.approx(means[(r["method"], r["column"])] - means[(r["method_b"], r["column"])], abs=1e-6)


@pytest.mark.parametrize("done", [0, 3, "all"])
def test_eval_deals_only_the_rows_without_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, done: int | str
) -> None:
    """A resumed evaluation starts workers only for rows the grid has not written (none when all are done), and
    reports a stage it skipped as skipped, with no time."""
    paths = Paths(tmp_path, SMOKE.train_seed)
    paths.run.mkdir(parents=True)
    rows = [row_id(row) for row in spec_rows(SMOKE, paths)]
    finished = rows if done == "all" else rows[:done]
    for row in finished:
        (paths.results / row / "m").mkdir(parents=True)
        (paths.results / row / "m" / "x_results.json").write_text("{}")
    dealt: list[list[str]] = []

    def fake_run(jobs, _paths, watch=None) -> None:
        for _, command, _ in jobs:
            dealt.append(command[command.index("--rows") + 1 :])
            for row in dealt[-1]:  # the grid writes the rows it was given
                (paths.results / row).mkdir(parents=True, exist_ok=True)
                (paths.results / row / "x_results.json").write_text("{}")

    monkeypatch.setattr(evaluate, "run_parallel", fake_run)
    (paths.run / "timings.json").write_text(json.dumps({"eval": 103.2}))  # an interrupted run's time
    with caplog.at_level(logging.INFO, logger="eval.mini.reproduce"):
        evaluate.stage_eval(SMOKE, paths, Timer(paths.run / "timings.json"))
    given = sorted(row for rows_of_job in dealt for row in rows_of_job)
    assert given == sorted(set(rows) - set(finished))
    assert len(dealt) == min(SMOKE.eval_workers, len(rows) - len(finished))
    messages = [r.getMessage() for r in caplog.records]
    recorded = json.loads((paths.run / "timings.json").read_text())["eval"]
    if done == "all":
        assert messages == ["eval: done already, skipped"] and recorded == 103.2
    else:
        assert not [m for m in messages if "skipped" in m] and recorded >= 103.2  # this run's time is added
        assert [m for m in messages if m.startswith("eval: done in ") and "with earlier runs" in m]


def _timed(messages: list[str]) -> list[str]:
    """The stages a run reports a time for (``<stage>: done in ...``)."""
    return [m.split(":")[0] for m in messages if re.match(r"[\w-]+: done in ", m)]


def _finish(paths: Paths, cfg: ReproConfig) -> None:
    """Every output a finished run of ``cfg`` leaves for one seed (empty files: only their presence is read)."""
    for folder in [paths.data / split for split in SPLITS] + [paths.clip, paths.base]:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "manifest.json").write_text("{}")
    files = [paths.stage1 / "mm_projector.bin", paths.stage2 / "model.safetensors", paths.run / "ttft.json"]
    files += [paths.ft(b, layout) / "mm_projector.bin" for b in cfg.ft_budgets for layout in cfg.layouts]
    files += [paths.tasks / f"mini_{split}.yaml" for split in SPLITS]
    methods = ["Vanilla"] + [f"{m}{s}" for m in ("VisionZip", "Dominant only", "VisionZip w/o CLS", "Random patches")
                             for s in LAYOUTS.values()]  # fmt: skip
    rows = [f"vanilla-{64}"] + [row_id({"method": m, "tokens": b}) for m in methods[1:] for b in cfg.budgets]
    rows += [row_id({"method": f"VisionZip-FT{s}", "tokens": b}) for s in LAYOUTS.values() for b in cfg.ft_budgets]
    others = ("FastV", "PDrop", "SparseVLM", "DivPrune", "VisPruner", "CDPruner")
    rows += [row_id({"method": m, "tokens": b}) for m in others for b in cfg.budgets]
    files += [paths.results / row / "m" / "x_results.json" for row in rows]
    turns = [row_id({"method": f"Vanilla ({mode})", "tokens": 64}) for mode in ("cache", "reprefill")]
    turns += [row_id({"method": f"{m} ({mode})", "tokens": b}) for m in ("VisionZip", *others)
              for mode in ("cache", "reprefill") for b in cfg.multiturn_budgets]  # fmt: skip
    files += [paths.multiturn / row / "m" / "x_results.json" for row in turns] + [paths.tasks / "mini_pairs.yaml"]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")


class _Preflight:
    """Stands in for the background preflight: records that it was started, passes at once."""

    started: ClassVar[list[list[str]]] = []

    def __init__(self, name: str, command: list[str], log_path: Path) -> None:
        _Preflight.started.append(command)

    def failed(self) -> bool:
        return False

    def wait(self) -> float:
        return 0.5

    def stop(self) -> None:
        pass


def test_a_finished_run_starts_no_preflight_and_times_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Resumed with every stage done: no preflight, each stage reported skipped and none with a time; with one stage
    left (TTFT), the preflight runs and only that stage reports a time."""
    paths = Paths(tmp_path, 0)
    _finish(paths, SMOKE)
    monkeypatch.setattr(reproduce, "Background", _Preflight)
    monkeypatch.setattr(reproduce, "render", lambda _paths: "the tables")
    monkeypatch.setattr(evaluate, "measure_ttft", lambda cfg, paths: {"64": 2.0, "7": 1.0})
    monkeypatch.setattr(evaluate, "run_parallel", lambda *a, **k: pytest.fail("no evaluation is left to run"))
    _Preflight.started = []
    with caplog.at_level(logging.INFO, logger="eval.mini.reproduce"):
        assert reproduce.reproduce(tmp_path, SMOKE) == "the tables"
    messages = [r.getMessage() for r in caplog.records]
    assert _Preflight.started == []
    stages = [
        "data",
        "clip",
        "base",
        "stage1",
        "stage2",
        "ft-7",
        "task-easy",
        "task-small",
        "eval",
        "task-pairs",
        "multiturn",
        "ttft",
    ]
    assert [m.split(":")[0] for m in messages if m.endswith("done already, skipped")] == stages
    assert not _timed(messages) and not [m for m in messages if m.startswith("preflight")]
    (paths.run / "ttft.json").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="eval.mini.reproduce"):
        reproduce.reproduce(tmp_path, SMOKE)
    assert len(_Preflight.started) == 1 and "eval.mini.preflight" in _Preflight.started[0]
    assert _timed([r.getMessage() for r in caplog.records]) == ["ttft"]
    assert json.loads((paths.run / "ttft.json").read_text()) == {"64": 2.0, "7": 1.0}


def test_a_run_with_other_settings_is_not_resumed(tmp_path: Path) -> None:
    """A full run refuses a folder a smoke run left (its stages are small); scheduling settings may change."""
    paths = Paths(tmp_path, 0)
    paths.run.mkdir(parents=True)
    reproduce.check_settings(SMOKE, paths)
    reproduce.check_settings(dataclasses.replace(SMOKE, eval_workers=1, master_port=30000), paths)
    with pytest.raises(ValueError, match=r"other settings \(.*batch.*finetune_steps"):
        reproduce.check_settings(ReproConfig(), paths)
    assert json.loads((paths.run / "reproduce.json").read_text())["batch"] == SMOKE.batch  # left as it was
