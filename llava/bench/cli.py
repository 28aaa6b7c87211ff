"""``python -m llava.bench``: time to first token, decoding, memory and FLOPs of vanilla LLaVA, the released
VisionZip code's path, ours and transformers' LLaVA classes with VisionZip (the same weights), the encoder-side
selections (DivPrune, VisPruner, CDPruner) and the methods that prune inside the language model (FastV, PDrop,
SparseVLM), at the paper's budgets, in one interleaved run; with ``--quant``, the same in 8/4-bit weights."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from llava.bench.flops import path_flops, pruned_path_flops, selection_path_flops
from llava.bench.measure import (
    CLOCKS,
    VISIONZIP_PATHS,
    Case,
    Request,
    make_cases,
    make_request,
    measure_times,
    request_memory,
)
from llava.bench.methods import READINGS, calibrated, method_case, pruned_run, rater_counts
from llava.bench.quant import QUANT_MODES
from llava.bench.report import add_ratios, bigger_vs_smaller, evaluate_goals, make_row, render_markdown, write_outputs
from llava.bench.selection import method_overhead, selection_case
from llava.bench.shapes import (
    PRESETS,
    BenchModel,
    LlavaShape,
    build_model,
    counted_weights,
    scale_shape,
    visual_tokens,
)
from llava.model.placement import ATTN_IMPLEMENTATIONS, DTYPE_CHOICES, default_dtype, parse_device, parse_dtype
from visionzip.config import POSITIONS_MODES
from visionzip.methods import LLM_METHODS, METHODS, SELECTION_METHODS, parse_option

logger = logging.getLogger("llava.bench")

# POPE's prompt in LLaVA-1.5's Vicuna-v1 template: the system prompt, "USER: <image>\nIs there a <object> in the
# image? Answer the question using a single word or phrase. ASSISTANT:", about 60 Llama tokens besides the image.
POPE_TEXT_TOKENS = 60
OPTION_METHODS = LLM_METHODS + SELECTION_METHODS  # the methods --option configures
# Runs of the issues, as flags (later flags override them):
# table7: LLaVA-NeXT-13B with VisionZip at 640/320/160 against LLaVA-NeXT-7B with every token (the paper's Table 7).
# table6: LLaVA-NeXT-13B at 320 with VisionZip, in full, 8-bit and 4-bit weights (Tables 6 and 16: memory).
# methods: every method at equal budget, LLaVA-1.5-7B at 64 and LLaVA-NeXT-7B at 160 (32 per view).
RUN_PRESETS: dict[str, list[str]] = {
    "table7": ["--model", "llava-next-7b", "llava-next-13b", "--budgets", "llava-next-7b=",
               "llava-next-13b=640,320,160", "--paths", "ours", "--methods", "visionzip"],
    "table6": ["--model", "llava-next-13b", "--budgets", "320", "--paths", "ours", "--methods", "visionzip", "--quant",
               "8bit", "4bit"],
    "methods": ["--model", "llava-1.5-7b", "llava-next-7b", "--budgets", "llava-1.5-7b=64", "llava-next-7b=160",
                "--paths", "ours", "--methods", *METHODS],
}  # fmt: skip


def _add_method_args(parser: argparse.ArgumentParser) -> None:
    """The flags of the methods beside vanilla: which, their options, how a budget is read, the depth kept."""
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["visionzip"],
                        help="methods beside vanilla: visionzip (its --paths) and those inside the LLM")  # fmt: skip
    parser.add_argument("--llm-budget", choices=READINGS, default="auto",
                        help="an in-LLM method's budget: its layer-average, the tokens kept after its first cut, or "
                        "the average where its config can meet it, else kept (llava.bench.methods)")  # fmt: skip
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="METHOD.OPTION=VALUE",
        help="a method's option, e.g. fastv.layer=3, pdrop.layers=2/8/16, vispruner.important_ratio=0.5 (repeatable)",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="fit SparseVLM's scale to an average budget on the bench's prompt (kept: always)",
    )
    parser.add_argument("--quant", nargs="+", choices=QUANT_MODES, default=[],
                        help="also run vanilla and VisionZip with the LLM and projector in 8/4-bit weights "
                        "(bitsandbytes, as --load-8bit/--load-4bit load them): memory rows")  # fmt: skip
    parser.add_argument("--depth", choices=("auto", "scaled", "full"), default="auto",
                        help="--scale also shrinks layer counts (scaled) or not (full); auto: full when an in-LLM "
                        "method runs, since its schedule names layers of the real depth")  # fmt: skip


def _preset_argv(argv: list[str] | None) -> list[str]:
    """``argv`` with ``--preset NAME`` replaced by that run's flags, put first so that later flags override them."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    flag = next((i for i, arg in enumerate(argv) if arg == "--preset" or arg.startswith("--preset=")), None)
    if flag is None:
        return argv
    name = argv[flag].partition("=")[2] or (argv[flag + 1] if flag + 1 < len(argv) else "")
    rest = argv[:flag] + argv[flag + (1 if "=" in argv[flag] else 2) :]
    if name not in RUN_PRESETS:
        raise SystemExit(f"python -m llava.bench: --preset {name!r}: expected one of {sorted(RUN_PRESETS)}")
    return [*RUN_PRESETS[name], *rest]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llava.bench", description=__doc__)
    parser.add_argument("--preset", choices=sorted(RUN_PRESETS),
                        help="one issue's run as flags (RUN_PRESETS); later flags override them")  # fmt: skip
    parser.add_argument("--model", nargs="+", choices=sorted(PRESETS), default=["llava-1.5-7b"])
    parser.add_argument("--budgets", nargs="+", default=[],
                        help="visual tokens per image, for every model, or MODEL=B,B for one (default: the paper's, "
                        "192 128 64 / 640 320 160)")  # fmt: skip
    parser.add_argument("--scale", type=float, default=1.0,
                        help="shrink widths and depths (heads, MLP, layers) for a CPU; token counts stay")  # fmt: skip
    parser.add_argument("--positions", choices=POSITIONS_MODES, default="packed",
                        help="VisionZip's position ids of the kept tokens (no change in FLOPs)")  # fmt: skip
    parser.add_argument("--paths", nargs="+", choices=VISIONZIP_PATHS, default=None,
                        help="VisionZip paths beside vanilla (default: all; hf needs packed positions)")  # fmt: skip
    _add_method_args(parser)
    parser.add_argument("--text-tokens", type=int, default=POPE_TEXT_TOKENS, help="text tokens besides the image")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--decode-tokens", type=int, default=8, help="greedy steps after the first token")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="default: float16 on GPU, float32 CPU")
    parser.add_argument(
        "--attn", choices=ATTN_IMPLEMENTATIONS, default="sdpa", help="LLM and tower (released path: eager)"
    )
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's); 1 is steadier on a shared machine")  # fmt: skip
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="CPU runs: wall time, or this process's CPU time (steadier on a shared host)")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds (medians)")
    parser.add_argument("--out", type=Path, default=Path("playground/bench/prefill"),
                        help="folder for results.json, table.md, time_vs_tokens.png")  # fmt: skip
    args = parser.parse_args(_preset_argv(argv))
    args.options = _method_options(parser, args.option)
    args.budgets = _budgets(parser, args.budgets, args.model)
    if args.depth == "auto":
        args.depth = "full" if set(args.methods) & set(LLM_METHODS) else "scaled"
    if "visionzip" not in args.methods:
        args.paths = []
    elif args.paths is None:  # transformers' classes take packed positions only
        args.paths = [p for p in VISIONZIP_PATHS if p != "hf" or args.positions == "packed"]
    elif "hf" in args.paths and args.positions != "packed":
        parser.error("--paths hf: transformers' classes place the kept tokens packed; expected --positions packed")
    for name in ("text_tokens", "batch", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.warmup < 0 or args.decode_tokens < 0:
        parser.error("--warmup and --decode-tokens must be >= 0")
    return args


def _budgets(parser: argparse.ArgumentParser, given: list[str], models: list[str]) -> dict[str, list[int] | None]:
    """``--budgets 192 128 64 llava-next-7b=160`` -> {model: its budgets, None for the paper's}."""
    common, own = [], {}
    try:
        for text in given:
            model, sep, values = text.rpartition("=")
            if sep and model not in models:
                parser.error(f"--budgets {text!r}: {model!r} is not among --model {models}")
            numbers = [int(value) for value in values.split(",") if value]
            (own.setdefault(model, []) if sep else common).extend(numbers)
    except ValueError:
        parser.error(f"--budgets: expected integers or MODEL=B,B (MODEL=: vanilla alone), got {given}")
    return {model: own.get(model, common or None) for model in models}


def _method_options(parser: argparse.ArgumentParser, given: list[str]) -> dict[str, dict[str, Any]]:
    """``--option METHOD.OPTION=VALUE`` -> {method: {option: typed value}} (exits naming what was expected)."""
    options: dict[str, dict[str, Any]] = {name: {} for name in OPTION_METHODS}
    for text in given:
        key, sep, value = text.partition("=")
        name, dot, option = key.partition(".")
        if not sep or not dot or name not in OPTION_METHODS:
            parser.error(f"--option {text!r}: expected METHOD.OPTION=VALUE with METHOD one of {OPTION_METHODS}")
        try:
            options[name][option] = parse_option(name, option, value)
        except ValueError as err:
            parser.error(f"--option {text!r}: {err}")
    return options


def _check_tokens(shape: LlavaShape, case: Case, seq_len: int, text_tokens: int) -> None:
    """The FLOPs count assumes the closed-form token count: the model must have produced exactly that many."""
    expected = text_tokens + visual_tokens(shape, case.visionzip or case.selection)
    if seq_len != expected:
        raise ValueError(f"{shape.name} {case.label}: the LLM got {seq_len} tokens, the FLOPs count assumes {expected}")


def _cases(bench: BenchModel, request: Request, budgets: list[int], args: argparse.Namespace) -> list[Case]:
    """Vanilla, then per budget the VisionZip paths, the selections and the in-LLM methods (SparseVLM's scale fitted
    where asked)."""
    shape = bench.shape
    visionzip = make_cases(shape, budgets, args.positions, tuple(args.paths))
    cases = visionzip[:1]
    for budget in budgets:
        cases += [case for case in visionzip[1:] if case.budget == budget]
        cases += [selection_case(shape, name, budget, args.options[name]) for name in args.methods
                  if name in SELECTION_METHODS]  # fmt: skip
        for name in (name for name in args.methods if name in LLM_METHODS):
            item = method_case(shape, name, budget, args.llm_budget, args.options[name], args.calibrate)
            cases.append(calibrated(bench, request, item))
            if item.refused:
                logger.info("%s %s@%d: read as kept after the first cut (%s)", shape.name, name, budget, item.refused)
    return cases


def _case_flops(
    shape: LlavaShape, case: Case, timing: dict, raters: tuple[int, int], args: argparse.Namespace, own: int = 0
):  # fmt: skip
    """The FLOPs of ``case``: closed form, layer by layer from the measured per-layer counts (in-LLM methods), or a
    selection's with its ``own`` FLOPs (counted on the run's shape)."""
    batch, text, decode, causal = args.batch, args.text_tokens, args.decode_tokens, args.attn != "eager"
    if case.selection is not None:
        cfg = case.selection
        return selection_path_flops(shape, cfg.tokens, cfg.features == "encoder", own, batch, text, decode, causal)
    if case.pruning is None:
        return path_flops(shape, case.path, case.visionzip, batch, text, decode, causal)
    run = pruned_run(shape, case, timing["visual_counts"], raters)
    return pruned_path_flops(shape, run, batch, text, decode, causal)


def _measure(
    bench: BenchModel, cases: list[Case], request: Request, args: argparse.Namespace, full: LlavaShape
) -> list[dict]:  # fmt: skip
    """Time, meter and count every case on ``bench``; one row each."""
    shape, device = bench.shape, parse_device(args.device)
    with torch.inference_mode():
        times = measure_times(bench, cases, request, args.warmup, args.repeat, device, args.clock)
        logger.info("%s: memory pass", shape.name)
        memory = {case.label: request_memory(bench, case, request, device) for case in cases}
    raters = rater_counts(bench, request) if any(case.path == "sparsevlm" for case in cases) else (0, 0)
    own = {case.label: method_overhead(bench, case, request, args.repeat, device, args.clock) for case in cases
           if case.selection is not None or (case.path == "ours" and bench.quant is None)}  # fmt: skip
    rows = []
    for case in cases:
        timing, overhead = times[case.label], own.get(case.label)
        _check_tokens(shape, case, timing["seq_len"], args.text_tokens)
        own_flops = overhead["flops"] if case.selection is not None else 0
        flops = _case_flops(shape, case, timing, raters, args, own_flops)
        rows.append(make_row(shape.name, case, timing, memory[case.label], flops, args.text_tokens))
        rows[-1].update(weights_mib=bench.weight_bytes(case.selection) / 2**20, overhead=overhead)
        rows[-1]["weights_full_shape_fp16_mib"] = counted_weights(full, torch.float16, case.quant) / 2**20
        if case.pruning is None or full.language.layers == shape.language.layers:  # in-LLM: per layer, same depth
            # a selection's own FLOPs are the run's shape's: at the full shape they are left out (a few GFLOPs)
            rows[-1]["flops_full_shape"] = _case_flops(full, case, timing, raters, args).first_token
    return rows


def bench_model(
    shape: LlavaShape, budgets: list[int], args: argparse.Namespace, dtype: torch.dtype, full: LlavaShape | None = None
) -> list[dict]:  # fmt: skip
    """Build one random LLaVA, time and measure every case, count FLOPs; one row per case. ``full``: the unscaled
    shape, whose FLOPs for the same token counts each row also gets (``flops_full_shape``). Each ``--quant`` mode
    then builds the same weights quantized and runs vanilla and VisionZip (ours) on it."""
    device = parse_device(args.device)
    text = "cdpruner" in args.methods
    bench: BenchModel = build_model(shape, device, dtype, args.attn, hf="hf" in args.paths, text=text)
    logger.info("%s: %s; %s; weights %.2f GiB", shape.name, shape.vision, shape.language, bench.weight_bytes() / 2**30)
    request = make_request(shape, args.batch, args.text_tokens, args.decode_tokens, device, dtype)
    cases = _cases(bench, request, budgets, args)
    rows = _measure(bench, cases, request, args, full or shape)
    for mode in args.quant:
        del bench
        _release(device)
        bench = build_model(shape, device, dtype, args.attn, quant=mode)
        logger.info("%s %s: weights %.2f GiB", shape.name, mode, bench.weight_bytes() / 2**30)
        quantized = [dataclasses.replace(c, quant=mode) for c in cases if c.path == "vanilla" or c.path == "ours"]
        rows += _measure(bench, quantized, request, args, full or shape)
    del bench
    _release(device)
    return rows


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point: runs every model, writes the outputs, prints the Markdown table and goals."""
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # bitsandbytes warns on every 8-bit matmul that fp32 inputs are cast to fp16: expected here, said once in the doc
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    device = parse_device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        raise SystemExit(f"--clock cpu times CPU runs only (a GPU's work is not this process's time); device {device}")
    dtype = parse_dtype(args.dtype) or default_dtype(device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.model:
        shape = scale_shape(PRESETS[name], args.scale, depth=args.depth == "scaled")
        budgets = args.budgets[name] if args.budgets[name] is not None else list(shape.budgets)
        rows += bench_model(shape, budgets, args, dtype, PRESETS[name])
    add_ratios(rows)
    settings = {
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": str(dtype).removeprefix("torch."), "attn": args.attn, "scale": args.scale, "batch": args.batch,
        "text_tokens": args.text_tokens, "decode_tokens": args.decode_tokens, "warmup": args.warmup,
        "repeat": args.repeat, "clock": args.clock, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "llm_attention_flops": "dense" if args.attn == "eager" else "causal", "positions": args.positions,
        "paths": args.paths, "methods": args.methods, "llm_budget": args.llm_budget, "depth": args.depth,
        "options": {name: options for name, options in args.options.items() if options}, "quant": args.quant,
    }  # fmt: skip
    shapes = {name: asdict(scale_shape(PRESETS[name], args.scale, args.depth == "scaled")) for name in args.model}
    result = {
        "settings": settings, "shapes": shapes, "rows": rows, "goals": evaluate_goals(rows, args.scale),
        "bigger_vs_smaller": bigger_vs_smaller(rows),
    }  # fmt: skip
    files = write_outputs(result, args.out)
    logger.info("wrote %s", ", ".join(str(path) for path in files.values()))
    print(render_markdown(result))
    return result
