"""The Qwen2.5-VL / Qwen2-VL bench model: shapes (random weights at the 7B sizes, scaled for a CPU), one prompt, one
first token; :mod:`llava.bench.qwen` times and measures it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

from visionzip.hf.qwen2_vl import (
    QwenVisionZipConfig,
    VisionZipQwen2_5_VLForConditionalGeneration,
    VisionZipQwen2VLForConditionalGeneration,
)

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


def first_token(model: Any, cfg: QwenVisionZipConfig | None, inputs: dict) -> torch.Tensor:
    """Prefill and the first token of one path (its budget set first)."""
    model.set_visionzip(cfg)
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=1, do_sample=False)
