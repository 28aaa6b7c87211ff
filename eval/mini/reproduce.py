"""The paper in miniature, end to end (python -m eval.mini.reproduce --out playground/mini [--seeds 0 1 2] [--smoke]).

Stages, each skipped when its output exists (so an interrupted run resumes where it stopped):

1. ``data``, ``clip``, ``base``: the two splits (easy-VQA and the small-object split), the tiny CLIP and the tiny
   Llama (``eval.mini.{data,clip,base}``); shared by every training seed.
2. Per training seed, under ``seed-<k>/``: ``stage1`` (projector, ``plain`` captions) and ``stage2`` (projector +
   LLM, ``v1``) on the union of both splits, through ``scripts/v1_5/{pretrain,finetune}.sh`` (the DeepSpeed
   launcher, one CPU process).
3. ``ft-<layout>-<N>``: VisionZip‡, the projector fine-tuned on N compressed tokens in each position layout
   (``scripts/v1_5/finetune_visionzip.sh``).
4. ``tasks`` + ``eval``: seeded test subsets as local lmms-eval tasks; ``eval.grid --in-process`` runs every row of
   the spec (vanilla; per budget and position layout: VisionZip, dominant-only, VisionZip without [CLS], random
   patches, VisionZip‡) through lmms-eval's evaluator in one process.
5. ``ttft`` + render: time to first token per token count, the table (``eval.tables``) and its retention plot.
6. With two or more seeds: ``seeds.md`` (``eval.tables.seeds``), every row as mean ± sd over the seeds and paired
   tests on the same questions (VisionZip against random patches and against dominant-only, per budget and layout).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from eval.mini.preflight import PreflightError

logger = logging.getLogger("eval.mini.reproduce")

REPO = Path(__file__).resolve().parents[2]
SPLITS: tuple[str, ...] = ("easy", "small")
FULL_TOKENS = 64  # 96 / 12 = 8 x 8 patches of the tiny CLIP; [CLS] is not passed to the LLM
# VisionZipConfig.positions -> the suffix of a row's method name ("packed" is the released layout: no suffix)
LAYOUTS: dict[str, str] = {"packed": "", "original": " (orig. pos.)"}

TRAIN_FLAGS: tuple[str, ...] = (
    "--bf16", "False", "--report_to", "none", "--gradient_checkpointing", "False", "--dataloader_num_workers", "0",
    "--model_max_length", "160", "--mm_projector_type", "mlp2x_gelu", "--logging_steps", "10",
    # a stage killed midway resumes from its last checkpoint (the scripts pass --resume_from_checkpoint auto)
    "--save_strategy", "steps", "--save_steps", "500", "--save_total_limit", "1",
)  # fmt: skip


@dataclass(frozen=True)
class ReproConfig:
    """Sizes, steps and seeds of one reproduction; written to ``<out>/seed-<k>/reproduce.json``."""

    limit: int | None = None  # images per split for data and CLIP (smoke runs)
    clip_max_steps: int | None = None
    clip_epochs: int | None = 4  # shapes are learnt late (easy-VQA shape zero-shot: 0.69 after 4 epochs)
    batch: int = 32
    pretrain_steps: int = 150  # 100 left the small objects unread (small split at 42.8 %, per-type majority 36.4)
    pretrain_lr: float = 1e-3
    finetune_steps: int = 1000  # one epoch of the balanced union (2 x 16,000 questions)
    finetune_lr: float = 2e-3  # a 658k-parameter LLM trained from scratch: LLaVA's 2e-5 is for a pretrained 7B
    ft_lr: float = 2e-4  # VisionZip‡: the projector is aligned already, so a tenth of stage 2's peak
    ft_fraction: float = 0.1  # of the balanced union: 3,200 questions, 100 steps
    ft_max_steps: int | None = None
    budgets: tuple[int, ...] = (22, 14, 7)  # ~1/3, 2/9, 1/9 of 64 tokens
    ft_budgets: tuple[int, ...] = (7,)  # VisionZip‡ at the paper's headline ratio (64 of 576) only: time
    layouts: tuple[str, ...] = tuple(LAYOUTS)
    eval_questions: int = 500  # per split, a seeded subset of the test questions (the same for every seed)
    eval_batch: int = 32
    eval_workers: int = 2  # evaluation processes side by side, one thread each
    max_new_tokens: int = 3
    ttft_runs: int = 15
    seed: int = 0  # data subsets for evaluation, TTFT inputs
    train_seed: int = 0  # every training stage (--seed, --data_seed): the initial projector, data order
    master_port: int = 29710

    def __post_init__(self) -> None:
        """Validate: FT budgets must be evaluated budgets; known layouts; positive sizes."""
        if not set(self.ft_budgets) <= set(self.budgets):
            raise ValueError(f"ft_budgets {self.ft_budgets} must be among budgets {self.budgets}")
        if not self.layouts or not set(self.layouts) <= set(LAYOUTS):
            raise ValueError(f"layouts must be a non-empty subset of {tuple(LAYOUTS)}, got {self.layouts}")
        if min(self.batch, self.pretrain_steps, self.finetune_steps, self.eval_questions, self.eval_batch) < 1:
            raise ValueError(f"sizes and steps must be >= 1: {self}")
        if not 0 < self.ft_fraction <= 1:
            raise ValueError(f"ft_fraction must be in (0, 1], got {self.ft_fraction}")


SMOKE = ReproConfig(
    limit=40, clip_max_steps=2, clip_epochs=1, batch=4, pretrain_steps=3, finetune_steps=4, ft_max_steps=2,
    budgets=(7,), ft_budgets=(7,), eval_questions=12, eval_batch=12, ttft_runs=3, master_port=29760,
)  # fmt: skip


@dataclass(frozen=True)
class Paths:
    """Where every stage of a reproduction under ``root`` writes: shared inputs, and one folder per training seed."""

    root: Path
    seed: int = 0

    def __getattr__(self, name: str) -> Path:  # only called for names not set: the stage folders below
        shared = {"data": "data", "clip": "clip", "base": "base", "union": "union", "tasks": "eval/tasks"}
        per_seed = {"stage1": "stage1", "stage2": "stage2", "results": "eval/results", "logs": "logs"}
        if name in shared:
            return self.root / shared[name]
        if name in per_seed:
            return self.run / per_seed[name]
        raise AttributeError(name)

    @property
    def run(self) -> Path:
        """The folder of this training seed's checkpoints, results and tables."""
        return self.root / f"seed-{self.seed}"

    def ft(self, budget: int, layout: str = "packed") -> Path:
        """The VisionZip‡ projector fine-tuned at ``budget`` tokens in position ``layout``."""
        return self.run / f"ft-{layout}-{budget}"

    @property
    def spec(self) -> Path:
        """The generated table spec."""
        return self.run / "eval" / "mini.yaml"


