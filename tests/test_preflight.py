"""The quick start's preflight fails fast, naming the stage, when a later stage's dependency is broken.

Each test breaks one dependency the way a drifted install does, by shadowing a package on PYTHONPATH, and runs
``python -m eval.mini.preflight`` as the quick start does. "Fast" is asserted as work, not time (the machine is
shared): no check after the failing one starts, and the main job starts no training. The working path runs in the
mini pipeline's smoke test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")
REPO = Path(__file__).resolve().parents[1]
HANG_S = 600  # only a guard against a hang; the tests bound the work done, not the time taken


def _run_preflight(tmp_path: Path, shadow: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), str(REPO)])}
    return subprocess.run(
        [sys.executable, "-m", "eval.mini.preflight", "--out", str(tmp_path / "pf")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_S,
    )  # fmt: skip


def test_lmms_eval_that_exits_zero_without_results_fails_fast(tmp_path: Path) -> None:
    """The measured defect's shape: lmms-eval imports, its CLI exits 0, and no task ran (filelock._api was gone)."""
    package = tmp_path / "shadow" / "lmms_eval"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "evaluator.py").write_text("")
    (package / "__main__.py").write_text("print('ModuleNotFoundError: No module named filelock._api')\n")
    result = _run_preflight(tmp_path, tmp_path / "shadow")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "environment broken for lmms-eval: no results file" in result.stderr
    assert "filelock._api" in result.stderr  # what lmms-eval printed is shown
    assert (tmp_path / "pf" / "lmms_eval.log").exists()  # the failing check ran...
    assert not (tmp_path / "pf" / "deepspeed.log").exists()  # ...and the slow one after it did not start
    assert not (tmp_path / "pf" / "times.json").exists()


def test_broken_import_names_its_stage(tmp_path: Path) -> None:
    """A package that no longer imports fails the first check, with the stage it would have broken."""
    package = tmp_path / "shadow" / "deepspeed"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('simulated: a drifted dependency')\n")
    result = _run_preflight(tmp_path, tmp_path / "shadow")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "training (scripts/v1_5/*.sh): `import deepspeed` failed" in result.stderr
    assert "simulated: a drifted dependency" in result.stderr
    assert sorted(p.name for p in (tmp_path / "pf").iterdir()) == []  # the first check failed: nothing else started


def test_main_job_stops_before_training_when_the_preflight_fails(tmp_path: Path) -> None:
    """The preflight runs beside the first stages of `eval.mini.reproduce`; its failure ends the job, named, before
    any training starts."""
    package = tmp_path / "shadow" / "lmms_eval"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "evaluator.py").write_text("")
    (package / "__main__.py").write_text("print('ModuleNotFoundError: No module named filelock._api')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "shadow"), str(REPO)])}
    result = subprocess.run(
        [sys.executable, "-m", "eval.mini.reproduce", "--smoke", "--out", str(tmp_path / "mini")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_S,
    )  # fmt: skip
    assert result.returncode != 0 and "preflight failed, environment broken for preflight" in result.stderr
    assert "lmms-eval: no results file" in result.stderr  # the broken stage, from the preflight's log
    run = tmp_path / "mini" / "seed-0"
    assert not (run / "stage1").exists() and not (run / "logs" / "stage1.log").exists()  # no training started
    assert {p.stem for p in (run / "logs").glob("*.log")} <= {"data", "clip", "base"}  # only the input stages ran


def test_background_preflight_is_stopped_when_a_stage_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage that fails while the preflight still runs leaves no orphan process behind."""
    from eval.mini import reproduce as repro

    started: list[repro.Background] = []

    class SlowPreflight(repro.Background):
        def __init__(self, name: str, command: list[str], log_path: Path) -> None:
            super().__init__(name, [sys.executable, "-c", "import time; time.sleep(120)"], log_path)
            started.append(self)

    def failing_seed(*args: object, **kwargs: object) -> str:
        raise RuntimeError("simulated: a stage failed")

    monkeypatch.setattr(repro, "Background", SlowPreflight)
    monkeypatch.setattr(repro, "reproduce_seed", failing_seed)
    with pytest.raises(RuntimeError, match="simulated"):
        repro.reproduce(tmp_path / "mini", repro.SMOKE)
    assert len(started) == 1 and started[0].process.poll() is not None  # terminated, not left running


def test_stage_jobs_find_this_environments_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    """The training scripts call `deepspeed` by name: a job run with .venv/bin/python, not activated, must find
    .venv's launcher first (a fresh quick start failed here with `deepspeed: command not found`)."""
    import shutil

    from eval.mini.preflight import job_env

    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # as in a shell where no venv is activated
    env = job_env({"OMP_NUM_THREADS": "1"})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent) and env["OMP_NUM_THREADS"] == "1"
    launcher = shutil.which("deepspeed", path=env["PATH"])
    assert launcher is not None and Path(launcher).parent == Path(sys.executable).parent
