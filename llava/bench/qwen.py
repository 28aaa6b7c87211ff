"""``python -m llava.bench.qwen``: time to first token and memory of Qwen2.5-VL / Qwen2-VL / Qwen3-VL / Qwen3.5, vanilla
against VisionZip at 70% and 50% of the merged visual tokens, one model (random weights at the real shape) and
interleaved runs.

Each path is ``generate(max_new_tokens=1)`` on one prompt (an image of ``--image`` pixels and ``--text-tokens`` of
text): the vision tower (every block with ``--attn``), VisionZip's scores and compression, the LLM prefill and the
first token. Memory: the extra MiB a call allocates (CUDA allocator peak on a GPU; tensors made by torch ops
everywhere, :func:`visionzip.bench.measure_memory`) and the KV cache the prompt leaves.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from llava.bench.qwen_shapes import PRESETS, build_model, first_token, kv_bytes_per_token, make_inputs, scale_shape
from llava.model.placement import ATTN_IMPLEMENTATIONS, DTYPE_CHOICES, default_dtype, parse_device, parse_dtype
from visionzip.bench import measure_memory
from visionzip.hf.qwen2_vl import QwenVisionZipConfig

logger = logging.getLogger("llava.bench.qwen")


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: this process's CPU time (a shared CPU host)


def _timed_ms(fn: Any, device: torch.device, clock: str = "wall") -> float:
    """Milliseconds of one call (synchronised on a GPU) by ``clock``: wall time, or the process's CPU time, which
    other processes on a shared CPU do not inflate (with one thread it is the compute the call needs)."""
    if clock == "cpu" and device.type != "cpu":
        raise ValueError(f"--clock cpu times CPU runs only (a GPU's work is not this process's CPU time), got {device}")
    now = CLOCKS[clock]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    begin = now()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (now() - begin) * 1e3


def run(
    model: Any, retentions: list[float], image: tuple[int, int], text_tokens: int, warmup: int, repeat: int,
    clock: str = "wall",
) -> list[dict[str, Any]]:  # fmt: skip
    """One row per retention (1.0: vanilla, VisionZip off): tokens, median TTFT over interleaved runs, memory."""
    device = model.device
    paths = {r: (None if r == 1.0 else QwenVisionZipConfig.from_retention(r)) for r in retentions}
    inputs = {r: make_inputs(model, image, text_tokens, cfg) for r, cfg in paths.items()}
    for _ in range(warmup):
        for r, cfg in paths.items():
            first_token(model, cfg, inputs[r])
    samples: dict[float, list[float]] = {r: [] for r in paths}
    for _ in range(repeat):
        for r, cfg in paths.items():
            samples[r].append(_timed_ms(lambda r=r, cfg=cfg: first_token(model, cfg, inputs[r]), device, clock))
    kv_per_token = kv_bytes_per_token(model)
    rows = []
    for r, cfg in paths.items():
        prompt = inputs[r]["input_ids"].shape[1]
        memory = measure_memory(lambda _arg, r=r, cfg=cfg: first_token(model, cfg, inputs[r]), None, device)
        rows.append({
            "path": "vanilla" if cfg is None else "VisionZip", "retention": r,
            "visual_tokens": int((inputs[r]["input_ids"] == model.config.image_token_id).sum()),
            "prompt_tokens": prompt, "ttft_ms": statistics.median(samples[r]),
            "kv_cache_mib": prompt * kv_per_token / 2**20,
            **memory,
        })  # fmt: skip
    model.set_visionzip(None)
    return rows


def render_markdown(rows: list[dict[str, Any]], title: str) -> str:
    """A table with TTFT and memory, and their ratios to vanilla (the row with retention 1.0, else the first)."""
    base = next((r for r in rows if r["retention"] == 1.0), rows[0])
    memory_key = "cuda_peak_extra_mib" if "cuda_peak_extra_mib" in base else "extra_mib"
    lines = [
        f"### {title}", "",
        "| path | retention | visual tokens | prompt tokens | TTFT ms | x vanilla | peak extra MiB | x vanilla "
        "| KV MiB | x vanilla |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for row in rows:
        lines.append(
            f"| {row['path']} | {row['retention']:.0%} | {row['visual_tokens']} | {row['prompt_tokens']} | "
            f"{row['ttft_ms']:.1f} | {row['ttft_ms'] / base['ttft_ms']:.2f} | {row[memory_key]:.1f} | "
            f"{row[memory_key] / max(base[memory_key], 1e-9):.2f} | {row['kv_cache_mib']:.2f} | "
            f"{row['kv_cache_mib'] / base['kv_cache_mib']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llava.bench.qwen", description=__doc__)
    parser.add_argument("--model", choices=sorted(PRESETS), default="qwen2.5-vl-7b")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink widths and depths for a CPU")
    parser.add_argument("--retentions", type=float, nargs="+", default=[1.0, 0.7, 0.5])
    parser.add_argument("--image", default="1008x1008", help="HEIGHTxWIDTH pixels (multiples of 28)")
    parser.add_argument("--text-tokens", type=int, default=60)
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="default: float16 on GPU, float32 CPU")
    parser.add_argument("--attn", choices=ATTN_IMPLEMENTATIONS, default="sdpa")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="cpu: process CPU time (CPU only)")
    parser.add_argument("--out", type=Path, default=Path("playground/bench/qwen"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Build, measure, write ``results.json`` and ``table.md`` under ``--out``; print the table."""
    args = _parse(argv)
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype) or default_dtype(device)
    shape = scale_shape(PRESETS[args.model], args.scale)
    height, width = (int(v) for v in args.image.lower().split("x"))
    model = build_model(shape, device, dtype, args.attn)
    rows = run(model, args.retentions, (height, width), args.text_tokens, args.warmup, args.repeat, args.clock)
    title = f"{args.model} (scale {args.scale}), {args.image} px, {args.attn}, {dtype}, {device}, {args.clock} clock"
    table = render_markdown(rows, title)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"shape": asdict(shape), "title": title, "rows": rows}, indent=2))
    (args.out / "table.md").write_text(table)
    print(table)
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
