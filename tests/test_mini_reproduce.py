"""The mini reproduction's smoke run: every stage runs and hands the next a loadable artefact; a rerun resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.mini import reproduce
from eval.mini.reproduce import LAYOUTS, SMOKE, SPLITS, Paths, ReproConfig, comparisons, spec_rows

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
    assert len(rows) == 1 + len(cfg.budgets) * len(LAYOUTS) * 4 + len(cfg.ft_budgets) * len(LAYOUTS)
    assert len({(r["method"], r["tokens"]) for r in rows}) == len(rows)
    dominant = next(r for r in rows if r["method"] == "Dominant only" and r["tokens"] == 7)
    assert dominant["model_args"] == {"dominant": 7, "contextual": 0, "positions": "packed"}
    ft = next(r for r in rows if r["method"] == "VisionZip-FT (orig. pos.)" and r["tokens"] == 7)
    assert ft["pretrained"] == str(tmp_path / "seed-0" / "ft-original-7")
    assert ft["model_args"] == {"budget": 7, "model_base": str(tmp_path / "seed-0" / "stage2"), "positions": "original"}
    for a, b in comparisons(cfg.layouts):  # every paired test names two rows of the table
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
    table = reproduce.read_table(paths.run / "mini.csv")
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
    assert "± " in text and "p" in text and (tmp_path / "seeds.csv").exists()
    for a, b in comparisons(SMOKE.layouts):
        assert f"| {a} | {b} |" in text


@pytest.mark.parametrize("done", [0, 3, "all"])
def test_eval_deals_only_the_rows_without_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, done) -> None:
    """A resumed evaluation starts workers only for rows the grid has not written (none when all are done)."""
    paths = Paths(tmp_path, SMOKE.train_seed)
    paths.run.mkdir(parents=True)
    rows = [reproduce._row_id(row) for row in spec_rows(SMOKE, paths)]
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

    monkeypatch.setattr(reproduce, "run_parallel", fake_run)
    reproduce.stage_eval(SMOKE, paths, reproduce.Timer(paths.run / "timings.json"))
    given = sorted(row for rows_of_job in dealt for row in rows_of_job)
    assert given == sorted(set(rows) - set(finished))
    assert len(dealt) == min(SMOKE.eval_workers, len(rows) - len(finished))