# --- running stages ---------------------------------------------------------------------------------------------------
class Background:
    """A command running beside the stages (the preflight): stages poll it and stop as soon as it has failed."""

    def __init__(self, name: str, command: Sequence[str], log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.name, self.log_path, self.start = name, log_path, time.perf_counter()
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(command) + "\n")
            log.flush()
            self.process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        logger.info("%s: running beside the first stages (log: %s)", name, log_path)

    def failed(self) -> bool:
        """True once the command has exited with an error."""
        return self.process.poll() not in (None, 0)

    def error(self) -> PreflightError:
        """The failure, with the end of the command's log (it names the broken stage)."""
        tail = "\n".join(self.log_path.read_text().splitlines()[-15:])
        return PreflightError(f"{self.name} (exit {self.process.returncode}); last lines of {self.log_path}:\n{tail}")

    def wait(self) -> float:
        """Wait for the command; its seconds. Raises PreflightError if it failed."""
        if self.process.wait() != 0:
            raise self.error()
        return round(time.perf_counter() - self.start, 1)

    def stop(self) -> None:
        """Terminate the command if it still runs (a later stage failed first): no orphan outlives the job."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _start(name: str, command: Sequence[str], paths: Paths, env: dict[str, str] | None) -> subprocess.Popen:
    """Start ``command`` from the repository root, its output appended to ``<logs>/<name>.log``."""
    paths.logs.mkdir(parents=True, exist_ok=True)
    log_path = paths.logs / f"{name}.log"
    logger.info("%s: running (log: %s)", name, log_path)
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        full_env = {**os.environ, **(env or {})}
        return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=full_env)


def run_parallel(jobs: Sequence[tuple[str, Sequence[str], dict[str, str] | None]], paths: Paths,
                 watch: Background | None = None) -> None:  # fmt: skip
    """Run ``(name, command, env)`` jobs side by side; raise naming the first that fails (the others are stopped).

    ``watch``: a background check whose failure stops the jobs too (PreflightError).
    """
    running = {name: _start(name, command, paths, env) for name, command, env in jobs}
    try:
        while running:
            if watch is not None and watch.failed():
                raise watch.error()
            for name, process in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                del running[name]
                if code != 0:
                    log_path = paths.logs / f"{name}.log"
                    tail = "\n".join(log_path.read_text().splitlines()[-20:])
                    raise RuntimeError(f"stage {name} failed (exit {code}); last lines of {log_path}:\n{tail}")
            time.sleep(0.5)
    finally:
        for process in running.values():
            process.terminate()
            process.wait()


def run_logged(name: str, command: Sequence[str], paths: Paths, env: dict[str, str] | None = None,
               watch: Background | None = None) -> None:  # fmt: skip
    """Run ``command`` from the repository root, its output in ``<logs>/<name>.log``; raise if it fails."""
    run_parallel([(name, command, env)], paths, watch)


class Timer:
    """Seconds per stage, kept in ``<root>/timings.json`` across resumed runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.times: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}
        self.start = time.perf_counter()

    def stage(self, name: str, done: Callable[[], bool], work: Callable[[], None]) -> None:
        """Run ``work`` unless ``done()``; check that it produced its output; record how long it took."""
        if done():
            logger.info("%s: done already, skipped", name)
            return
        start = time.perf_counter()
        work()
        if not done():
            raise RuntimeError(f"stage {name} finished but its output is missing")
        self.times[name] = round(time.perf_counter() - start, 1)
        self.path.write_text(json.dumps(self.times, indent=1))
        logger.info("%s: done in %.1f s (%s elapsed)", name, self.times[name], _clock(time.perf_counter() - self.start))


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def _manifest_done(folder: Path) -> bool:
    return (folder / "manifest.json").exists()


