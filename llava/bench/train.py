"""``python -m llava.bench.train``: stage-2 training steps of vanilla LLaVA and of LLaVA with VisionZip in the loop
(the paper's Table 17), on the same weights, data and batch, interleaved in one run, under the scripts' DeepSpeed
ZeRO-2 and gradient checkpointing: step time, samples/s and peak memory, as ratios beside the paper's.

A step is what the Trainer runs per batch in ``scripts/v1_*/finetune.sh``: the forward with labels (tower, VisionZip
or not, projector, LLM), the backward, gradient clipping and the AdamW step, through DeepSpeed's engine built from
the same config files. The learning rate is 0, so every step starts from the same weights (AdamW still computes
its whole update); the model's shape is a :mod:`llava.bench.shapes` preset, random, ``--scale`` shrinking it for a
CPU. Memory: on GPU ``torch.cuda.max_memory_allocated`` during a step; on CPU the tensors alive before the step
(weights, gradients' buffers, optimizer state, each storage once) plus the peak of those the step creates
(:class:`visionzip.bench.LiveBytes`, the benchmarks' meter).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import socket
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import Trainer

from llava.bench.flops import MACS, layer_flops, path_flops, projector_flops
from llava.bench.measure import Case, Request, make_request
from llava.bench.shapes import PRESETS, LlavaShape, build_model, scale_shape, view_config, visual_tokens
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.model.placement import ATTN_IMPLEMENTATIONS, parse_device
from llava.train.arguments import ModelArguments, TrainingArguments, parse_args
from llava.train.model_setup import compute_dtype, set_trainable
from visionzip.bench import LiveBytes
from visionzip.config import VisionZipConfig

logger = logging.getLogger("llava.bench.train")

ROOT = Path(__file__).resolve().parents[2]
# The stage-2 configs the scripts pass (scripts/v1_5/finetune.sh, scripts/v1_6/finetune.sh): one view or AnyRes.
TRAIN_CONFIGS = {
    False: ROOT / "configs/train/finetune_llava15.yaml",
    True: ROOT / "configs/train/finetune_llava16.yaml",
}
ZERO2 = ROOT / "configs/deepspeed/zero2.json"
ZERO_STAGES = (0, 1, 2)
# Ratio column -> the row value it divides: vanilla's value over the row's (> 1: the row is faster, smaller).
RATIOS = {"time_ratio": "step_ms", "memory_ratio": "peak_mib", "step_memory_ratio": "step_peak_mib",
          "flops_ratio": "flops", "flops_ratio_full_shape": "flops_full_shape"}  # fmt: skip
# Text tokens per sample besides the image: a stand-in for one LLaVA-665K conversation (a short VQA answer up to a
# few hundred tokens of dialogue); our assumption, not a figure measured on the data or given by the paper.
TEXT_TOKENS = 128


@dataclass(frozen=True)
class PaperTraining:
    """The paper's Table 17: LLaVA-NeXT-7B trained vanilla and with VisionZip at ``budget`` tokens (8 GPUs)."""

    model: str
    budget: int
    hours: tuple[float, float]  # vanilla, VisionZip
    memory_gb: tuple[float, float]

    @property
    def time_ratio(self) -> float:
        return self.hours[0] / self.hours[1]

    @property
    def memory_ratio(self) -> float:
        return self.memory_gb[0] / self.memory_gb[1]


PAPER_TABLE17 = PaperTraining("llava-next-7b", 640, (33.8, 15.9), (63.6, 35.3))


@dataclass
class Trainee:
    """The model being stepped: DeepSpeed's engine around it (None: a plain torch step), its optimizer, and the
    LLM sequence length of the last forward (recorded by a hook on the inner model)."""

    model: torch.nn.Module
    engine: Any
    optimizer: torch.optim.Optimizer
    max_grad_norm: float
    seq_len: int = 0


