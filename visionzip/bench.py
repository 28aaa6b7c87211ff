"""Encoder benchmark: plain encoder vs the released code's eager path vs ours (``python -m visionzip.bench``)."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from tqdm import tqdm

from visionzip.capture import capture_outputs, head_mean_keys
from visionzip.config import VisionZipConfig
from visionzip.core import compress
from visionzip.encode import Captured, encode

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderShape:
    """A ViT's shape; random weights, since timing does not depend on values."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    image_size: int
    patch_size: int


# CLIP ViT-L/14-336, the tower of LLaVA-1.5 and LLaVA-NeXT: 24 x 24 patches + [CLS] (also llava.bench's encoder).
CLIP_L_336 = EncoderShape(hidden=1024, layers=24, heads=16, intermediate=4096, image_size=336, patch_size=14)

SHAPES: dict[str, EncoderShape] = {
    "vit-l-336": CLIP_L_336,
    # A CPU-sized stand-in with the same token count per image.
    "small": EncoderShape(hidden=256, layers=6, heads=4, intermediate=1024, image_size=336, patch_size=14),
}

PATHS: dict[str, str] = {
    "a": "plain encoder, SDPA",
    "b": "plain encoder, eager",
    "c": "eager + all attention maps + compress (released code)",
    "d": "ours: SDPA + capture + compress",
}


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created by torch ops while active (any device), measured, not estimated.

    Counts each new storage once, and subtracts it when Python frees it; op-internal workspaces are not seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[tuple[str, int]] = set()

    def _release(self, key: tuple[str, int], nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, nbytes = (str(tensor.device), storage.data_ptr()), storage.nbytes()
            if nbytes == 0 or key in self._seen:
                continue
            self._seen.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, nbytes)
        return out