def stage_inputs(cfg: ReproConfig, paths: Paths, timer: Timer, watch: Background | None = None) -> None:
    """Data, CLIP and LLM through their own modules (each also skips itself when its manifest matches).

    ``watch``: the preflight running beside them; its failure stops the stage in progress.
    """
    py = sys.executable
    limit = ["--limit", str(cfg.limit)] if cfg.limit else []
    data_cmd = [py, "-m", "eval.mini.data", "--out", str(paths.data), "--split", *SPLITS, *limit]
    data_done = lambda: all(_manifest_done(paths.data / s) for s in SPLITS)  # noqa: E731
    timer.stage("data", data_done, lambda: run_logged("data", data_cmd, paths, watch=watch))
    clip_cmd = [py, "-m", "eval.mini.clip", "--data", str(paths.data), "--out", str(paths.clip), "--kinds", *SPLITS]
    clip_cmd += limit
    clip_cmd += ["--max-steps", str(cfg.clip_max_steps)] if cfg.clip_max_steps else []
    clip_cmd += ["--epochs", str(cfg.clip_epochs)] if cfg.clip_epochs else []
    timer.stage("clip", lambda: _manifest_done(paths.clip), lambda: run_logged("clip", clip_cmd, paths, watch=watch))
    base_cmd = [py, "-m", "eval.mini.base", "--out", str(paths.base), "--data", str(paths.data), "--kinds", *SPLITS]
    timer.stage("base", lambda: _manifest_done(paths.base), lambda: run_logged("base", base_cmd, paths, watch=watch))


def write_union(paths: Paths, name: str, balance: bool = False, seed: int = 0) -> Path:
    """``<union>/<name>.json``: both splits' ``<name>.json`` with image paths relative to the data root.

    ``balance``: every split gives as many samples as the smallest one (a seeded subset), so that each weighs the
    same in training (easy-VQA asks ~10 questions per image, the small split 4).
    """
    per_split = {split: json.loads((paths.data / split / f"{name}.json").read_text()) for split in SPLITS}
    count = min(len(items) for items in per_split.values())
    items = []
    for split, records in per_split.items():
        if balance and len(records) > count:
            rng = random.Random(f"mini-union/{seed}/{split}")
            records = [records[i] for i in sorted(rng.sample(range(len(records)), count))]
        items += [{**item, "image": f"{split}/{item['image']}"} for item in records]
    paths.union.mkdir(parents=True, exist_ok=True)
    out = paths.union / f"{name}.json"
    out.write_text(json.dumps(items))
    logger.info("union %s: %d samples -> %s", name, len(items), out)
    return out