def training_arguments(shape: LlavaShape, batch: int, deepspeed: str | None, checkpointing: bool, cuda: bool):
    """The scripts' stage-2 options (their YAML config, parsed as ``llava.train`` parses it), with this bench's batch,
    DeepSpeed config, bf16 on GPU only, learning rate 0 and no reporting."""
    config = TRAIN_CONFIGS[shape.anyres_grid is not None]
    flags = [
        "--config", str(config), "--output_dir", str(Path(tempfile.gettempdir()) / "llava-bench-train"),  # unwritten
        "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", "1", "--learning_rate", "0",
        "--bf16", str(cuda), "--gradient_checkpointing", str(checkpointing), "--report_to", "none",
    ]  # fmt: skip
    if deepspeed:
        flags += ["--deepspeed", deepspeed]
    elif not cuda:
        flags += ["--use_cpu", "True"]
    _, _, args = parse_args(flags)
    return args


def single_process_group() -> None:
    """The environment a launcher gives rank 0 of 1 (kept where already set): DeepSpeed needs a process group."""
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])


def _record_seq_len(trainee: Trainee):
    def hook(module, args, kwargs) -> None:
        embeds = kwargs.get("inputs_embeds")
        trainee.seq_len = int(embeds.shape[1]) if embeds is not None else int(kwargs["input_ids"].shape[1])

    return trainee.model.get_model().register_forward_pre_hook(hook, with_kwargs=True)


def build_trainee(shape: LlavaShape, args: TrainingArguments, device: torch.device, attn: str) -> Trainee:
    """A random LLaVA of ``shape`` set up as ``llava.train`` sets up full fine-tuning: LLM and projector trainable,
    the tower frozen, gradient checkpointing as the Trainer enables it; the Trainer's optimizer; DeepSpeed's engine
    from ``args.deepspeed`` with its "auto" values filled by transformers, as the Trainer fills them."""
    bench = build_model(shape, device, compute_dtype(args), attn)
    model = bench.model
    del bench  # the released path's tower copy is not needed here
    model.config.use_cache = False
    model.config.tokenizer_padding_side, model.config.tokenizer_model_max_length = "right", args.model_max_length
    model = set_trainable(model.train(), "full", ModelArguments(), args)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    params = [p for p in model.parameters() if p.requires_grad]  # one group: stage 2's weight decay is 0
    optimizer = optimizer_cls([{"params": params, "weight_decay": args.weight_decay}], **optimizer_kwargs)
    engine = None
    if args.deepspeed:
        import deepspeed

        ds_config = args.hf_deepspeed_config
        ds_config.trainer_config_finalize(args, model, num_training_steps=1)
        ds_config.config["zero_allow_untested_optimizer"] = True  # the Trainer's AdamW, as the Trainer passes it
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config.config)
    trainee = Trainee(model, engine, optimizer, args.max_grad_norm)
    _record_seq_len(trainee)
    return trainee


def train_batch(request: Request) -> dict[str, Any]:
    """The request as a training batch: every real token attended, the text after the image supervised (the answer)."""
    ids = request.input_ids  # (B, T + 1), one placeholder each
    after = (ids == IMAGE_TOKEN_INDEX).int().cumsum(dim=1) > 0
    labels = ids.masked_fill(~after | (ids == IMAGE_TOKEN_INDEX), IGNORE_INDEX)  # (B, T + 1)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "images": request.images}
    if request.image_sizes is not None:
        batch["image_sizes"] = request.image_sizes
    return batch


