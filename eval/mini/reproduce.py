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
   patches, VisionZip‡; per budget, packed: FastV, PDrop, SparseVLM, DivPrune, VisPruner, CDPruner) through
   lmms-eval's evaluator in one process.
4b. ``task-pairs`` + ``multiturn`` (``eval.mini.multiturn``): the two-turn test of every method in both modes.
5. ``ttft`` + render: time to first token per token count, the table (``eval.tables``) and its retention plot.
6. With two or more seeds: ``seeds.md`` (``eval.tables.seeds``), every row as mean ± sd over the seeds and tests
   with seeds as the unit (VisionZip against random patches, dominant-only and its other layout; each comparison
   method against VisionZip), and the multi-turn table over seeds.

The stages' settings, output folders and done tests are in ``eval.mini.config``; the subprocesses and the stage timer
in ``eval.mini.jobs``; the evaluation stages in ``eval.mini.evaluate``; the tables in ``eval.mini.report``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from eval.mini.config import SMOKE, SPLITS, TRAIN_FLAGS, Paths, ReproConfig, done_checks, pending_stages
from eval.mini.evaluate import stage_eval, stage_tasks, stage_ttft
from eval.mini.jobs import REPO, Background, Timer, run_logged, run_parallel
from eval.mini.multiturn import stage_multiturn
from eval.mini.preflight import PreflightError
from eval.mini.report import aggregate_seeds, render

logger = logging.getLogger("eval.mini.reproduce")
# settings that change how a run is scheduled, not what it produces: a resumed run may change them
SCHEDULING = ("eval_workers", "master_port")


def stage_inputs(cfg: ReproConfig, paths: Paths, timer: Timer, watch: Background | None = None) -> None:
    """Data, CLIP and LLM through their own modules (each also skips itself when its manifest matches).

    ``watch``: the preflight running beside them; its failure stops the stage in progress.
    """
    py, checks = sys.executable, done_checks(cfg, paths)
    limit = ["--limit", str(cfg.limit)] if cfg.limit else []
    data_cmd = [py, "-m", "eval.mini.data", "--out", str(paths.data), "--split", *SPLITS, *limit]
    timer.stage("data", checks["data"], lambda: run_logged("data", data_cmd, paths, watch=watch))
    clip_cmd = [py, "-m", "eval.mini.clip", "--data", str(paths.data), "--out", str(paths.clip), "--kinds", *SPLITS]
    clip_cmd += limit
    clip_cmd += ["--max-steps", str(cfg.clip_max_steps)] if cfg.clip_max_steps else []
    clip_cmd += ["--epochs", str(cfg.clip_epochs)] if cfg.clip_epochs else []
    timer.stage("clip", checks["clip"], lambda: run_logged("clip", clip_cmd, paths, watch=watch))
    base_cmd = [py, "-m", "eval.mini.base", "--out", str(paths.base), "--data", str(paths.data), "--kinds", *SPLITS]
    timer.stage("base", checks["base"], lambda: run_logged("base", base_cmd, paths, watch=watch))


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
    """Environment of a ``scripts/v1_5`` job: one CPU process, ZeRO-2, its own port, ``cfg.train_threads`` threads."""
    env = {"GPUS": "1", "DEEPSPEED_CONFIG": str(REPO / "configs/deepspeed/zero2.json"), "BATCH": str(cfg.batch),
           "ACCUM": "1", "IMAGES": str(paths.data), "MASTER_PORT": str(cfg.master_port + port_offset),
           "OMP_NUM_THREADS": str(cfg.train_threads)}  # fmt: skip
    return {**env, **extra}


def stage_training(cfg: ReproConfig, paths: Paths, timer: Timer) -> None:
    """Stage 1 (projector on captions) and stage 2 (projector + LLM on questions) on both splits."""
    seed = ["--seed", str(cfg.train_seed), "--data_seed", str(cfg.train_seed)]
    s1_env = train_env(cfg, paths, 0, LLM=str(paths.base), VISION_TOWER=str(paths.clip), OUT=str(paths.stage1))
    s1_flags = [*TRAIN_FLAGS, *seed, "--max_steps", str(cfg.pretrain_steps), "--learning_rate", str(cfg.pretrain_lr)]

    def stage1() -> None:
        s1_env["DATA"] = str(write_union(paths, "pretrain"))
        run_logged("stage1", ["bash", "scripts/v1_5/pretrain.sh", *s1_flags], paths, s1_env)

    checks = done_checks(cfg, paths)
    timer.stage("stage1", checks["stage1"], stage1)
    s2_env = train_env(cfg, paths, 1, LLM=str(paths.base), VISION_TOWER=str(paths.clip), OUT=str(paths.stage2),
                       PROJECTOR=str(paths.stage1 / "mm_projector.bin"))  # fmt: skip
    s2_flags = [*TRAIN_FLAGS, *seed, "--max_steps", str(cfg.finetune_steps), "--learning_rate", str(cfg.finetune_lr)]

    def stage2() -> None:
        s2_env["DATA"] = str(write_union(paths, "train", balance=True, seed=cfg.seed))
        run_logged("stage2", ["bash", "scripts/v1_5/finetune.sh", *s2_flags], paths, s2_env)

    timer.stage("stage2", checks["stage2"], stage2)