def train_env(cfg: ReproConfig, paths: Paths, port_offset: int, **extra: str) -> dict[str, str]:
    """Environment of a ``scripts/v1_5`` job: one CPU process, ZeRO-2, its own port."""
    env = {"GPUS": "1", "DEEPSPEED_CONFIG": str(REPO / "configs/deepspeed/zero2.json"), "BATCH": str(cfg.batch),
           "ACCUM": "1", "IMAGES": str(paths.data), "MASTER_PORT": str(cfg.master_port + port_offset)}  # fmt: skip
    return {**env, **extra}


def stage_training(cfg: ReproConfig, paths: Paths, timer: Timer) -> None:
    """Stage 1 (projector on captions) and stage 2 (projector + LLM on questions) on both splits."""
    seed = ["--seed", str(cfg.train_seed), "--data_seed", str(cfg.train_seed)]
    s1_env = train_env(cfg, paths, 0, LLM=str(paths.base), VISION_TOWER=str(paths.clip), OUT=str(paths.stage1))
    s1_flags = [*TRAIN_FLAGS, *seed, "--max_steps", str(cfg.pretrain_steps), "--learning_rate", str(cfg.pretrain_lr)]

    def stage1() -> None:
        s1_env["DATA"] = str(write_union(paths, "pretrain"))
        run_logged("stage1", ["bash", "scripts/v1_5/pretrain.sh", *s1_flags], paths, s1_env)

    timer.stage("stage1", lambda: (paths.stage1 / "mm_projector.bin").exists(), stage1)
    s2_env = train_env(cfg, paths, 1, LLM=str(paths.base), VISION_TOWER=str(paths.clip), OUT=str(paths.stage2),
                       PROJECTOR=str(paths.stage1 / "mm_projector.bin"))  # fmt: skip
    s2_flags = [*TRAIN_FLAGS, *seed, "--max_steps", str(cfg.finetune_steps), "--learning_rate", str(cfg.finetune_lr)]

    def stage2() -> None:
        s2_env["DATA"] = str(write_union(paths, "train", balance=True, seed=cfg.seed))
        run_logged("stage2", ["bash", "scripts/v1_5/finetune.sh", *s2_flags], paths, s2_env)

    timer.stage("stage2", lambda: (paths.stage2 / "model.safetensors").exists(), stage2)


def stage_visionzip_ft(cfg: ReproConfig, paths: Paths, timer: Timer) -> None:
    """VisionZip‡: the stage-2 projector fine-tuned on compressed tokens, ``ft_fraction`` of the data, per budget and
    position layout (the projector learns the tokens in the positions it will see them at).

    The layouts of one budget train side by side, one thread each: a job this small spends half its time starting
    up (imports, the launcher), which one core does as fast as two.
    """
    from visionzip import VisionZipConfig

    for i, budget in enumerate(cfg.ft_budgets):
        split = VisionZipConfig.from_budget(budget)
        jobs = []
        for j, layout in enumerate(cfg.layouts):
            out = paths.ft(budget, layout)
            if (out / "mm_projector.bin").exists():
                continue
            env = train_env(cfg, paths, 2 + i * len(cfg.layouts) + j, MODEL=str(paths.stage2),
                            VISION_TOWER=str(paths.clip), DATA=str(paths.union / "train.json"),
                            DOMINANT=str(split.dominant), CONTEXTUAL=str(split.contextual),
                            FRACTION=str(cfg.ft_fraction), OUT=str(out), OMP_NUM_THREADS="1")  # fmt: skip
            seeds = ["--seed", str(cfg.train_seed), "--data_seed", str(cfg.train_seed)]
            flags = [*TRAIN_FLAGS, *seeds, "--learning_rate", str(cfg.ft_lr), "--visionzip_positions", layout]
            flags += ["--max_steps", str(cfg.ft_max_steps)] if cfg.ft_max_steps else []
            jobs.append((out.name, ["bash", "scripts/v1_5/finetune_visionzip.sh", *flags], env))
        done = lambda b=budget: all((paths.ft(b, lay) / "mm_projector.bin").exists() for lay in cfg.layouts)  # noqa: E731
        timer.stage(f"ft-{budget}", done, lambda jobs=jobs: run_parallel(jobs, paths))