def train_step(trainee: Trainee, case: Case, batch: dict[str, Any]) -> float:
    """One optimisation step on ``batch`` with ``case``'s VisionZip (or none); returns the loss."""
    trainee.model.set_visionzip(case.visionzip)
    if trainee.engine is not None:
        loss = trainee.engine(**batch).loss
        trainee.engine.backward(loss)
        trainee.engine.step()
    else:
        loss = trainee.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in trainee.model.parameters() if p.requires_grad],
                                       trainee.max_grad_norm)  # fmt: skip
        trainee.optimizer.step()
        trainee.optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_steps(
    trainee: Trainee, cases: list[Case], batch: dict, warmup: int, repeat: int, device: torch.device, name: str
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Median step time per case; rounds interleave the cases (rotated each round) so drift hits all alike.

    Returns: case label -> {"step_ms": median, "step_ms_rounds", "seq_len", "losses" (each timed step's: the same
    every round, as the weights are)}.
    """
    samples: dict[str, list[tuple[float, float, int]]] = {case.label: [] for case in cases}
    for round_index in tqdm(range(warmup + repeat), desc=name, unit="round"):
        shift = round_index % len(cases)
        for case in cases[shift:] + cases[:shift]:
            _synchronize(device)
            start = time.perf_counter()
            loss = train_step(trainee, case, batch)
            _synchronize(device)
            if round_index >= warmup:
                samples[case.label].append(((time.perf_counter() - start) * 1e3, loss, trainee.seq_len))
    return {
        label: {"step_ms": statistics.median(ms for ms, _, _ in runs), "step_ms_rounds": [ms for ms, _, _ in runs],
                "seq_len": runs[0][2], "losses": [loss for _, loss, _ in runs]}
        for label, runs in samples.items()
    }  # fmt: skip


def resident_bytes(device: torch.device) -> int:
    """Bytes of every tensor storage alive on ``device``'s type, each storage once (views and flat buffers share)."""
    storages: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance on torch's deprecated module attributes (reduce_op) warns
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for tensor in tensors:
        if tensor.device.type == device.type and tensor.layout == torch.strided:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(storages.values())


def step_memory(trainee: Trainee, case: Case, batch: dict, device: torch.device) -> dict[str, float]:
    """MiB of one step: ``resident`` before it, ``step_peak`` above that during it, ``peak`` the sum (on GPU the
    allocator's ``max_memory_allocated``; on CPU the census of live tensors plus :class:`LiveBytes`' peak)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
        train_step(trainee, case, batch)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        resident = resident_bytes(device)
        with LiveBytes() as tracker:
            train_step(trainee, case, batch)
        peak = resident + tracker.peak
    mib = 2**20
    return {"resident_mib": resident / mib, "step_peak_mib": (peak - resident) / mib, "peak_mib": peak / mib}


def train_flops(
    shape: LlavaShape, cfg: VisionZipConfig | None, batch: int, text_tokens: int, checkpointing: bool, causal: bool
) -> int:  # fmt: skip
    """FLOPs of one stage-2 step's matrix products, counted as :mod:`llava.bench.flops` counts a forward.

    The frozen tower's forward (with VisionZip's scores and merge); the projector forward and backward (weight
    gradients, and input gradients after its first layer: the tower's output needs none); the decoder layers forward
    and backward (2 x forward: input and weight gradients, the attention products alike), and under gradient
    checkpointing their forward once more, less each MLP's down projection (torch's non-reentrant checkpoint stops
    recomputing at the last tensor backward needs, and that product's output is only added to the residual); the
    head's logits at every position, forward and backward. ``causal``: attention by causal pairs (SDPA,
    FlashAttention), else dense (eager).
    """
    stages = path_flops(shape, "vanilla" if cfg is None else "ours", cfg, batch, text_tokens, 0, causal)
    language = shape.language
    into_projector = batch * shape.views * (shape.patches if cfg is None else cfg.tokens)
    first = projector_flops(into_projector, shape.vision.hidden, language.hidden, 1)
    seq = text_tokens + visual_tokens(shape, cfg)
    layers = batch * language.layers * layer_flops(language, seq, 0, causal)
    down = batch * language.layers * MACS * seq * language.intermediate * language.hidden  # each MLP's last product
    recompute = layers - down if checkpointing else 0
    head = batch * MACS * seq * language.hidden * language.vocab
    return stages.encoder + 2 * first + 3 * (stages.projector - first) + 3 * layers + recompute + 3 * head


def default_budgets(name: str) -> list[int]:
    """Table 17's budget for its model (LLaVA-NeXT-7B at 640), else the paper's budgets of the preset."""
    return [PAPER_TABLE17.budget] if name == PAPER_TABLE17.model else list(PRESETS[name].budgets)


def make_cases(shape: LlavaShape, budgets: list[int]) -> list[Case]:
    """Vanilla, then VisionZip at each budget (visual tokens per image, split over the views as the paper does)."""
    cases = [Case("vanilla", shape.full_budget, None)]
    for budget in budgets:
        if budget >= shape.full_budget:
            raise ValueError(f"budget {budget} is not below {shape.name}'s {shape.full_budget} visual tokens")
        cases.append(Case("visionzip", budget, view_config(shape, budget)))
    return cases


def _row(name: str, shape: LlavaShape, full: LlavaShape, case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """A case's description and FLOPs, at the shape it ran and at ``full`` (the unscaled preset) for the same tokens."""
    causal = args.attn != "eager"
    full_cfg = None if case.visionzip is None else view_config(full, case.budget)
    return {
        "model": name, "shape": shape.name, "case": case.label, "budget": case.budget,
        "visionzip": case.visionzip.to_dict() if case.visionzip else None,
        "flops": train_flops(shape, case.visionzip, args.batch, args.text_tokens, args.gradient_checkpointing, causal),
        "flops_full_shape": train_flops(full, full_cfg, args.batch, args.text_tokens, args.gradient_checkpointing,
                                        causal),
    }  # fmt: skip


