"""Training under DeepSpeed on CPU through the real entry point: two ZeRO-3 ranks, one with only text-only samples,
and a ZeRO-2 run killed after a checkpoint and resumed.

Each rank is a subprocess running this file as a script (the driver at the bottom): ``train`` from
``llava.train.train`` with the command-line flags, plus callbacks that record the steps taken, write each rank's
gathered projector at the end, and can end the process right after a checkpoint is saved (a killed job).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import TrainerCallback

RECORD_ENV = "LLAVA_TEST_RECORD"  # folder for the per-rank step lists and projectors
EXIT_AFTER_ENV = "LLAVA_TEST_EXIT_AFTER_CHECKPOINT"  # the step whose checkpoint is the last thing the run does
KILLED_RC = 3  # what a run ended by EXIT_AFTER_ENV returns
TIMEOUT_S = 600  # a hang fails the test instead of blocking the suite
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------------
# the driver: one rank


class StepRecorder(TrainerCallback):
    """Appends each optimisation step this rank takes to ``steps_rank{R}.txt``, and writes the gathered projector
    to ``projector_rank{R}.pt`` at the end (under ZeRO-3 every rank takes part in the gather)."""

    def __init__(self, folder: Path, rank: int) -> None:
        self.folder, self.rank = folder, rank

    def on_step_end(self, args, state, control, **kwargs) -> None:
        with open(self.folder / f"steps_rank{self.rank}.txt", "a") as handle:
            handle.write(f"{state.global_step}\n")

    def on_train_end(self, args, state, control, model=None, **kwargs) -> None:
        import deepspeed

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = dict(base.get_model().mm_projector.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):  # a no-op outside ZeRO-3
            state_dict = {name: p.detach().clone() for name, p in params.items()}
        torch.save(state_dict, self.folder / f"projector_rank{self.rank}.pt")


class ExitAfterCheckpoint(TrainerCallback):
    """Ends the process at once after checkpoint-``step`` is written: what a killed job leaves behind."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs) -> None:
        if state.global_step == self.step:
            os._exit(KILLED_RC)


def _drive(argv: list[str]) -> None:
    from llava.train.train import train

    folder, rank = Path(os.environ[RECORD_ENV]), int(os.environ["RANK"])
    if int(os.environ["WORLD_SIZE"]) > 1:
        import deepspeed

        # On GPUs accelerate starts DeepSpeed's communication itself; on CPU (--use_cpu) it starts torch's gloo group
        # only, and DeepSpeed, which partitions the weights as they load (ZeRO-3), would see one rank.
        deepspeed.init_distributed(dist_backend="gloo")
    callbacks: list[TrainerCallback] = [StepRecorder(folder, rank)]
    if os.environ.get(EXIT_AFTER_ENV):
        callbacks.append(ExitAfterCheckpoint(int(os.environ[EXIT_AFTER_ENV])))
    train(argv, callbacks=callbacks)
    if torch.distributed.is_initialized():  # the group this driver started: released before the interpreter exits,
        torch.distributed.barrier()  # so gloo's threads are not torn down under a live group (an abort at exit)
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------------
# the tests: launch ranks, read what they recorded


def _launch(args: list[str], record: Path, world_size: int, **env: str) -> list[subprocess.CompletedProcess]:
    """Run ``world_size`` ranks of the driver as the launcher would (gloo on CPU); kill them all on a hang."""
    from helpers.training import free_port

    record.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        rank_env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                    "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                    "OMP_NUM_THREADS": "1", RECORD_ENV: str(record), **env}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, __file__, *args], env=rank_env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT_S)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{world_size} DeepSpeed rank(s) still running after {TIMEOUT_S} s: a hang")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


def _deepspeed_args(
    ckpt: Path, data: tuple[Path, Path], out: Path, stage: str, *extra: str, steps: int, world_size: int = 1
) -> list[str]:
    """The training flags for DeepSpeed on CPU. One rank: without ``--use_cpu`` (DeepSpeed picks its CPU accelerator
    itself). Several: with it, since on a machine without an accelerator only that makes accelerate set up the gloo
    process group over all ranks (it then still hands the model to DeepSpeed)."""
    from helpers.training import train_args

    args = train_args(
        ckpt, data, out, "--deepspeed", str(ROOT / f"configs/deepspeed/{stage}.json"), *extra, steps=steps
    )
    if world_size == 1:
        at = args.index("--use_cpu")
        del args[at : at + 2]
    return args


def _steps(record: Path, rank: int = 0) -> list[int]:
    return [int(line) for line in (record / f"steps_rank{rank}.txt").read_text().split()]