# --- evaluation -------------------------------------------------------------------------------------------------------
def task_name(split: str) -> str:
    """The lmms-eval task of a split's test subset."""
    return f"mini_{split}"


def write_task_items(cfg: ReproConfig, paths: Paths, split: str) -> Path:
    """A seeded subset of ``split``'s test questions as LLaVA items whose prompt is the bare question.

    The local task adds LLaVA-1.5's short-answer prompt itself, so the training prompt is rebuilt exactly.
    """
    items = json.loads((paths.data / split / "test.json").read_text())
    rng = random.Random(cfg.seed)
    chosen = sorted(rng.sample(range(len(items)), min(cfg.eval_questions, len(items))))
    out = []
    for i in chosen:
        item = items[i]
        turns = [{"from": "human", "value": "<image>\n" + item["question"]}, {"from": "gpt", "value": item["answer"]}]
        out.append({"id": item["id"], "image": item["image"], "conversations": turns})
    path = paths.tasks / f"{split}_items.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return path


def stage_tasks(cfg: ReproConfig, paths: Paths, timer: Timer) -> None:
    """One local lmms-eval task per split (``eval.local_task``), exact match, ``max_new_tokens`` answer tokens."""
    for split in SPLITS:
        task = task_name(split)

        def work(split: str = split, task: str = task) -> None:
            items = write_task_items(cfg, paths, split)
            command = [sys.executable, "-m", "eval.local_task", "from-json", "--data", str(items), "--image-folder",
                       str(paths.data / split), "--out", str(paths.tasks), "--task", task,
                       "--max-new-tokens", str(cfg.max_new_tokens)]  # fmt: skip
            run_logged(f"task-{split}", command, paths)

        timer.stage(f"task-{split}", lambda task=task: (paths.tasks / f"{task}.yaml").exists(), work)


def spec_rows(cfg: ReproConfig, paths: Paths) -> list[dict[str, Any]]:
    """Vanilla, then per budget and position layout: VisionZip, its ablations/baselines and VisionZip‡ (if tuned)."""
    rows: list[dict[str, Any]] = [{"method": "Vanilla", "tokens": FULL_TOKENS}]
    for n in cfg.budgets:
        for layout in cfg.layouts:
            suffix, pos = LAYOUTS[layout], {"positions": layout}
            rows += [
                {"method": f"VisionZip{suffix}", "tokens": n, "model_args": {"budget": n, **pos}},
                {"method": f"Dominant only{suffix}", "tokens": n,
                 "model_args": {"dominant": n, "contextual": 0, **pos}},
                {"method": f"VisionZip w/o CLS{suffix}", "tokens": n,
                 "model_args": {"budget": n, "cls_token": False, **pos}},
                {"method": f"Random patches{suffix}", "tokens": n,
                 "model_args": {"budget": n, "selection": "random", **pos}},
            ]  # fmt: skip
            if n in cfg.ft_budgets:
                ft_args = {"budget": n, "model_base": str(paths.stage2), **pos}
                rows.append({"method": f"VisionZip-FT{suffix}", "tokens": n, "model_args": ft_args,
                             "pretrained": str(paths.ft(n, layout))})  # fmt: skip
    return rows


