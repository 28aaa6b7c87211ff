"""The mini reproduction's smoke run: every stage runs and hands the next a loadable artefact; a rerun resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava.mini import reproduce
from llava.mini.reproduce import SMOKE, SPLITS, Paths, ReproConfig, spec_rows

pytestmark = pytest.mark.slow


def test_config_validates() -> None:
    """Fine-tuned budgets must be evaluated budgets; sizes positive."""
    with pytest.raises(ValueError, match="ft_budgets"):
        ReproConfig(budgets=(7,), ft_budgets=(14,))
    with pytest.raises(ValueError, match="steps"):
        ReproConfig(finetune_steps=0)


def test_spec_rows_cover_baselines(tmp_path: Path) -> None:
    """Vanilla, then per budget VisionZip, dominant-only, w/o [CLS], random and (where tuned) VisionZip‡."""
    rows = spec_rows(ReproConfig(), Paths(tmp_path))
    assert rows[0] == {"method": "Vanilla", "tokens": 64}
    assert len(rows) == 1 + 3 * 5
    dominant = next(r for r in rows if r["method"] == "Dominant only" and r["tokens"] == 7)
    assert dominant["model_args"] == {"dominant": 7, "contextual": 0}
    ft = next(r for r in rows if r["method"] == "VisionZip-FT" and r["tokens"] == 14)
    assert ft["pretrained"] == str(tmp_path / "ft-14") and ft["model_args"]["model_base"] == str(tmp_path / "stage2")


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
        _, ft, _, _ = load_pretrained_model(str(paths.ft(budget)), str(paths.stage2), device="cpu", device_map=None)
        assert ft.get_vision_tower() is not None


def test_smoke_pipeline(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The whole pipeline at smoke size: artefacts, one result per (row, task), table, TTFT; a rerun skips all."""
    text = reproduce.main(["--out", str(tmp_path), "--smoke"])
    paths = Paths(tmp_path)
    _check_artefacts(paths)
    table = reproduce.read_table(tmp_path / "mini.csv")
    assert len(table) == len(spec_rows(SMOKE, paths))
    for values in table.values():
        assert all(0.0 <= values[s] <= 100.0 for s in SPLITS)  # type: ignore[operator]
    ttft = json.loads((tmp_path / "ttft.json").read_text())
    assert set(ttft) == {"64", *(str(b) for b in SMOKE.budgets)} and all(v > 0 for v in ttft.values())
    assert (tmp_path / "mini.png").exists() and "VisionZip-FT" in text
    times = json.loads((tmp_path / "timings.json").read_text())
    assert times["preflight"] > 0 and (tmp_path / "preflight" / "times.json").exists()
    caplog.clear()
    with caplog.at_level("INFO", logger="llava.mini.reproduce"):
        reproduce.main(["--out", str(tmp_path), "--smoke", "--no-preflight"])
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) >= 6 + len(SMOKE.ft_budgets)  # data, clip, base, stage1, stage2, tasks, ttft, ft-N
    assert json.loads((tmp_path / "timings.json").read_text())["stage2"] == times["stage2"]