def bench_model(
    name: str, shape: LlavaShape, full: LlavaShape, budgets: list[int], args: argparse.Namespace
) -> list[dict[str, Any]]:  # fmt: skip
    """Build one trainee of ``shape`` (preset ``name``, maybe scaled; ``full``: unscaled), time and measure its steps
    for every case; one row per case, with ratios to vanilla (> 1: VisionZip is faster, smaller, fewer FLOPs)."""
    device = parse_device(args.device)
    deepspeed = None if args.deepspeed == "none" else args.deepspeed
    targs = training_arguments(shape, args.batch, deepspeed, args.gradient_checkpointing, device.type == "cuda")
    trainee = build_trainee(shape, targs, device, args.attn)
    dtype = compute_dtype(targs)
    batch = train_batch(make_request(shape, args.batch, args.text_tokens, 0, device, dtype))
    cases = make_cases(shape, budgets)
    times = measure_steps(trainee, cases, batch, args.warmup, args.repeat, device, shape.name)
    memory = {case.label: step_memory(trainee, case, batch, device) for case in cases}
    rows = []
    for case in cases:
        expected = args.text_tokens + visual_tokens(shape, case.visionzip)
        if times[case.label]["seq_len"] != expected:
            raise ValueError(f"{shape.name} {case.label}: the LLM trained on {times[case.label]['seq_len']} tokens, "
                             f"expected {expected} (text + visual)")  # fmt: skip
        row = {**_row(name, shape, full, case, args), **times[case.label], **memory[case.label]}
        row.update(dtype=str(dtype).removeprefix("torch."), samples_per_s=args.batch / (row["step_ms"] / 1e3))
        rows.append(row)
    for row in rows:  # vanilla's over this row's
        for key, of in RATIOS.items():
            row[key] = rows[0][of] / row[of]
    if trainee.engine is not None:
        trainee.engine.destroy()  # releases its optimizer's buffers: the next model's resident count starts clean
    del trainee
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def run(
    models: dict[str, LlavaShape], budgets: dict[str, list[int]], args: argparse.Namespace,
    full: dict[str, LlavaShape] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Every model's rows (``models``: preset name -> the shape to build; ``full``: its unscaled shape, default the
    same), with the settings and the paper's row."""
    device = parse_device(args.device)
    if args.deepspeed != "none":
        single_process_group()
    rows = []
    try:
        for name, shape in models.items():
            rows += bench_model(name, shape, (full or models)[name], budgets[name], args)
    finally:
        if args.deepspeed != "none" and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # the group DeepSpeed started for this run
    settings = {
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": rows[0]["dtype"], "deepspeed": Path(args.deepspeed).name if args.deepspeed != "none" else "none",
        "gradient_checkpointing": args.gradient_checkpointing, "scale": args.scale, "batch": args.batch,
        "text_tokens": args.text_tokens, "warmup": args.warmup, "repeat": args.repeat, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat(),
    }  # fmt: skip
    shapes = {name: asdict(shape) for name, shape in models.items()}
    return {"settings": settings, "shapes": shapes, "rows": rows, "paper": asdict(PAPER_TABLE17)}