def write_spec(cfg: ReproConfig, paths: Paths) -> Path:
    """The table spec (``eval/tables/spec.py`` format) of this reproduction, with absolute paths."""
    note = f"{cfg.eval_questions} seeded test questions (seed {cfg.seed}), exact match"
    spec = {
        "name": "mini",
        "title": "The paper in miniature: tiny LLaVA (64 visual tokens) on easy-VQA and a small-object split",
        "include_paths": [str(paths.tasks)],
        "model": {"pretrained": str(paths.stage2), "conv_template": "vicuna_v1"},
        "baseline": {"method": "Vanilla", "tokens": FULL_TOKENS},
        "rows": spec_rows(cfg, paths),
        "benchmarks": [
            {"column": split, "task": task_name(split), "metric": "exact_match", "scale": 100, "note": note}
            for split in SPLITS
        ],
        "notes": [
            "Budgets keep the paper's dominant:contextual proportion (22 = 19+3, 14 = 12+2, 7 = 6+1); dominant "
            "counts [CLS]. Dominant only: N dominant, 0 contextual. w/o CLS: tokens scored by attention received. "
            "VisionZip-FT = VisionZip‡ (projector fine-tuned on compressed tokens, 1/10 of the training questions). "
            "(orig. pos.): kept tokens at their patches' position ids, text after at its full-token position "
            "(VisionZipConfig.positions='original'); without it tokens are packed, as the released code does.",
        ],
    }
    paths.spec.parent.mkdir(parents=True, exist_ok=True)
    paths.spec.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    return paths.spec


def stage_eval(cfg: ReproConfig, paths: Paths, timer: Timer) -> None:
    """Every (row, task) cell through lmms-eval's evaluator in-process (``eval.grid --in-process``: lmms-eval is
    imported and its tasks indexed once per process, not once per row), the rows dealt to ``eval_workers`` processes
    of one thread each; the grid skips the cells already done."""
    spec = write_spec(cfg, paths)
    rows = [_row_id(r) for r in spec_rows(cfg, paths)]
    pending = [row for row in rows if not _has_results(paths, row)]  # a resumed run starts no idle worker
    workers = min(cfg.eval_workers, len(pending))
    command = [sys.executable, "-m", "eval.grid", "--spec", str(spec), "--out", str(paths.results), "--group",
               "--in-process", "--batch-size", str(cfg.eval_batch), "--rows"]  # fmt: skip
    jobs = [(f"eval-{k}", [*command, *pending[k::workers]], {"OMP_NUM_THREADS": "1"}) for k in range(workers)]
    start = time.perf_counter()
    run_parallel(jobs, paths)
    missing = [row for row in rows if not _has_results(paths, row)]
    if missing:
        raise RuntimeError(f"eval: rows without results: {missing}; see {paths.logs}/eval-*.log")
    timer.times["eval"] = round(timer.times.get("eval", 0.0) + time.perf_counter() - start, 1)
    timer.path.write_text(json.dumps(timer.times, indent=1))
    logger.info("eval: done in %.1f s (%s elapsed)", timer.times["eval"], _clock(time.perf_counter() - timer.start))


def _has_results(paths: Paths, row: str) -> bool:
    """Whether the grid has written the row's results (its tasks run grouped, so one file holds them all)."""
    return any((paths.results / row).rglob("*_results.json"))


def _row_id(row: dict[str, Any]) -> str:
    """The grid's folder name of a row (``eval.tables.spec.Row.id``): ``visionzip-w-o-cls-7``."""
    slug = "".join(c if c.isalnum() else "-" for c in row["method"].lower())
    return "-".join(part for part in slug.split("-") if part) + f"-{row['tokens']}"


# --- time to first token ----------------------------------------------------------------------------------------------
def measure_ttft(cfg: ReproConfig, paths: Paths) -> dict[str, float]:
    """Median prefill milliseconds (vision tower, VisionZip, projector, LLM prefill) of one test question, per count."""
    import torch
    from PIL import Image

    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.conversation import get_conv_template
    from llava.eval.run_llava import build_prompt, build_query, measure_prefill, prepare_images
    from llava.mm_utils import tokenizer_image_token
    from llava.model.builder import load_pretrained_model
    from visionzip import VisionZipConfig

    torch.manual_seed(cfg.seed)
    tokenizer, model, processor, _ = load_pretrained_model(str(paths.stage2), device="cpu", device_map=None)
    item = json.loads((paths.data / SPLITS[-1] / "test.json").read_text())[0]
    with Image.open(paths.data / SPLITS[-1] / item["image"]) as image:
        pixels, sizes = prepare_images([image.convert("RGB")], processor, model)
    prompt = build_prompt(get_conv_template("vicuna_v1"), build_query(item["question"], 1, model.config))
    ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
    result: dict[str, float] = {}
    for tokens in (FULL_TOKENS, *cfg.budgets):
        model.set_visionzip(VisionZipConfig.from_budget(tokens) if tokens != FULL_TOKENS else None)
        measure_prefill(model, ids, pixels, sizes)  # warm-up
        times = [measure_prefill(model, ids, pixels, sizes)[0] for _ in range(cfg.ttft_runs)]
        result[str(tokens)] = round(statistics.median(times), 3)
        logger.info("ttft at %d visual tokens: %.2f ms (median of %d)", tokens, result[str(tokens)], cfg.ttft_runs)
    return result


