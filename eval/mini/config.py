"""The miniature's settings, where each stage writes, the table's rows, and the test that says a stage is done."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionzip.methods import MULTITURN_MODES

SPLITS: tuple[str, ...] = ("easy", "small")
FULL_TOKENS = 64  # 96 / 12 = 8 x 8 patches of the tiny CLIP; [CLS] is not passed to the LLM
# VisionZipConfig.positions -> the suffix of a row's method name ("packed" is the released layout: no suffix)
LAYOUTS: dict[str, str] = {"packed": "", "original": " (orig. pos.)"}

# The comparison methods (issue 27), each at every VisionZip budget in the packed layout (the others have no
# original-position mode for the encoder's patches): {row name: entry-point method name}.
COMPARISON_METHODS: dict[str, str] = {
    "FastV": "fastv", "PDrop": "pdrop", "SparseVLM": "sparsevlm",  # inside the LLM
    "DivPrune": "divprune", "VisPruner": "vispruner", "CDPruner": "cdpruner",  # between the encoder and the LLM
}  # fmt: skip
# The in-LLM methods prune after the LLM's first decoder layer, the only place a 2-layer LLM leaves a layer after:
# FastV's K, PDrop's 1-indexed boundary, SparseVLM's 0-based cut.
FIRST_CUT: dict[str, dict[str, Any]] = {"fastv": {"layer": 1}, "pdrop": {"layers": 1}, "sparsevlm": {"layers": 0}}

PAIR_TASK = "mini_pairs"  # the multi-turn task (eval.mini.multiturn); its single-turn twin is mini_pairs_single

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
    comparisons: tuple[str, ...] = tuple(COMPARISON_METHODS)  # rows of the comparison methods (COMPARISON_METHODS)
    multiturn_questions: int = 250  # two-object images of the multi-turn test (eval.mini.multiturn); 0: none
    # the multi-turn rows' budgets: every evaluated one (at 7 alone, seed 0's compressed rows answered turn 2 with
    # one colour for nearly every question: a floor, not a comparison)
    multiturn_budgets: tuple[int, ...] = (22, 14, 7)
    eval_questions: int = 500  # per split, a seeded subset of the test questions (the same for every seed)
    eval_batch: int = 32
    eval_workers: int = 2  # evaluation processes side by side, one thread each
    max_new_tokens: int = 3
    ttft_runs: int = 15
    seed: int = 0  # data subsets for evaluation, TTFT inputs
    train_seed: int = 0  # every training stage (--seed, --data_seed): the initial projector, data order
    # torch threads of stages 1 and 2 (OMP_NUM_THREADS; VisionZip‡, CLIP and evaluation run on one each), pinned so
    # that no run depends on the machine's core count (1, 2 and 4 measured to give the same weights on this model)
    train_threads: int = 2
    master_port: int = 29710

    def __post_init__(self) -> None:
        """Validate: FT budgets must be evaluated budgets; known layouts; positive sizes."""
        if not set(self.ft_budgets) <= set(self.budgets):
            raise ValueError(f"ft_budgets {self.ft_budgets} must be among budgets {self.budgets}")
        if not self.layouts or not set(self.layouts) <= set(LAYOUTS):
            raise ValueError(f"layouts must be a non-empty subset of {tuple(LAYOUTS)}, got {self.layouts}")
        if (
            min(
                self.batch,
                self.pretrain_steps,
                self.finetune_steps,
                self.eval_questions,
                self.eval_batch,
                self.train_threads,
            )
            < 1
        ):
            raise ValueError(f"sizes and steps must be >= 1: {self}")
        budgets_ok = bool(self.multiturn_budgets) and set(self.multiturn_budgets) <= set(self.budgets)
        if self.multiturn_questions and not budgets_ok:
            raise ValueError(f"multiturn_budgets {self.multiturn_budgets} must be among budgets {self.budgets}")
        if not set(self.comparisons) <= set(COMPARISON_METHODS):
            raise ValueError(f"comparisons must be among {tuple(COMPARISON_METHODS)}, got {self.comparisons}")
        if not 0 < self.ft_fraction <= 1:
            raise ValueError(f"ft_fraction must be in (0, 1], got {self.ft_fraction}")


SMOKE = ReproConfig(
    limit=40, clip_max_steps=2, clip_epochs=1, batch=4, pretrain_steps=3, finetune_steps=4, ft_max_steps=2,
    budgets=(7,), ft_budgets=(7,), eval_questions=12, eval_batch=12, ttft_runs=3, master_port=29760,
    multiturn_questions=12, multiturn_budgets=(7,),
)  # fmt: skip


@dataclass(frozen=True)
class Paths:
    """Where every stage of a reproduction under ``root`` writes: shared inputs, and one folder per training seed."""

    root: Path
    seed: int = 0

    def __getattr__(self, name: str) -> Path:  # only called for names not set: the stage folders below
        shared = {"data": "data", "clip": "clip", "base": "base", "union": "union", "tasks": "eval/tasks"}
        per_seed = {"stage1": "stage1", "stage2": "stage2", "results": "eval/results", "logs": "logs",
                    "multiturn": "eval/multiturn"}  # fmt: skip
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


def task_name(split: str) -> str:
    """The lmms-eval task of a split's test subset."""
    return f"mini_{split}"


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
        rows += [{"method": name, "tokens": n, "model_args": comparison_args(name, n)} for name in cfg.comparisons]
    return rows