def stage_visionzip_ft(cfg: ReproConfig, paths: Paths, timer: Timer) -> None:
    """VisionZip‡: the stage-2 projector fine-tuned on compressed tokens, ``ft_fraction`` of the data, per budget and
    position layout (the projector learns the tokens in the positions it will see them at).

    The layouts of one budget train side by side, one thread each: a job this small spends half its time starting
    up (imports, the launcher), which one core does as fast as two.
    """
    from visionzip import VisionZipConfig

    checks = done_checks(cfg, paths)
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
        timer.stage(f"ft-{budget}", checks[f"ft-{budget}"], lambda jobs=jobs: run_parallel(jobs, paths))


def check_settings(cfg: ReproConfig, paths: Paths) -> None:
    """Write ``reproduce.json``; refuse to resume a run made with other settings (a smoke run's stages, say)."""
    path = paths.run / "reproduce.json"
    now = json.loads(json.dumps(asdict(cfg)))
    if path.exists():
        saved = json.loads(path.read_text())
        changed = sorted(k for k in set(now) | set(saved) if k not in SCHEDULING and now.get(k) != saved.get(k))
        if changed:
            raise ValueError(
                f"{paths.run} holds a run made with other settings ({', '.join(changed)}: "
                f"{[saved.get(k) for k in changed]} there, {[now.get(k) for k in changed]} now); "
                "expected the same settings to resume: use another --out, or remove that folder"
            )
    path.write_text(json.dumps(now, indent=1))


def reproduce_seed(out: Path, cfg: ReproConfig, watch: Background | None = None) -> str:
    """Every stage of one training seed (``cfg.train_seed``) not done yet; return its rendered tables (Markdown).

    ``watch``: the preflight, running beside the input stages; training waits for it to pass.
    """
    paths = Paths(out.resolve(), cfg.train_seed)
    paths.run.mkdir(parents=True, exist_ok=True)
    check_settings(cfg, paths)
    timer = Timer(paths.run / "timings.json")
    stage_inputs(cfg, paths, timer, watch)
    if watch is not None:
        timer.record("preflight", watch.wait())
        logger.info("preflight: passed in %.1f s (beside the first stages)", timer.times["preflight"])
    stage_training(cfg, paths, timer)
    stage_visionzip_ft(cfg, paths, timer)
    stage_tasks(cfg, paths, timer)
    stage_eval(cfg, paths, timer)
    stage_multiturn(cfg, paths, timer)
    stage_ttft(cfg, paths, timer)
    return render(paths)


def start_preflight(out: Path, cfg: ReproConfig, seeds: Sequence[int]) -> Background | None:
    """The preflight, started beside the first stages, when any stage of any seed is left to run; else None: a run
    with every stage done only renders the tables, and a dependency that broke since cannot change them."""
    left = {seed: pending_stages(cfg, Paths(out.resolve(), seed)) for seed in seeds}
    if not any(left.values()):
        logger.info("every stage is done already: no preflight, the tables are rendered again")
        return None
    command = [sys.executable, "-m", "eval.mini.preflight", "--out", str(out.resolve() / "preflight"),
               "--port", str(cfg.master_port - 20)]  # fmt: skip
    return Background("preflight", command, out.resolve() / "preflight.log")


def reproduce(out: Path, cfg: ReproConfig, preflight: bool = True, seeds: Sequence[int] = (0,)) -> str:
    """Run every stage not done yet under ``out`` for each training seed; return the rendered tables (Markdown).

    ``preflight`` first checks, in about a minute, that every later stage's dependencies work
    (:mod:`eval.mini.preflight`), on every run with a stage left (a dependency may have broken since the last one);
    it raises ``PreflightError`` naming the broken stage. With several ``seeds`` the data, CLIP and LLM are shared,
    each seed trains and evaluates under ``seed-<k>/``, and ``seeds.md`` gives mean ± sd and tests over the seeds.
    """
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    watch = start_preflight(out, cfg, seeds) if preflight else None
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
                        help="training seeds; two or more also write seeds.md (mean ± sd, tests)")  # fmt: skip
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
