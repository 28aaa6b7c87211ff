"""``python -m llava.serve.vllm.bench``: vLLM throughput and time to first token, vanilla against VisionZip.

Both paths run in one process with the same engine settings (KV cache, ``max_num_seqs``, ``max_model_len``, dtype)
on the same weights and images, through the plugin's class: vanilla on the export without a budget (vLLM's stock
class then, tested token for token), VisionZip on the same export with ``visionzip`` in config.json. At each
concurrency c, c requests (distinct images, the same prompt) arrive together and decode ``--max-tokens`` tokens,
``--rounds`` times after a warm-up; the table gives the median round's requests/s and output tokens/s and, over its
requests, the median and 90th-percentile TTFT (vLLM's per-request first-token latency). The largest batch that fits
is the engine's KV cache (tokens) over the tokens one request holds at its end (prompt + output). Beside the measured
ratios to vanilla (requests/s, TTFT) stands the ratio of first-token FLOPs (encoder, projector, LLM prefill;
:mod:`llava.bench.flops`, from the export's shapes and the prompts' token counts), the speed-up the work alone allows.

Without ``--model`` a random LLaVA-1.5-7B (``--next``: LLaVA-NeXT-7B) is written at ``--scale`` as ``python -m
llava.bench`` scales it (widths and depths times the scale, head widths and every token count kept: CLIP-L/336's
577 tokens per view), so that the language model's share of the work is the real model's and not a fixed cost's.
The machine and the date are printed above the table and saved with it. Run it in the serve venv
(``scripts/setup_serve.sh``).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from llava.bench.flops import encoder_flops, lm_flops, merge_flops, projector_flops, scores_flops
from llava.bench.shapes import PRESETS, LanguageShape, LlavaShape, scale_shape
from visionzip.bench import EncoderShape
from visionzip.config import VisionZipConfig

logger = logging.getLogger(__name__)
PROMPT = "USER: <image>\nDescribe the image in detail. ASSISTANT:"
SHAPES = {False: "llava-1.5-7b", True: "llava-next-7b"}  # the real shape --scale shrinks (--next: NeXT's)


@dataclass
class Row:
    """One measured level: a path at one concurrency."""

    path: str
    image_tokens: int
    concurrency: int
    requests_per_s: float
    output_tokens_per_s: float
    ttft_median_ms: float
    ttft_p90_ms: float
    kv_capacity_tokens: int
    tokens_per_request: int
    first_token_flops: int = 0  # encoder + projector + LLM prefill of one request (filled in by main)

    @property
    def largest_batch(self) -> int:
        """Requests whose KV cache fits at once at their last token."""
        return self.kv_capacity_tokens // self.tokens_per_request


def tiny_config(shape: LlavaShape) -> Any:
    """The ``llava.tiny`` sizes of ``shape`` (its vocabulary stays the tiny tokenizer's: one position's logits)."""
    from llava.tiny import TinyConfig

    v, lm = shape.vision, shape.language
    return TinyConfig(
        image_size=v.image_size, patch_size=v.patch_size, vision_hidden_size=v.hidden, vision_layers=v.layers,
        vision_heads=v.heads, vision_intermediate_size=v.intermediate, hidden_size=lm.hidden, num_layers=lm.layers,
        num_heads=lm.heads, num_kv_heads=lm.kv_heads, intermediate_size=lm.intermediate,
        max_position_embeddings=lm.max_positions, select_layer=shape.select_layer,
    )  # fmt: skip


def write_checkpoints(root: Path, shape: LlavaShape, budget: VisionZipConfig) -> tuple[Path, Path]:
    """A random LLaVA of ``shape`` (NeXT when it has an AnyRes grid) exported twice: without a budget and with
    ``budget``."""
    from llava.model.hf_export import export_to_hf
    from llava.tiny import write_tiny_llava

    src = write_tiny_llava(root / "src", next=shape.anyres_grid is not None, cfg=tiny_config(shape))
    vanilla = root / "vanilla"
    if not (vanilla / "config.json").is_file():
        export_to_hf(src, vanilla)
    vz_src = root / "src-visionzip"
    shutil.rmtree(vz_src, ignore_errors=True)
    shutil.copytree(src, vz_src)
    config = json.loads((vz_src / "config.json").read_text())
    (vz_src / "config.json").write_text(json.dumps({**config, "visionzip": budget.to_dict()}))
    visionzip = root / f"visionzip-{budget.dominant}-{budget.contextual}"
    if not (visionzip / "config.json").is_file():
        export_to_hf(vz_src, visionzip)
    return vanilla, visionzip


def images(count: int, seed: int, size: tuple[int, int]) -> list[Image.Image]:
    """``count`` random RGB images of ``size`` (width, height), distinct so that no cache serves one twice."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


