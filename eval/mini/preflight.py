"""Preflight of the main job: every later stage's dependencies, exercised for real in under a minute.

The reproduction trains for a quarter of an hour before it first calls lmms-eval, so a broken environment (a
dependency that drifted, a launcher that cannot start) must show at once. Three checks, in the order the stages
run fastest first, each on the built-in tiny checkpoint (``llava.tiny``):

1. ``imports``: the packages of the training and evaluation stages import (seconds).
2. ``lmms-eval``: lmms-eval's CLI answers a two-question local task through ``eval.grid``. Its CLI exits 0 even when
   a task fails, so success is read from its results file, as the evaluation stage does (~20 s).
3. ``deepspeed``: the DeepSpeed launcher runs one VisionZip‡ step through ``scripts/v1_5/finetune_visionzip.sh``,
   the same script the training stages use. On a new machine DeepSpeed first compiles its CPU communication op
   (~70 s, cached in ``TORCH_EXTENSIONS_DIR`` for the training stages); later runs take ~20 s.

``python -m eval.mini.preflight --out DIR`` runs them alone; ``eval.mini.reproduce`` runs them first.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

logger = logging.getLogger("eval.mini.preflight")

REPO = Path(__file__).resolve().parents[2]
# The module each later stage imports first, and the stage it serves.
STAGE_IMPORTS: dict[str, str] = {
    "deepspeed": "training (scripts/v1_5/*.sh)",
    "peft": "training (LoRA)",
    "lmms_eval.evaluator": "evaluation (lmms-eval)",
    "easy_vqa": "data (easy-VQA)",
}
QUESTIONS = (("red", (220, 30, 30)), ("blue", (30, 30, 220)))  # two one-colour images, one question each
TASK = "preflight_vqa"
STEP_TIMEOUT_S = 240  # a hung launcher fails the check rather than the whole quick start


class PreflightError(RuntimeError):
    """A stage's dependency is broken: the message names the stage, the check and the cause."""


def job_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a stage's subprocess: this one's, with this interpreter's ``bin/`` first on PATH, so that
    the training scripts find the ``deepspeed`` launcher of the environment the job runs in (``.venv``) whether or
    not it was activated; then ``extra``."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, **(extra or {})}


def check_imports() -> None:
    """Import what each later stage imports; raise naming every stage whose import fails."""
    failures = []
    for module, stage in STAGE_IMPORTS.items():
        try:
            importlib.import_module(module)
        except Exception as err:  # any failure at import time breaks that stage; report them all at once
            failures.append(f"{stage}: `import {module}` failed: {type(err).__name__}: {err}")
    if failures:
        raise PreflightError("imports:\n  " + "\n  ".join(failures) + "\nreinstall with `bash scripts/setup.sh`")


