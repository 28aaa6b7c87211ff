"""``python -m llava.serve.vllm.bench``: vLLM throughput and time to first token, vanilla against VisionZip.

Both paths run in one process with the same engine settings (KV cache, ``max_num_seqs``, ``max_model_len``, dtype)
on the same weights and images, through the plugin's class: vanilla on the export without a budget (vLLM's stock
class then, tested token for token), VisionZip on the same export with ``visionzip`` in config.json. At each
concurrency c, c requests (distinct images, the same prompt) arrive together and decode ``--max-tokens`` tokens,
``--rounds`` times after a warm-up; the table gives the median round's requests/s and output tokens/s and, over its
requests, the median and 90th-percentile TTFT (vLLM's per-request first-token latency). The largest batch that fits
is the engine's KV cache (tokens) over the tokens one request holds at its end (prompt + output).

Without ``--model`` a scaled random LLaVA is written (LLaVA-1.5's CLIP grid, 336 px / patch 14 = 577 tokens per
view, with narrow widths and few layers so that a CPU runs it). Run it in the serve venv (``scripts/setup_serve.sh``).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from visionzip.config import VisionZipConfig

logger = logging.getLogger(__name__)
PROMPT = "USER: <image>\nDescribe the image in detail. ASSISTANT:"


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

    @property
    def largest_batch(self) -> int:
        """Requests whose KV cache fits at once at their last token."""
        return self.kv_capacity_tokens // self.tokens_per_request


def write_checkpoints(root: Path, next_: bool, budget: VisionZipConfig) -> tuple[Path, Path]:
    """A scaled random LLaVA (1.5, or NeXT with ``next_``) exported twice: without a budget and with ``budget``."""
    from llava.model.hf_export import export_to_hf
    from llava.tiny import TinyConfig, write_tiny_llava

    cfg = TinyConfig(
        image_size=336, patch_size=14, vision_hidden_size=128, vision_layers=4, vision_heads=4,
        vision_intermediate_size=256, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=8,
        intermediate_size=512, max_position_embeddings=4096,
    )  # fmt: skip
    src = write_tiny_llava(root / "src", next=next_, cfg=cfg)
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


def images(count: int, seed: int, size: tuple[int, int] = (336, 336)) -> list[Image.Image]:
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
        run_level(llm, images(2, seed=10_000), args.max_tokens)  # warm-up
        config = llm.llm_engine.vllm_config
        capacity = (config.cache_config.num_gpu_blocks or 0) * config.cache_config.block_size
        image_token = config.model_config.hf_config.image_token_index
        rows = []
        for level in levels:
            rounds = [run_level(llm, images(level, seed=1000 * r + level), args.max_tokens) for r in range(args.rounds)]
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


def render_table(rows: Sequence[Row]) -> str:
    """Markdown: one line per path and concurrency, with the ratio of requests/s to vanilla at that concurrency."""
    base = {row.concurrency: row.requests_per_s for row in rows if row.path == "vanilla"}
    lines = [
        "| path | image tokens | concurrency | req/s | output tok/s | vs vanilla | TTFT median ms | TTFT p90 ms "
        "| KV tokens/request | largest batch that fits |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ratio = row.requests_per_s / base[row.concurrency] if row.concurrency in base else float("nan")
        lines.append(
            f"| {row.path} | {row.image_tokens} | {row.concurrency} | {row.requests_per_s:.2f} | "
            f"{row.output_tokens_per_s:.1f} | {ratio:.2f}x | {row.ttft_median_ms:.0f} | {row.ttft_p90_ms:.0f} | "
            f"{row.tokens_per_request} | {row.largest_batch} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m llava.serve.vllm.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an export without a budget (default: a scaled random LLaVA)")
    parser.add_argument("--next", action="store_true", help="the scaled random model is LLaVA-NeXT (AnyRes)")
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


def main(argv: Sequence[str] | None = None) -> None:
    """Write (or take) the checkpoints, measure both paths, print the table and save it with the rows as JSON."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # both engines in this process, one after the other
    budget = VisionZipConfig(*args.budget)
    if args.model is None:
        vanilla, visionzip = write_checkpoints(args.work / ("next" if args.next else "v15"), args.next, budget)
    else:
        vanilla, visionzip = args.model, with_budget(args.model, budget, args.work / "with-budget")
    from llava.serve.vllm import hf_overrides

    rows = bench_path("vanilla", vanilla, hf_overrides(vanilla), args.concurrency, args)  # no budget: the stock class
    rows += bench_path(f"VisionZip {budget.dominant}+{budget.contextual}", visionzip, hf_overrides(visionzip),
                       args.concurrency, args)  # fmt: skip
    table = render_table(rows)
    print(table)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "results.md").write_text(table + "\n")
    data = [asdict(row) | {"largest_batch": row.largest_batch} for row in rows]
    (args.work / "results.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": data})
    )


if __name__ == "__main__":
    main()