def comparison_args(name: str, tokens: int) -> dict[str, Any]:
    """The lmms-eval model args of comparison method ``name`` (a key of :data:`COMPARISON_METHODS`) at ``tokens``.

    Encoder-side methods keep ``tokens`` patches per image (``budget``). The in-LLM methods keep ``tokens`` image
    tokens after the LLM's first layer, which still sees all of them (:data:`FIRST_CUT`): a layer-average of ``tokens``
    (the paper's convention) would need 2 x tokens - 64 kept after it, none below 32 on the 2-layer LLM. FastV keeps
    the count (``keep``), PDrop keeps ``int(64 x ratio)`` with ratio = tokens / 64 (exact in binary), SparseVLM keeps
    ``int(rank x scale + bias)`` per image with bias = tokens and a scale too small to add one (rank <= 64) and no
    recycled tokens (they would add merged tokens beyond the count).
    """
    method = COMPARISON_METHODS[name]
    if method not in FIRST_CUT:
        return {"method": method, "budget": tokens}
    counts: dict[str, dict[str, Any]] = {
        "fastv": {"keep": tokens},
        "pdrop": {"ratio": tokens / FULL_TOKENS},
        "sparsevlm": {"scale": 1 / (2 * FULL_TOKENS), "bias": tokens, "recycle": False},
    }
    options = {**FIRST_CUT[method], **counts[method]}
    return {"method": method, **{f"{method}_{k}": v for k, v in options.items()}}


def row_id(row: dict[str, Any]) -> str:
    """The grid's folder name of a row (``eval.tables.spec.Row.id``): ``visionzip-w-o-cls-7``."""
    slug = "".join(c if c.isalnum() else "-" for c in row["method"].lower())
    return "-".join(part for part in slug.split("-") if part) + f"-{row['tokens']}"


def multiturn_rows(cfg: ReproConfig) -> list[dict[str, Any]]:
    """The multi-turn table (``eval.mini.multiturn``): Vanilla, VisionZip (packed) and each comparison method at
    each of ``cfg.multiturn_budgets``, each in every multi-turn mode (``model_args`` ``multiturn``); none without
    questions."""
    if not cfg.multiturn_questions:
        return []
    methods: list[tuple[str, int, dict[str, Any]]] = [("Vanilla", FULL_TOKENS, {})]
    for n in cfg.multiturn_budgets:
        methods += [("VisionZip", n, {"budget": n})] + [(name, n, comparison_args(name, n)) for name in cfg.comparisons]
    return [{"method": f"{name} ({mode})", "tokens": tokens, "model_args": {**args, "multiturn": mode}}
            for name, tokens, args in methods for mode in MULTITURN_MODES]  # fmt: skip


def has_results(paths: Paths, row: str, folder: str = "results") -> bool:
    """Whether the grid has written the row's results under ``paths.<folder>`` (its tasks run grouped, so one file
    holds them all)."""
    return any((getattr(paths, folder) / row).rglob("*_results.json"))


def pending_multiturn_rows(cfg: ReproConfig, paths: Paths) -> list[str]:
    """The ids of the multi-turn rows without results yet."""
    return [rid for rid in map(row_id, multiturn_rows(cfg)) if not has_results(paths, rid, "multiturn")]


def pending_rows(cfg: ReproConfig, paths: Paths) -> list[str]:
    """The ids of the table's rows without results yet, in the spec's order."""
    return [rid for rid in map(row_id, spec_rows(cfg, paths)) if not has_results(paths, rid)]


def _manifest_done(folder: Path) -> bool:
    return (folder / "manifest.json").exists()


def done_checks(cfg: ReproConfig, paths: Paths) -> dict[str, Callable[[], bool]]:
    """Every stage of one training seed, in running order, and the test that says its output is there (a rerun
    skips a stage whose test passes; :func:`eval.mini.reproduce.reproduce` runs no preflight when all pass)."""
    checks: dict[str, Callable[[], bool]] = {
        "data": lambda: all(_manifest_done(paths.data / split) for split in SPLITS),
        "clip": lambda: _manifest_done(paths.clip),
        "base": lambda: _manifest_done(paths.base),
        "stage1": lambda: (paths.stage1 / "mm_projector.bin").exists(),
        "stage2": lambda: (paths.stage2 / "model.safetensors").exists(),
    }
    for budget in cfg.ft_budgets:
        ft_done = [paths.ft(budget, layout) / "mm_projector.bin" for layout in cfg.layouts]
        checks[f"ft-{budget}"] = lambda files=ft_done: all(f.exists() for f in files)
    for split in SPLITS:
        checks[f"task-{split}"] = lambda split=split: (paths.tasks / f"{task_name(split)}.yaml").exists()
    checks["eval"] = lambda: not pending_rows(cfg, paths)
    if cfg.multiturn_questions:
        checks["task-pairs"] = lambda: (paths.tasks / f"{PAIR_TASK}.yaml").exists()
        checks["multiturn"] = lambda: not pending_multiturn_rows(cfg, paths)
    checks["ttft"] = lambda: (paths.run / "ttft.json").exists()
    return checks


def pending_stages(cfg: ReproConfig, paths: Paths) -> list[str]:
    """The stages of one training seed whose output is not there yet."""
    return [name for name, done in done_checks(cfg, paths).items() if not done()]
