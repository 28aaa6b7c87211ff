"""scripts/setup.sh installs into the project's own venv, never into the interpreter that started it unless asked
(VENV=none), and says what to install when that interpreter cannot make a venv. Fake interpreters record their calls.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fake_python(path: Path, log: Path, fail_on: str = "") -> Path:
    """An executable that appends its arguments to ``log`` and exits 0 (1 when they contain ``fail_on``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fail = f'case "$*" in *"{fail_on}"*) exit 1;; esac\n' if fail_on else ""
    path.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n{fail}exit 0\n')
    path.chmod(0o755)
    return path


def setup(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/setup.sh"], cwd=REPO, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_an_existing_venv_is_reused_and_the_starting_python_untouched(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    fake_python(venv / "bin" / "python", tmp_path / "venv.log")
    starter = fake_python(tmp_path / "python3", tmp_path / "starter.log")
    result = setup({"PYTHON": str(starter), "VENV": str(venv)})
    assert result.returncode == 0, result.stderr
    assert calls(tmp_path / "starter.log") == []  # not even asked to make a venv: one is there
    installs = [c for c in calls(tmp_path / "venv.log") if c.startswith("-m pip install")]
    assert any("-e .[dev,eval]" in c and "-c requirements/lock.txt" in c for c in installs), installs
    assert f"reusing {venv}" in result.stdout


def test_a_python_without_venv_fails_with_what_to_install(tmp_path: Path) -> None:
    starter = fake_python(tmp_path / "python3", tmp_path / "starter.log", fail_on="import venv, ensurepip")
    result = setup({"PYTHON": str(starter), "VENV": str(tmp_path / "venv")})
    assert result.returncode == 2
    assert "cannot create a virtual environment" in result.stderr and "apt-get install python3-venv" in result.stderr
    assert not (tmp_path / "venv").exists()
    assert calls(tmp_path / "starter.log") == ["-c import venv, ensurepip"]  # asked, and nothing installed


def test_the_current_interpreter_only_when_asked(tmp_path: Path) -> None:
    starter = fake_python(tmp_path / "python3", tmp_path / "starter.log")
    result = setup({"PYTHON": str(starter), "VENV": "none", "EXTRAS": "dev"})
    assert result.returncode == 0, result.stderr
    assert any(c.startswith("-m pip install") and "-e .[dev]" in c for c in calls(tmp_path / "starter.log"))
