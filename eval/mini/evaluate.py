"""The miniature's evaluation stages: local lmms-eval tasks, the table spec, every row through lmms-eval, TTFT."""

from __future__ import annotations

import json
import logging
import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from eval.mini.config import FULL_TOKENS, SPLITS, Paths, ReproConfig, done_checks, pending_rows, spec_rows, task_name
from eval.mini.jobs import Timer, run_logged, run_parallel

logger = logging.getLogger("eval.mini.reproduce")


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
    checks = done_checks(cfg, paths)
    for split in SPLITS:

        def work(split: str = split) -> None:
            items = write_task_items(cfg, paths, split)
            command = [sys.executable, "-m", "eval.local_task", "from-json", "--data", str(items), "--image-folder",
                       str(paths.data / split), "--out", str(paths.tasks), "--task", task_name(split),
                       "--max-new-tokens", str(cfg.max_new_tokens)]  # fmt: skip
            run_logged(f"task-{split}", command, paths)

        timer.stage(f"task-{split}", checks[f"task-{split}"], work)


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


def run_grid_rows(stage: str, spec: Path, out: Path, pending: Callable[[], list[str]], cfg: ReproConfig,
                  paths: Paths) -> None:  # fmt: skip
    """The ``pending()`` rows of ``spec`` through ``eval.grid --in-process`` into ``out`` (lmms-eval imported and its
    tasks indexed once per process, not once per row), dealt to ``cfg.eval_workers`` processes of one thread each
    (none idle: a resumed run starts no more workers than rows); refused when a row is still without results."""
    rows = pending()
    workers = min(cfg.eval_workers, len(rows))
    command = [sys.executable, "-m", "eval.grid", "--spec", str(spec), "--out", str(out), "--group", "--in-process",
               "--batch-size", str(cfg.eval_batch), "--rows"]  # fmt: skip
    jobs = [(f"{stage}-{k}", [*command, *rows[k::workers]], {"OMP_NUM_THREADS": "1"}) for k in range(workers)]
    run_parallel(jobs, paths)
    missing = pending()
    if missing:
        raise RuntimeError(f"{stage}: rows without results: {missing}; see {paths.logs}/{stage}-*.log")


def stage_eval(cfg: ReproConfig, paths: Paths, timer: Timer) -> None:
    """Every (row, task) cell of the table through lmms-eval's evaluator (:func:`run_grid_rows`)."""
    spec = write_spec(cfg, paths)

    def work() -> None:
        run_grid_rows("eval", spec, paths.results, lambda: pending_rows(cfg, paths), cfg, paths)

    timer.stage("eval", done_checks(cfg, paths)["eval"], work, accumulate=True)


def measure_ttft(cfg: ReproConfig, paths: Paths) -> dict[str, float]:
    """Median prefill milliseconds (vision tower, VisionZip, projector, LLM prefill) of one test question, per count."""
    import torch
    from PIL import Image

    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.conversation import get_conv_template
    from llava.inference import build_prompt, build_query, measure_prefill, prepare_images
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
    work = lambda: out.write_text(json.dumps(measure_ttft(cfg, paths), indent=1))  # noqa: E731
    timer.stage("ttft", done_checks(cfg, paths)["ttft"], work)