def write_inputs(root: Path) -> tuple[Path, Path]:
    """The tiny checkpoint and two LLaVA-format questions with their images; returns (checkpoint, data json)."""
    from llava.tiny import write_tiny_llava

    checkpoint = write_tiny_llava(root / "tiny")
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    items = []
    for name, colour in QUESTIONS:
        Image.new("RGB", (48, 32), colour).save(data / f"{name}.png")
        turns = [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": name}]
        items.append({"id": name, "image": f"{name}.png", "conversations": turns})
    (data / "items.json").write_text(json.dumps(items))
    return checkpoint, data / "items.json"


def _run(name: str, command: Sequence[str], log_path: Path, env: dict[str, str]) -> int:
    """Run ``command`` from the repository root into ``log_path``; its exit code. Raises PreflightError on timeout."""
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        try:
            return subprocess.run(
                command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=job_env(env),
                timeout=STEP_TIMEOUT_S,
            ).returncode  # fmt: skip
        except subprocess.TimeoutExpired as err:
            raise PreflightError(f"{name}: no result after {STEP_TIMEOUT_S} s; see {log_path}") from err


def _tail(path: Path, lines: int = 15) -> str:
    return f"last lines of {path}:\n" + "\n".join(path.read_text().splitlines()[-lines:])


def check_deepspeed(root: Path, checkpoint: Path, data: Path, port: int) -> None:
    """One VisionZip‡ step through the DeepSpeed launcher script, as the training stages run it."""
    out = root / "ft"
    env = {"GPUS": "1", "MODEL": str(checkpoint), "DATA": str(data), "IMAGES": str(data.parent), "OUT": str(out),
           "DOMINANT": "4", "CONTEXTUAL": "2", "FRACTION": "1.0", "BATCH": "2", "ACCUM": "1",
           "MASTER_PORT": str(port), "DEEPSPEED_CONFIG": str(REPO / "configs/deepspeed/zero2.json")}  # fmt: skip
    flags = ["--max_steps", "1", "--bf16", "False", "--report_to", "none", "--gradient_checkpointing", "False",
             "--dataloader_num_workers", "0", "--save_strategy", "no"]  # fmt: skip
    log = root / "deepspeed.log"
    code = _run("deepspeed", ["bash", "scripts/v1_5/finetune_visionzip.sh", *flags], log, env)
    if code != 0:
        raise PreflightError(f"deepspeed: exit {code}; {_tail(log)}")
    if not (out / "mm_projector.bin").is_file() and not (out / "mm_projector.safetensors").is_file():
        raise PreflightError(f"deepspeed: the launcher exited 0 but saved no projector in {out}")


def check_lmms_eval(root: Path, checkpoint: Path, data: Path) -> None:
    """lmms-eval's CLI on a two-question local task through ``eval.grid``; raise unless its results file is there."""
    from eval.local_task import read_llava_items, write_task

    write_task(read_llava_items(data), root / "tasks", TASK, max_new_tokens=2)
    spec = root / "preflight.yaml"
    spec.write_text(
        f"name: preflight\ntitle: preflight\ninclude_paths: [{root / 'tasks'}]\n"
        f"model: {{pretrained: {checkpoint}, device: cpu}}\nbaseline: {{method: vanilla, tokens: 1}}\nrows: []\n"
        f"benchmarks:\n  - {{column: VQA, task: {TASK}, metric: exact_match, scale: 100}}\n"
    )
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf")}
    results = root / "results"
    command = [sys.executable, "-m", "eval.grid", "--spec", str(spec), "--out", str(results), "--batch-size", "2"]
    code = _run("lmms-eval", command, root / "lmms_eval.log", offline)
    if code != 0 or not list(results.rglob("*_results.json")):
        cell_logs = sorted(results.rglob("lmms_eval.log"))  # what lmms-eval itself printed, where it got that far
        raise PreflightError(
            f"lmms-eval: no results file for {TASK}; {_tail(cell_logs[0] if cell_logs else root / 'lmms_eval.log')}"
        )


def preflight(root: Path, port: int = 29690) -> dict[str, float]:
    """Run every check under ``root`` (replaced each time); return seconds per check. Raises PreflightError."""
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    times: dict[str, float] = {}

    def timed(name: str, check: Callable[[], object]) -> object:
        start = time.perf_counter()
        result = check()
        times[name] = round(time.perf_counter() - start, 1)
        logger.info("preflight %s: ok in %.1f s", name, times[name])
        return result

    timed("imports", check_imports)
    checkpoint, data = timed("inputs", lambda: write_inputs(root))  # type: ignore[misc]
    timed("lmms-eval", lambda: check_lmms_eval(root, checkpoint, data))
    timed("deepspeed", lambda: check_deepspeed(root, checkpoint, data, port))
    (root / "times.json").write_text(json.dumps(times, indent=1))
    return times


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m eval.mini.preflight --out DIR``: exit 1 with the failing stage's message."""
    parser = argparse.ArgumentParser(prog="python -m eval.mini.preflight", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("playground/mini/preflight"), help="scratch folder")
    parser.add_argument("--port", type=int, default=29690, help="the DeepSpeed launcher's master port")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        times = preflight(args.out.resolve(), args.port)
    except PreflightError as err:
        print(f"preflight failed, environment broken for {err}", file=sys.stderr)
        return 1
    print(f"preflight ok in {sum(times.values()):.1f} s: {times}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