def _mixed_data(root: Path) -> tuple[Path, Path]:
    """One sample with an image and one without: with modality grouping, rank 0 gets the first, rank 1 the other."""
    images = root / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (48, 64), (220, 30, 30)).save(images / "0.png")
    ask = [{"from": "human", "value": "What colour is it?\n<image>"}, {"from": "gpt", "value": "red"}]
    chat = [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi there."}]
    path = root / "data.json"
    path.write_text(json.dumps([{"id": "img", "image": "0.png", "conversations": ask},
                                {"id": "text", "conversations": chat}]))  # fmt: skip
    return path, images


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llava.tiny import write_tiny_llava

    return write_tiny_llava(tmp_path_factory.mktemp("ckpt"))


@pytest.mark.slow
def test_zero3_rank_with_only_text_runs_the_same_modules(ckpt: Path, tmp_path: Path) -> None:
    """Full fine-tuning (gradient checkpointing on, as the recipes), ZeRO-3, two ranks: every step rank 0 has the
    image sample and rank 1 the text-only one.

    Without the image path on text-only batches, rank 1 skips the tower and projector that rank 0 gathers:
    DeepSpeed fails on the differing module order, or the ranks hang in mismatched collectives.
    """
    pytest.importorskip("deepspeed")
    data = _mixed_data(tmp_path / "data")
    args = _deepspeed_args(ckpt, data, tmp_path / "out", "zero3", "--per_device_train_batch_size", "1",
                           "--group_by_modality_length", "True", "--gradient_checkpointing", "True",
                           "--learning_rate", "1e-3", "--save_strategy", "no", steps=2, world_size=2)  # fmt: skip
    ranks = _launch(args, tmp_path / "record", world_size=2)
    for rank, done in enumerate(ranks):
        assert done.returncode == 0, f"rank {rank}:\n{done.stderr[-3000:]}"
        assert _steps(tmp_path / "record", rank) == [1, 2]
    losses = [e["loss"] for e in json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
              if "loss" in e]  # fmt: skip
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    first, second = (torch.load(tmp_path / "record" / f"projector_rank{r}.pt", weights_only=True) for r in (0, 1))
    from safetensors.torch import load_file

    start = load_file(str(ckpt / "model.safetensors"))
    for name, value in first.items():
        assert torch.equal(value, second[name]), f"the ranks disagree on the projector's {name}"
        assert not torch.equal(value, start[f"model.mm_projector.{name}"]), f"{name} did not train"


@pytest.mark.slow
def test_zero2_resume_after_a_kill_matches_an_uninterrupted_run(ckpt: Path, tmp_path: Path) -> None:
    """VisionZip‡ (projector) under ZeRO-2: a run ended right after checkpoint-2 resumes with ``auto`` at step 3 (past
    a newer, half-written checkpoint), repeating no step, and ends with the projector of an uninterrupted run."""
    pytest.importorskip("deepspeed")
    from helpers.training import projector_weights, write_data

    data = write_data(tmp_path / "data", n=16)
    extra = ("--tune_mm_mlp_adapter", "True", "--visionzip_dominant", "6", "--visionzip_contextual", "2",
             "--save_steps", "2")  # fmt: skip
    whole = _launch(_deepspeed_args(ckpt, data, tmp_path / "whole", "zero2", *extra, steps=4),
                    tmp_path / "rec-whole", world_size=1)[0]  # fmt: skip
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed_args = _deepspeed_args(ckpt, data, tmp_path / "killed", "zero2", *extra, steps=4)
    killed = _launch(killed_args, tmp_path / "rec-killed", world_size=1, **{EXIT_AFTER_ENV: "2"})[0]
    assert killed.returncode == KILLED_RC, killed.stderr[-3000:]
    assert _steps(tmp_path / "rec-killed") == [1, 2] and not (tmp_path / "killed" / "mm_projector.bin").exists()
    partial = tmp_path / "killed" / "checkpoint-4"  # as if killed again while saving step 4: weights, no engine state
    partial.mkdir()
    for name in ("mm_projector.bin", "mm_projector.safetensors", "config.json"):
        shutil.copy(tmp_path / "killed" / "checkpoint-2" / name, partial / name)
    resumed = _launch([*killed_args, "--resume_from_checkpoint", "auto"], tmp_path / "rec-resumed", world_size=1)[0]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _steps(tmp_path / "rec-resumed") == [3, 4], "the resumed run repeated or skipped steps"
    assert _steps(tmp_path / "rec-whole") == [1, 2, 3, 4]
    reference = projector_weights(tmp_path / "whole")
    for name, value in projector_weights(tmp_path / "killed").items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-6)


if __name__ == "__main__":
    _drive(sys.argv[1:])