def stage_ttft(cfg: ReproConfig, paths: Paths, timer: Timer) -> None:
    """``<root>/ttft.json``: ``{tokens: median ms}`` on this CPU (ratios matter, not absolute times)."""
    out = paths.run / "ttft.json"
    timer.stage("ttft", out.exists, lambda: out.write_text(json.dumps(measure_ttft(cfg, paths), indent=1)))


# --- rendering --------------------------------------------------------------------------------------------------------
def read_table(csv_path: Path) -> dict[tuple[str, int], dict[str, float | None]]:
    """``{(method, tokens): {column: value}}`` from the CSV ``eval.tables`` wrote."""
    import csv

    table: dict[tuple[str, int], dict[str, float | None]] = {}
    with open(csv_path, newline="") as handle:
        for line in csv.DictReader(handle):
            value = float(line["ours"]) if line["ours"] not in ("", "None") else None
            table.setdefault((line["method"], int(line["tokens"])), {})[line["column"]] = value
    return table


def summary_markdown(table: dict[tuple[str, int], dict[str, float | None]], ttft: dict[str, float]) -> str:
    """Accuracy and retention per split, and time to first token per visual token count."""
    base = table[("Vanilla", FULL_TOKENS)]
    splits = " | ".join(f"{s} acc | {s} ret %" for s in SPLITS)
    header = f"| Method | Tokens | {splits} | Avg ret % | TTFT ms | TTFT x |"
    lines = [header, "|---|---:|" + "---:|" * (2 * len(SPLITS) + 3)]
    full_ms = ttft.get(str(FULL_TOKENS))
    for (method, tokens), values in table.items():
        cells = []
        for split in SPLITS:
            acc, ref = values.get(split), base.get(split)
            cells += [_num(acc), _num(100 * acc / ref if acc is not None and ref else None)]
        ms = ttft.get(str(tokens))
        ratio = _num(ms / full_ms, 2) if ms is not None and full_ms else "-"
        cells += [_num(values.get("Avg %")), _num(ms, 2), ratio]
        lines.append(f"| {method} | {tokens} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(cfg: ReproConfig, paths: Paths) -> str:
    """``eval.tables`` (mini.md/.csv/.png: table and retention plot), then the per-split summary with TTFT."""
    command = [sys.executable, "-m", "eval.tables", "--spec", str(paths.spec), "--results", str(paths.results),
               "--out", str(paths.run)]  # fmt: skip
    run_logged("render", command, paths)
    ttft = json.loads((paths.run / "ttft.json").read_text())
    summary = summary_markdown(read_table(paths.run / "mini.csv"), ttft)
    timings = json.loads((paths.run / "timings.json").read_text())
    text = (paths.run / "mini.md").read_text() + "\n#### Per split, with time to first token (CPU)\n\n" + summary
    text += "\nStage times (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()) + "\n"
    (paths.run / "reproduce.md").write_text(text)
    return text


# --- entry point ------------------------------------------------------------------------------------------------------
def reproduce_seed(out: Path, cfg: ReproConfig, watch: Background | None = None) -> str:
    """Every stage of one training seed (``cfg.train_seed``) not done yet; return its rendered tables (Markdown).

    ``watch``: the preflight, running beside the input stages; training waits for it to pass.
    """
    paths = Paths(out.resolve(), cfg.train_seed)
    paths.run.mkdir(parents=True, exist_ok=True)
    (paths.run / "reproduce.json").write_text(json.dumps(asdict(cfg), indent=1))
    timer = Timer(paths.run / "timings.json")
    stage_inputs(cfg, paths, timer, watch)
    if watch is not None:
        timer.times["preflight"] = watch.wait()
        logger.info("preflight: passed in %.1f s (beside the first stages)", timer.times["preflight"])
    stage_training(cfg, paths, timer)
    stage_visionzip_ft(cfg, paths, timer)
    stage_tasks(cfg, paths, timer)
    stage_eval(cfg, paths, timer)
    stage_ttft(cfg, paths, timer)
    return render(cfg, paths)


def comparisons(layouts: Sequence[str]) -> list[tuple[str, str]]:
    """The seeds table's paired tests: VisionZip against random patches and dominant-only in each layout, and the
    two layouts of VisionZip against each other."""
    pairs = [(f"VisionZip{LAYOUTS[lay]}", f"{other}{LAYOUTS[lay]}") for lay in layouts
             for other in ("Random patches", "Dominant only")]  # fmt: skip
    if set(LAYOUTS) <= set(layouts):
        pairs.append((f"VisionZip{LAYOUTS['original']}", "VisionZip"))
    return pairs


def aggregate_seeds(out: Path, cfg: ReproConfig, seeds: Sequence[int]) -> str:
    """``<out>/seeds.md|csv``: every row as mean ± sd over ``seeds`` and the paired tests (``eval.tables.seeds``)."""
    runs = [Paths(out.resolve(), seed) for seed in seeds]
    command = [sys.executable, "-m", "eval.tables.seeds", "--spec", str(runs[0].spec), "--out", str(out.resolve()),
               "--name", "seeds", "--results", *(str(run.results) for run in runs)]  # fmt: skip
    for a, b in comparisons(cfg.layouts):
        command += ["--compare", f"{a}|{b}"]
    run_logged("seeds", command, runs[0])
    return (out / "seeds.md").read_text()


def reproduce(out: Path, cfg: ReproConfig, preflight: bool = True, seeds: Sequence[int] = (0,)) -> str:
    """Run every stage not done yet under ``out`` for each training seed; return the rendered tables (Markdown).

    ``preflight`` first checks, in about a minute, that every later stage's dependencies work
    (:mod:`eval.mini.preflight`); it raises ``PreflightError`` naming the broken stage. With several ``seeds``
    the data, CLIP and LLM are shared, each seed trains and evaluates under ``seed-<k>/``, and ``seeds.md`` gives
    mean ± sd and paired tests over them.
    """
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    watch = None
    if preflight:  # every run: a dependency may have broken since the last one
        command = [sys.executable, "-m", "eval.mini.preflight", "--out", str(out.resolve() / "preflight"),
                   "--port", str(cfg.master_port - 20)]  # fmt: skip
        watch = Background("preflight", command, out.resolve() / "preflight.log")
    texts = []
    try:
        for k, seed in enumerate(seeds):
            logger.info("training seed %d (%d of %d)", seed, k + 1, len(seeds))
            texts.append(reproduce_seed(out, dataclasses.replace(cfg, train_seed=seed), watch if k == 0 else None))
    finally:
        if watch is not None:
            watch.stop()
    text = texts[-1] if len(seeds) == 1 else aggregate_seeds(out, cfg, seeds)
    logger.info("reproduction done in %.1f s (this invocation); outputs in %s", time.perf_counter() - start, out)
    return text


def build_parser() -> argparse.ArgumentParser:
    """``--out``, ``--smoke``, ``--seeds`` and ``--no-preflight``."""
    parser = argparse.ArgumentParser(prog="python -m eval.mini.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="root of every stage's output (default playground/mini; with --smoke "
                        "playground/mini-smoke: a full run never resumes a smoke run's small stages)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="a few samples and steps per stage (tests)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="training seeds; two or more also write seeds.md (mean ± sd, paired tests)")  # fmt: skip
    parser.add_argument("--no-preflight", action="store_true", help="skip the one-minute environment check")
    return parser


def main(argv: Sequence[str] | None = None) -> str:
    """Run the reproduction; print the tables."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"--seeds repeats a seed: {args.seeds}")
    cfg = SMOKE if args.smoke else ReproConfig()
    out = args.out or Path("playground/mini-smoke" if args.smoke else "playground/mini")
    try:
        text = reproduce(out, cfg, preflight=not args.no_preflight, seeds=args.seeds)
    except PreflightError as err:
        raise SystemExit(f"preflight failed, environment broken for {err}") from err
    print(text)
    return text


if __name__ == "__main__":
    main()