def run_level(llm: Any, batch: list[Image.Image], max_tokens: int) -> tuple[float, list[Any]]:
    """All requests of ``batch`` at once; returns (wall seconds, outputs)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    requests = [{"prompt": PROMPT, "multi_modal_data": {"image": image}} for image in batch]
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    return time.perf_counter() - start, outputs


def _ttft_ms(outputs: list[Any]) -> list[float]:
    latencies = [out.metrics.first_token_latency * 1000 for out in outputs if out.metrics is not None]
    if len(latencies) != len(outputs):
        raise ValueError("vLLM returned no per-request metrics: the engine must log stats (disable_log_stats=False)")
    return sorted(latencies)


def bench_path(name: str, model: Path, overrides: dict, levels: Sequence[int], args: argparse.Namespace) -> list[Row]:
    """One engine for ``model``; a warm-up request, then each concurrency level on fresh images."""
    from vllm import LLM
    from vllm.distributed import cleanup_dist_env_and_memory

    llm = LLM(
        model=str(model), hf_overrides=overrides, enforce_eager=True, dtype=args.dtype, seed=0,
        max_model_len=args.max_model_len, max_num_seqs=max(levels), limit_mm_per_prompt={"image": 1},
        disable_log_stats=False,
    )  # fmt: skip
    try:
        run_level(llm, images(2, 10_000, args.image_size), args.max_tokens)  # warm-up
        config = llm.llm_engine.vllm_config
        capacity = (config.cache_config.num_gpu_blocks or 0) * config.cache_config.block_size
        image_token = config.model_config.hf_config.image_token_index
        rows = []
        for level in levels:
            rounds = [
                run_level(llm, images(level, 1000 * r + level, args.image_size), args.max_tokens)
                for r in range(args.rounds)
            ]
            wall, outputs = sorted(rounds, key=lambda item: item[0])[len(rounds) // 2]  # the median round
            ttft = _ttft_ms(outputs)
            rows.append(Row(
                path=name, image_tokens=outputs[0].prompt_token_ids.count(image_token), concurrency=level,
                requests_per_s=level / wall, output_tokens_per_s=level * args.max_tokens / wall,
                ttft_median_ms=statistics.median(ttft), ttft_p90_ms=ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))],
                kv_capacity_tokens=capacity, tokens_per_request=len(outputs[0].prompt_token_ids) + args.max_tokens,
            ))  # fmt: skip
            logger.info("%s c=%d: %.2f req/s, TTFT median %.0f ms", name, level, level / wall, rows[-1].ttft_median_ms)
        return rows
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


def export_shapes(model: Path) -> tuple[EncoderShape, LanguageShape, int]:
    """The tower's and the language model's shapes, and the feature layer, read from an export's config.json."""
    config = json.loads((model / "config.json").read_text())
    v, t = config["vision_config"], config["text_config"]
    vision = EncoderShape(
        hidden=v["hidden_size"], layers=v["num_hidden_layers"], heads=v["num_attention_heads"],
        intermediate=v["intermediate_size"], image_size=v["image_size"], patch_size=v["patch_size"],
    )  # fmt: skip
    language = LanguageShape(
        hidden=t["hidden_size"], layers=t["num_hidden_layers"], heads=t["num_attention_heads"],
        kv_heads=t.get("num_key_value_heads") or t["num_attention_heads"], intermediate=t["intermediate_size"],
        vocab=t["vocab_size"], max_positions=t["max_position_embeddings"],
    )  # fmt: skip
    return vision, language, config["vision_feature_layer"]


