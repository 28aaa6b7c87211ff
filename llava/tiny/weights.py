"""The tiny checkpoint's tensors (Llama, projector, tuned tower, legacy buffers) and their shards on disk."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from llava.tiny.config import (
    CLIP_VISION_PREFIX,
    FORMATS,
    PROJECTOR_PREFIX,
    TUNED_TOWER_PREFIX,
    TinyConfig,
    seeded,
    write_json,
)


def _fresh(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy that owns its storage, so that saving it writes only its own bytes."""
    return tensor.detach().clone().contiguous()


def llama_weights(llama: LlamaConfig, seed: int) -> dict[str, torch.Tensor]:
    """Randomly initialised `LlamaForCausalLM` weights under their own (released) names."""
    with seeded(seed, "llama"):
        model = LlamaForCausalLM(llama)
    return {key: _fresh(value) for key, value in model.state_dict().items()}


def _linear(in_features: int, out_features: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (out, in) and bias (out,) drawn uniformly in +-1/sqrt(in), as torch.nn.Linear initialises them."""
    bound = 1.0 / math.sqrt(in_features)
    weight = (torch.rand(out_features, in_features, generator=generator) * 2 - 1) * bound
    bias = (torch.rand(out_features, generator=generator) * 2 - 1) * bound
    return weight, bias


def projector_weights(mm_hidden_size: int, hidden_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """`mlp2x_gelu` projector: Sequential(Linear(mm_hidden, hidden), GELU, Linear(hidden, hidden))."""
    w0, b0 = _linear(mm_hidden_size, hidden_size, generator)
    w2, b2 = _linear(hidden_size, hidden_size, generator)
    names = ("0.weight", "0.bias", "2.weight", "2.bias")
    return {PROJECTOR_PREFIX + name: value for name, value in zip(names, (w0, b0, w2, b2), strict=True)}


def tuned_tower_weights(clip_dir: Path, noise: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The vision half of clip/ plus seeded noise, named as LLaVA-1.6 saved its tuned tower.

    clip/model.safetensors names vision weights `vision_model.<...>` (a full CLIPModel), which is exactly the
    transformers 4.x `CLIPVisionModel` naming, so the prefix `model.vision_tower.vision_tower.` completes them.
    """
    clip = load_file(clip_dir / "model.safetensors")
    return {
        TUNED_TOWER_PREFIX + key: value + noise * torch.randn(value.shape, generator=generator)
        for key, value in clip.items()
        if key.startswith(CLIP_VISION_PREFIX)
    }


def rotary_inv_freq(cfg: TinyConfig) -> dict[str, torch.Tensor]:
    """The per-layer `rotary_emb.inv_freq` buffers that transformers 4.31 still saved in the LLaVA-1.5 .bin shards."""
    exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
    return {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq.clone() for i in range(cfg.num_layers)}


def _nbytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor's data."""
    return tensor.numel() * tensor.element_size()


def _split_even(tensors: dict[str, torch.Tensor], num_shards: int) -> list[dict[str, torch.Tensor]]:
    """Cut the ordered tensors into exactly `num_shards` non-empty shards of about equal byte size."""
    if not 1 <= num_shards <= len(tensors):
        raise ValueError(f"expected 1 <= num_shards <= {len(tensors)} (the number of tensors), got {num_shards}")
    total = sum(_nbytes(t) for t in tensors.values())
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    done = 0
    for key, value in tensors.items():
        middle = done + _nbytes(value) / 2  # a tensor goes to the shard its byte midpoint falls in
        shards[min(int(middle * num_shards / total), num_shards - 1)][key] = value
        done += _nbytes(value)
    if all(shards):
        return shards
    # a few huge tensors left a shard empty: split by tensor count instead, which never does
    shards = [{} for _ in range(num_shards)]
    for i, (key, value) in enumerate(tensors.items()):
        shards[i * num_shards // len(tensors)][key] = value
    return shards


def _split_by_size(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Cut the ordered tensors greedily into shards of at most `max_bytes` (a bigger tensor gets its own shard)."""
    if max_bytes <= 0:
        raise ValueError(f"expected a positive shard size in bytes, got {max_bytes}")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in tensors.items():
        if shards[-1] and size + _nbytes(value) > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += _nbytes(value)
    return shards


def _save_shards(shards: list[dict[str, torch.Tensor]], ckpt_dir: Path, fmt: str) -> list[str]:
    """Write each shard with the file names transformers uses; return the file names, and the index if sharded."""
    if fmt not in FORMATS:
        raise ValueError(f"expected fmt in {FORMATS}, got {fmt!r}")
    stem, suffix = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    count = len(shards)
    names = (
        [f"{stem}.{suffix}"] if count == 1 else [f"{stem}-{i:05d}-of-{count:05d}.{suffix}" for i in range(1, count + 1)]
    )
    for name, shard in zip(names, shards, strict=True):
        if fmt == "safetensors":
            save_file(shard, ckpt_dir / name, metadata={"format": "pt"})
        else:
            torch.save(shard, ckpt_dir / name)
    if count > 1:
        weight_map = {key: name for name, shard in zip(names, shards, strict=True) for key in shard}
        total = sum(_nbytes(t) for shard in shards for t in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_json(ckpt_dir / f"{stem}.{suffix}.index.json", index)
    return names


def save_weights(
    tensors: dict[str, torch.Tensor], ckpt_dir: Path, fmt: str, cfg: TinyConfig, shard_size: int | None
) -> list[str]:
    """Save as one model.safetensors, or size-capped safetensors shards, or `cfg.bin_shards` .bin shards."""
    if shard_size is not None:
        shards = _split_by_size(tensors, shard_size)
    elif fmt == "bin":
        shards = _split_even(tensors, cfg.bin_shards)
    else:
        shards = [tensors]
    return _save_shards(shards, ckpt_dir, fmt)
