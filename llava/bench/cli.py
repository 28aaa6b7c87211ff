"""``python -m llava.bench``: time to first token, decoding, memory and FLOPs of vanilla LLaVA, the released
VisionZip code's path, ours and transformers' LLaVA classes with VisionZip (the same weights), at the paper's
budgets, in one interleaved run."""

from __future__ import annotations

import argparse
import gc
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from llava.bench.flops import path_flops
from llava.bench.measure import VISIONZIP_PATHS, Case, make_cases, make_request, measure_times, request_memory
from llava.bench.report import add_ratios, evaluate_goals, make_row, render_markdown, write_outputs
from llava.bench.shapes import PRESETS, BenchModel, LlavaShape, build_model, scale_shape, visual_tokens
from llava.model.placement import ATTN_IMPLEMENTATIONS, DTYPE_CHOICES, default_dtype, parse_device, parse_dtype
from visionzip.config import POSITIONS_MODES

logger = logging.getLogger("llava.bench")

# POPE's prompt in LLaVA-1.5's Vicuna-v1 template: the system prompt, "USER: <image>\nIs there a <object> in the
# image? Answer the question using a single word or phrase. ASSISTANT:", about 60 Llama tokens besides the image.
POPE_TEXT_TOKENS = 60


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llava.bench", description=__doc__)
    parser.add_argument("--model", nargs="+", choices=sorted(PRESETS), default=["llava-1.5-7b"])
    parser.add_argument("--budgets", type=int, nargs="+", default=None,
                        help="visual tokens per image (default: the paper's, 192 128 64 / 640 320 160)")  # fmt: skip
    parser.add_argument("--scale", type=float, default=1.0,
                        help="shrink widths and depths (heads, MLP, layers) for a CPU; token counts stay")  # fmt: skip
    parser.add_argument("--positions", choices=POSITIONS_MODES, default="packed",
                        help="VisionZip's position ids of the kept tokens (no change in FLOPs)")  # fmt: skip
    parser.add_argument("--paths", nargs="+", choices=VISIONZIP_PATHS, default=None,
                        help="VisionZip paths beside vanilla (default: all; hf needs packed positions)")  # fmt: skip
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
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds (medians)")
    parser.add_argument("--out", type=Path, default=Path("playground/bench/prefill"),
                        help="folder for results.json, table.md, time_vs_tokens.png")  # fmt: skip
    args = parser.parse_args(argv)
    if args.paths is None:  # transformers' classes take packed positions only
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


def _check_tokens(shape: LlavaShape, case: Case, seq_len: int, text_tokens: int) -> None:
    """The FLOPs count assumes the closed-form token count: the model must have produced exactly that many."""
    expected = text_tokens + visual_tokens(shape, case.visionzip)
    if seq_len != expected:
        raise ValueError(f"{shape.name} {case.label}: the LLM got {seq_len} tokens, the FLOPs count assumes {expected}")


def bench_model(shape: LlavaShape, budgets: list[int], args: argparse.Namespace, dtype: torch.dtype) -> list[dict]:
    """Build one random LLaVA, time and measure every case, count FLOPs; one row per case."""
    device = parse_device(args.device)
    bench: BenchModel = build_model(shape, device, dtype, args.attn, hf="hf" in args.paths)
    logger.info("%s: %s; %s; weights %.2f GiB", shape.name, shape.vision, shape.language, bench.weight_bytes() / 2**30)
    cases = make_cases(shape, budgets, args.positions, tuple(args.paths))
    request = make_request(shape, args.batch, args.text_tokens, args.decode_tokens, device, dtype)
    with torch.inference_mode():
        times = measure_times(bench, cases, request, args.warmup, args.repeat, device)
        logger.info("%s: memory pass", shape.name)
        memory = {case.label: request_memory(bench, case, request, device) for case in cases}
    rows = []
    for case in cases:
        _check_tokens(shape, case, times[case.label]["seq_len"], args.text_tokens)
        flops = path_flops(
            shape, case.path, case.visionzip, args.batch, args.text_tokens, args.decode_tokens, args.attn != "eager"
        )
        rows.append(make_row(shape.name, case, times[case.label], memory[case.label], flops, args.text_tokens))
    del bench
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point: runs every model, writes the outputs, prints the Markdown table and goals."""
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype) or default_dtype(device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.model:
        shape = scale_shape(PRESETS[name], args.scale)
        rows += bench_model(shape, args.budgets or list(shape.budgets), args, dtype)
    add_ratios(rows)
    settings = {
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": str(dtype).removeprefix("torch."), "attn": args.attn, "scale": args.scale, "batch": args.batch,
        "text_tokens": args.text_tokens, "decode_tokens": args.decode_tokens, "warmup": args.warmup,
        "repeat": args.repeat, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "llm_attention_flops": "dense" if args.attn == "eager" else "causal", "positions": args.positions,
        "paths": args.paths,
    }  # fmt: skip
    shapes = {name: asdict(scale_shape(PRESETS[name], args.scale)) for name in args.model}
    result = {"settings": settings, "shapes": shapes, "rows": rows, "goals": evaluate_goals(rows, args.scale)}
    files = write_outputs(result, args.out)
    logger.info("wrote %s", ", ".join(str(path) for path in files.values()))
    print(render_markdown(result))
    return result