def first_token_flops(model: Path, views: int, prompt_tokens: int, cfg: VisionZipConfig | None) -> int:
    """FLOPs of one request's first token: the tower up to the feature layer on ``views`` views (VisionZip adds its
    scores and merge), the 2-layer projector on the tokens that enter it, the LLM's causal prefill of the prompt."""
    vision, language, feature_layer = export_shapes(model)
    layers_run = VisionZipConfig(layer=feature_layer).resolve_layer(vision.layers) + 1
    encoder = encoder_flops(vision, views, layers_run)
    if cfg is None:
        into_projector = views * (vision.image_size // vision.patch_size) ** 2
    else:
        encoder += scores_flops(vision, views) + merge_flops(vision, views, cfg)
        into_projector = views * cfg.tokens
    projector = projector_flops(into_projector, vision.hidden, language.hidden, depth=2)
    return encoder + projector + lm_flops(language, 1, prompt_tokens, 0, causal=True)


def render_table(rows: Sequence[Row]) -> str:
    """Markdown: one line per path and concurrency, with the ratios to vanilla at that concurrency (requests/s, TTFT
    median) and of first-token FLOPs (vanilla's over the path's: > 1 is less work)."""
    base = {row.concurrency: row for row in rows if row.path == "vanilla"}
    lines = [
        "| path | image tokens | concurrency | req/s | output tok/s | req/s vs vanilla | TTFT median ms | TTFT p90 ms "
        "| TTFT vs vanilla | first-token FLOPs vs vanilla | KV tokens/request | largest batch that fits |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ref = base.get(row.concurrency)
        rate = row.requests_per_s / ref.requests_per_s if ref else float("nan")
        ttft = ref.ttft_median_ms / row.ttft_median_ms if ref else float("nan")
        flops = ref.first_token_flops / row.first_token_flops if ref and row.first_token_flops else float("nan")
        lines.append(
            f"| {row.path} | {row.image_tokens} | {row.concurrency} | {row.requests_per_s:.2f} | "
            f"{row.output_tokens_per_s:.1f} | {rate:.2f}x | {row.ttft_median_ms:.0f} | {row.ttft_p90_ms:.0f} | "
            f"{ttft:.2f}x | {flops:.2f}x | {row.tokens_per_request} | {row.largest_batch} |"
        )
    return "\n".join(lines)


def machine() -> str:
    """The CPU (or platform), its core count and today's date, for the figures' provenance."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    return f"{cpu}, {os.cpu_count()} cores visible, {time.strftime('%Y-%m-%d')}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m llava.serve.vllm.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an export without a budget (default: a scaled random LLaVA)")
    parser.add_argument("--next", action="store_true", help="the scaled random model is LLaVA-NeXT (AnyRes)")
    parser.add_argument("--scale", type=float, default=0.125,
                        help="widths and depths of the random LLaVA-7B times this (1: the real shapes)")  # fmt: skip
    parser.add_argument("--budget", type=int, nargs=2, default=(54, 10), metavar=("DOMINANT", "CONTEXTUAL"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="measurements per level (the median is reported)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--work", type=Path, default=Path("playground/bench-vllm"), help="checkpoints and results")
    return parser.parse_args(argv)


def with_budget(model: Path, budget: VisionZipConfig, out: Path) -> Path:
    """A copy of export ``model`` whose config.json saves ``budget`` (the weights are linked, not copied)."""
    out.mkdir(parents=True, exist_ok=True)
    for item in model.iterdir():
        target = out / item.name
        if item.name != "config.json" and not target.exists():
            os.symlink(item.resolve(), target)
    config = json.loads((model / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "visionzip": budget.to_dict()}, indent=2))
    return out


def with_flops(rows: list[Row], vanilla: Path, budget: VisionZipConfig, max_tokens: int) -> list[Row]:
    """The rows with their first-token FLOPs; the views per image are the VisionZip path's tokens over the budget."""
    views = next(row.image_tokens for row in rows if row.path != "vanilla") // budget.tokens
    return [
        replace(row, first_token_flops=first_token_flops(
            vanilla, views, row.tokens_per_request - max_tokens, None if row.path == "vanilla" else budget
        ))
        for row in rows
    ]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    """Write (or take) the checkpoints, measure both paths, print the table and save it with the rows as JSON."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # both engines in this process, one after the other
    budget = VisionZipConfig(*args.budget)
    args.image_size = (336, 336)
    if args.model is None:
        shape = scale_shape(PRESETS[SHAPES[args.next]], args.scale)
        vanilla, visionzip = write_checkpoints(args.work / shape.name, shape, budget)
        args.image_size = shape.image_hw  # NeXT: exactly its 2 x 2 grid of views, nothing padded
    else:
        vanilla, visionzip = args.model, with_budget(args.model, budget, args.work / "with-budget")
    from llava.serve.vllm import hf_overrides

    rows = bench_path("vanilla", vanilla, hf_overrides(vanilla), args.concurrency, args)  # no budget: the stock class
    rows += bench_path(f"VisionZip {budget.dominant}+{budget.contextual}", visionzip, hf_overrides(visionzip),
                       args.concurrency, args)  # fmt: skip
    rows = with_flops(rows, vanilla, budget, args.max_tokens)
    where = machine()
    table = render_table(rows)
    print(f"{vanilla} on {where}\n{table}")
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "results.md").write_text(f"{where}\n\n{table}\n")
    data = [asdict(row) | {"largest_batch": row.largest_batch} for row in rows]
    settings = {k: str(v) for k, v in vars(args).items()}
    (args.work / "results.json").write_text(json.dumps({"machine": where, "args": settings, "rows": data}))


if __name__ == "__main__":
    main()