def build_encoders(shape: EncoderShape, device: torch.device, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """Two ``CLIPVisionModel`` s with the same random weights: SDPA and eager attention."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.intermediate,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
    )
    torch.manual_seed(0)
    models = {}
    for impl in ("sdpa", "eager"):
        own = copy.deepcopy(config)  # a model keeps its config object: one each, or both get the last backend
        own._attn_implementation = impl
        models[impl] = CLIPVisionModel(own).to(device=device, dtype=dtype).eval()
        assert models[impl].config._attn_implementation == impl
    models["eager"].load_state_dict(models["sdpa"].state_dict())
    return models


def released_capture(model: torch.nn.Module, pixels: torch.Tensor, cfg: VisionZipConfig) -> Captured:
    """The released code's encoder: eager attention maps and hidden states of every layer kept, all layers run;
    the [CLS] row of one layer's maps summed over heads as scores (what :func:`visionzip.capture` computes)."""
    index = cfg.resolve_layer(len(model.encoder.layers))
    attn = model.encoder.layers[index].self_attn
    with capture_outputs(k=attn.k_proj) as seen:
        out = model(pixels, output_hidden_states=True, output_attentions=True)
    scores = out.attentions[index][:, :, 0, :].sum(dim=1).float()  # (B, N)
    return Captured(out.hidden_states[index + 1], scores, head_mean_keys(seen["k"], attn.num_heads))


def released_path(
    model: torch.nn.Module, pixels: torch.Tensor, cfg: VisionZipConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The released code's path: :func:`released_capture`, then compression at one layer.

    Returns ``compress``'s (tokens (B, dominant + contextual, C), keep (B, dominant)).
    """
    seen = released_capture(model, pixels, cfg)
    return compress(seen.features, seen.scores, seen.keys, cfg)


def make_paths(models: dict[str, torch.nn.Module], cfg: VisionZipConfig) -> dict[str, Callable]:
    """The four encoder paths of the table, each ``pixels -> visual tokens``."""
    select = cfg.layer if cfg.layer < 0 else cfg.layer + 1  # hidden_states has the embeddings first

    def plain(impl: str) -> Callable:
        return lambda x: models[impl](x, output_hidden_states=True).hidden_states[select][:, 1:]

    return {
        "a": plain("sdpa"),
        "b": plain("eager"),
        "c": lambda x: released_path(models["eager"], x, cfg)[0],
        "d": lambda x: encode(models["sdpa"], x, cfg).tokens,
    }


def _timed(fn: Callable, arg: Any, device: torch.device) -> float:
    """Milliseconds of one call: CUDA events on GPU, a synchronised host clock otherwise."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(arg)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn(arg)
    return (time.perf_counter() - begin) * 1e3


def measure_times(paths: dict[str, Callable], arg: Any, device: torch.device, warmup: int, repeat: int) -> dict:
    """Median milliseconds per path, runs interleaved so that drift hits every path alike."""
    for _ in range(warmup):
        for fn in paths.values():
            fn(arg)
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for _ in tqdm(range(repeat), desc=f"batch {arg.shape[0]}", leave=False):
        for name, fn in paths.items():
            samples[name].append(_timed(fn, arg, device))
    return {name: statistics.median(values) for name, values in samples.items()}


def measure_memory(fn: Callable, arg: Any, device: torch.device) -> dict[str, float]:
    """Extra MiB ``fn(arg)`` allocates: ``extra_mib``, the peak of tensors created by ops (all devices,
    :class:`LiveBytes`) and, on CUDA, ``cuda_peak_extra_mib``, the allocator's peak above what was allocated before.

    The one memory meter of the benchmarks (this encoder bench, :mod:`llava.bench` and :mod:`llava.bench.qwen`).
    """
    result = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn(arg)
        torch.cuda.synchronize()
        result["cuda_peak_extra_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with LiveBytes() as tracker:
        fn(arg)
    result["extra_mib"] = tracker.peak / 2**20
    return result


def run_encoder_bench(
    shape: EncoderShape, cfg: VisionZipConfig, batches: list[int], device: torch.device, dtype: torch.dtype,
    warmup: int = 1, repeat: int = 5,
) -> dict[str, Any]:  # fmt: skip
    """Time and measure the four paths of :data:`PATHS` at each batch size, plus ``compress`` alone."""
    models = build_encoders(shape, device, dtype)
    paths = make_paths(models, cfg)
    rows = []
    with torch.inference_mode():
        for batch in batches:
            pixels = torch.randn(batch, 3, shape.image_size, shape.image_size, device=device, dtype=dtype)
            times = measure_times(paths, pixels, device, warmup, repeat)
            n = (shape.image_size // shape.patch_size) ** 2 + 1
            hidden = torch.randn(batch, n, shape.hidden, device=device, dtype=dtype)
            scores = torch.rand(batch, n, device=device)
            keys = torch.randn(batch, n, shape.hidden // shape.heads, device=device, dtype=dtype)
            only = {"compress": lambda h, s=scores, k=keys: compress(h, s, k, cfg)}
            times.update(measure_times(only, hidden, device, warmup, repeat))
            for name in [*paths, "compress"]:
                row = {"batch": batch, "path": name, "median_ms": times[name], "ratio_to_a": times[name] / times["a"]}
                if name in paths:
                    row.update(measure_memory(paths[name], pixels, device))
                rows.append(row)
    return {
        "shape": asdict(shape),
        "visionzip": cfg.to_dict(),
        "device": str(device),
        "dtype": str(dtype),
        "rows": rows,
    }


def render_table(result: dict[str, Any]) -> str:
    """Markdown table of :func:`run_encoder_bench`'s rows."""
    cuda = any("cuda_peak_extra_mib" in row for row in result["rows"])
    head = "| batch | path | median ms | / (a) | extra MiB (op outputs) |" + (" CUDA peak extra MiB |" if cuda else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in result["rows"]:
        label = f"({row['path']}) {PATHS[row['path']]}" if row["path"] in PATHS else "compress alone"
        memory = f"{row['extra_mib']:.1f}" if "extra_mib" in row else "-"
        line = f"| {row['batch']} | {label} | {row['median_ms']:.2f} | {row['ratio_to_a']:.3f} | {memory} |"
        if cuda:
            line += f" {row['cuda_peak_extra_mib']:.1f} |" if "cuda_peak_extra_mib" in row else " - |"
        lines.append(line)
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m visionzip.bench", description=__doc__)
    sub = parser.add_subparsers(dest="bench", required=True)
    enc = sub.add_parser("encoder", help="vision encoder paths (a)-(d)")
    enc.add_argument("--small", action="store_true", help="a CPU-sized encoder (same token count)")
    enc.add_argument("--shape", choices=sorted(SHAPES), default=None, help="overrides --small")
    enc.add_argument("--batch", type=int, nargs="+", default=[1, 5], help="5 = LLaVA-NeXT's crops of one image")
    enc.add_argument("--dominant", type=int, default=54)
    enc.add_argument("--contextual", type=int, default=10)
    enc.add_argument("--layer", type=int, default=-2)
    enc.add_argument("--warmup", type=int, default=1)
    enc.add_argument("--repeat", type=int, default=5)
    enc.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    enc.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None, help="fp16 on GPU, fp32 CPU")
    enc.add_argument("--json", default=None, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point; prints the Markdown table and the JSON."""
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    shape = SHAPES[args.shape or ("small" if args.small else "vit-l-336")]
    cfg = VisionZipConfig(dominant=args.dominant, contextual=args.contextual, layer=args.layer)
    logger.info("encoder %s, %s %s, VisionZip %d+%d", shape, device, dtype, cfg.dominant, cfg.contextual)
    result = run_encoder_bench(shape, cfg, args.batch, device, dtype, args.warmup, args.repeat)
    print(render_table(result))
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
    return result


if __name__ == "__main__":
    main()
