"""``python -m llava.bench.qwen``: time to first token and memory of Qwen2.5-VL / Qwen2-VL, vanilla against VisionZip
at 70% and 50% of the merged visual tokens, one model (random weights at the real shape) and interleaved runs.

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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

from llava.model.placement import DTYPE_CHOICES, default_dtype, parse_device, parse_dtype
from visionzip.bench import measure_memory
from visionzip.hf.qwen2_vl import (
    QwenVisionZipConfig,
    VisionZipQwen2_5_VLForConditionalGeneration,
    VisionZipQwen2VLForConditionalGeneration,
)

logger = logging.getLogger("llava.bench.qwen")
TEXT_IDS = (100, 200)  # token ids the prompt text cycles through (random weights: any ids do)


@dataclass(frozen=True)
class QwenShape:
    """The sizes that set the cost: vision tower (heads of ``vision_head_dim``) and LLM (heads of 128)."""

    family: str  # "qwen2_5_vl" or "qwen2_vl"
    vision_depth: int = 32
    vision_heads: int = 16
    vision_head_dim: int = 80
    vision_intermediate: int = 3420
    llm_layers: int = 28
    llm_heads: int = 28
    llm_kv_heads: int = 4
    llm_intermediate: int = 18944
    vocab: int = 152064
    patch: int = 14
    window: int = 112

    @property
    def llm_hidden(self) -> int:
        return self.llm_heads * 128  # head_dim 128: M-RoPE's sections [16, 24, 24] cover its 64 frequencies


PRESETS = {"qwen2.5-vl-7b": QwenShape("qwen2_5_vl"), "qwen2-vl-7b": QwenShape("qwen2_vl", vision_intermediate=5120)}


def scale_shape(shape: QwenShape, scale: float) -> QwenShape:
    """Widths and depths times ``scale`` (head sizes kept), for a CPU; token counts do not change."""
    if scale == 1.0:
        return shape

    def times(value: int, least: int) -> int:
        return max(least, round(value * scale))

    heads = times(shape.llm_heads, 1)
    kv = max(d for d in range(1, heads + 1) if heads % d == 0 and d <= times(shape.llm_kv_heads, 1))
    return replace(
        shape, vision_depth=times(shape.vision_depth, 2), vision_heads=times(shape.vision_heads, 1),
        vision_intermediate=times(shape.vision_intermediate, 8), llm_layers=times(shape.llm_layers, 1),
        llm_heads=heads, llm_kv_heads=kv, llm_intermediate=times(shape.llm_intermediate, 8),
        vocab=times(shape.vocab, 1024),
    )  # fmt: skip


def model_config(shape: QwenShape) -> Qwen2VLConfig | Qwen2_5_VLConfig:
    """The transformers config of ``shape``: full attention in every 8th block and the last (as the 7B models)."""
    text = dict(
        vocab_size=shape.vocab, hidden_size=shape.llm_hidden, intermediate_size=shape.llm_intermediate,
        num_hidden_layers=shape.llm_layers, num_attention_heads=shape.llm_heads, num_key_value_heads=shape.llm_kv_heads,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    )  # fmt: skip
    width = shape.vision_heads * shape.vision_head_dim
    common = dict(depth=shape.vision_depth, num_heads=shape.vision_heads, patch_size=shape.patch)
    special = dict(
        image_token_id=shape.vocab - 3, video_token_id=shape.vocab - 2, vision_start_token_id=shape.vocab - 1
    )
    if shape.family == "qwen2_vl":
        vision = dict(
            common, embed_dim=width, hidden_size=shape.llm_hidden, mlp_ratio=shape.vision_intermediate / width
        )
        return Qwen2VLConfig(text_config=text, vision_config=vision, **special)
    full = sorted({i for i in range(shape.vision_depth) if (i + 1) % 8 == 0} | {shape.vision_depth - 1})
    vision = dict(
        common, hidden_size=width, intermediate_size=shape.vision_intermediate, out_hidden_size=shape.llm_hidden,
        window_size=shape.window, fullatt_block_indexes=full,
    )  # fmt: skip
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)


def build_model(shape: QwenShape, device: torch.device, dtype: torch.dtype, attn: str) -> Any:
    """A VisionZip model of ``shape`` with random weights (VisionZip off until a path sets it)."""
    cls = VisionZipQwen2VLForConditionalGeneration if shape.family == "qwen2_vl" else (
        VisionZipQwen2_5_VLForConditionalGeneration
    )  # fmt: skip
    config = model_config(shape)
    config._attn_implementation = attn
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval()


def make_inputs(model: Any, image: tuple[int, int], text_tokens: int, cfg: QwenVisionZipConfig | None) -> dict:
    """One prompt: ``text_tokens`` of text around an image of ``image`` (height, width) pixels, its patches random,
    with as many placeholders as the path's budget keeps."""
    vision, device = model.config.vision_config, model.device
    factor = vision.patch_size * vision.spatial_merge_size
    if image[0] % factor or image[1] % factor:
        raise ValueError(f"--image sides must be multiples of {factor} (patch x merge), got {image}")
    grid = torch.tensor([[1, image[0] // vision.patch_size, image[1] // vision.patch_size]], device=device)
    merged = int(grid.prod()) // vision.spatial_merge_size**2
    count = merged if cfg is None else cfg.item_tokens(grid[0], vision.spatial_merge_size)
    before = text_tokens // 2
    ids = [TEXT_IDS[i % 2] for i in range(before)] + [model.config.vision_start_token_id]
    ids += [model.config.image_token_id] * count + [TEXT_IDS[i % 2] for i in range(text_tokens - before)]
    input_ids = torch.tensor([ids], device=device)
    generator = torch.Generator().manual_seed(0)
    channels = 3 * vision.temporal_patch_size * vision.patch_size**2
    pixels = torch.randn(int(grid.prod()), channels, generator=generator).to(device, model.dtype)
    types = (input_ids == model.config.image_token_id).long()
    return dict(input_ids=input_ids, mm_token_type_ids=types, pixel_values=pixels, image_grid_thw=grid)


def _first_token(model: Any, cfg: QwenVisionZipConfig | None, inputs: dict) -> torch.Tensor:
    """Prefill and the first token of one path (its budget set first)."""
    model.set_visionzip(cfg)
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=1, do_sample=False)


def _timed_ms(fn: Any, device: torch.device) -> float:
    """Milliseconds of one call (synchronised on a GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    begin = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - begin) * 1e3


def run(
    model: Any, retentions: list[float], image: tuple[int, int], text_tokens: int, warmup: int, repeat: int
) -> list[dict[str, Any]]:
    """One row per retention (1.0: vanilla, VisionZip off): tokens, median TTFT over interleaved runs, memory."""
    device = model.device
    paths = {r: (None if r == 1.0 else QwenVisionZipConfig.from_retention(r)) for r in retentions}
    inputs = {r: make_inputs(model, image, text_tokens, cfg) for r, cfg in paths.items()}
    for _ in range(warmup):
        for r, cfg in paths.items():
            _first_token(model, cfg, inputs[r])
    samples: dict[float, list[float]] = {r: [] for r in paths}
    for _ in range(repeat):
        for r, cfg in paths.items():
            samples[r].append(_timed_ms(lambda r=r, cfg=cfg: _first_token(model, cfg, inputs[r]), device))
    text = model.config.text_config
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * 128 * model.dtype.itemsize
    rows = []
    for r, cfg in paths.items():
        prompt = inputs[r]["input_ids"].shape[1]
        memory = measure_memory(lambda _arg, r=r, cfg=cfg: _first_token(model, cfg, inputs[r]), None, device)
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
        "| KV MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for row in rows:
        lines.append(
            f"| {row['path']} | {row['retention']:.0%} | {row['visual_tokens']} | {row['prompt_tokens']} | "
            f"{row['ttft_ms']:.1f} | {row['ttft_ms'] / base['ttft_ms']:.2f} | {row[memory_key]:.1f} | "
            f"{row[memory_key] / max(base[memory_key], 1e-9):.2f} | {row['kv_cache_mib']:.2f} |"
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
    parser.add_argument("--attn", choices=("sdpa", "eager", "flash_attention_2"), default="sdpa")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
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
    rows = run(model, args.retentions, (height, width), args.text_tokens, args.warmup, args.repeat)
    title = f"{args.model} (scale {args.scale}), {args.image} px, {args.attn}, {dtype}, {device}"
    table = render_markdown(rows, title)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"shape": asdict(shape), "title": title, "rows": rows}, indent=2))
    (args.out / "table.md").write_text(table)
    print(table)
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