def render_markdown(result: dict[str, Any]) -> str:
    """The table of rows, the settings, and the ratios beside the paper's Table 17."""
    s = result["settings"]
    lines = [
        f"Stage-2 training steps ({s['device']}{', ' + s['gpu'] if s['gpu'] else ''}, {s['dtype']}, "
        f"DeepSpeed {s['deepspeed']}, gradient checkpointing {s['gradient_checkpointing']}, scale {s['scale']}, "
        f"batch {s['batch']}, {s['text_tokens']} text tokens, {s['threads']} thread(s), median of {s['repeat']} "
        f"interleaved rounds, torch {s['torch']}, {s['date']})",
        "",
        "| model | case | LLM tokens | step ms | samples/s | peak MiB | resident MiB | step peak MiB | time x | "
        "memory x | step memory x | FLOPs x | full-shape FLOPs x |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['shape']} | {r['case']} | {r['seq_len']} | {r['step_ms']:.0f} | {r['samples_per_s']:.2f} | "
            f"{r['peak_mib']:.1f} | {r['resident_mib']:.1f} | {r['step_peak_mib']:.1f} | {r['time_ratio']:.2f} | "
            f"{r['memory_ratio']:.2f} | {r['step_memory_ratio']:.2f} | {r['flops_ratio']:.2f} | "
            f"{r['flops_ratio_full_shape']:.2f} |"
        )
    paper = PAPER_TABLE17
    lines += ["", f"The paper (Table 17, {paper.model} at {paper.budget}, 8 GPUs): training time {paper.hours[0]} h -> "
              f"{paper.hours[1]} h ({paper.time_ratio:.2f}x), GPU memory {paper.memory_gb[0]} -> {paper.memory_gb[1]} "
              f"GB ({paper.memory_ratio:.2f}x)."]  # fmt: skip
    for r in result["rows"]:
        if r["model"] == paper.model and r["budget"] == paper.budget:
            lines.append(
                f"Here, {r['shape']} at {r['budget']}: step time {r['time_ratio']:.2f}x "
                f"(paper {paper.time_ratio:.2f}x), peak memory {r['memory_ratio']:.2f}x "
                f"(paper {paper.memory_ratio:.2f}x), memory a step adds {r['step_memory_ratio']:.2f}x; "
                f"FLOPs {r['flops_ratio']:.2f}x here, {r['flops_ratio_full_shape']:.2f}x at the real shape."
            )
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llava.bench.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", choices=sorted(PRESETS), default=[PAPER_TABLE17.model])
    parser.add_argument(
        "--budgets",
        nargs="+",
        type=int,
        default=None,
        help="visual tokens per image (default: 640 for NeXT as Table 17, the paper's for 1.5)",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="shrink widths and depths (heads, MLP, layers) for a CPU; token counts stay",
    )
    parser.add_argument("--batch", type=int, default=1, help="samples per step (per device)")
    parser.add_argument("--text-tokens", type=int, default=TEXT_TOKENS, help="text tokens per sample besides the image")
    parser.add_argument("--deepspeed", default=str(ZERO2), help="DeepSpeed config, or none for a plain torch step")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--attn", choices=ATTN_IMPLEMENTATIONS, default="sdpa")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (the optimizer state is made)")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds (medians)")
    parser.add_argument("--out", type=Path, default=Path("playground/bench/train"), help="results.json, table.md")
    args = parser.parse_args(argv)
    for key in ("batch", "text_tokens", "repeat"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1: the first step makes the optimizer state, which no timed step should")
    if args.deepspeed != "none":
        stage = json.loads(Path(args.deepspeed).read_text()).get("zero_optimization", {}).get("stage")
        if stage not in ZERO_STAGES:
            parser.error(f"--deepspeed {args.deepspeed}: ZeRO stage {stage}; expected one of {ZERO_STAGES} (stage 3 "
                         "builds the model partitioned, and one process holds every partition anyway)")  # fmt: skip
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point: every model's rows, written to ``--out`` (results.json, table.md); prints the table."""
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    models = {name: scale_shape(PRESETS[name], args.scale) for name in args.model}
    budgets = {name: args.budgets or default_budgets(name) for name in args.model}
    result = run(models, budgets, args, {name: PRESETS[name] for name in args.model})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    table = render_markdown(result)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    return result


if __name__ == "__main__":
    main()
