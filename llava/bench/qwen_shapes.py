"""The Qwen bench models: shapes (random weights at the real sizes of Qwen2-VL-7B, Qwen2.5-VL-7B, Qwen3-VL-8B and
Qwen3.5-9B, scaled for a CPU), one prompt, one first token; :mod:`llava.bench.qwen` times and measures it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import PretrainedConfig, Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3_5Config, Qwen3VLConfig

from visionzip.hf.qwen2_vl import (
    QwenVisionZipConfig,
    VisionZipQwen2_5_VLForConditionalGeneration,
    VisionZipQwen2VLForConditionalGeneration,
)
from visionzip.hf.qwen3_vl import VisionZipQwen3_5ForConditionalGeneration, VisionZipQwen3VLForConditionalGeneration

TEXT_IDS = (100, 200)  # token ids the prompt text cycles through (random weights: any ids do)


@dataclass(frozen=True)
class QwenShape:
    """The sizes that set the cost: vision tower (heads of ``vision_head_dim``) and LLM (heads of ``llm_head_dim``;
    Qwen3.5: full attention in every ``full_attention_interval``-th layer, Gated DeltaNet linear attention with
    ``linear_*`` heads in the others; Qwen3-VL: DeepStack levels after the ``deepstack`` vision blocks)."""

    family: str  # "qwen2_5_vl", "qwen2_vl", "qwen3_vl" or "qwen3_5"
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
    llm_head_dim: int = 128
    deepstack: tuple[int, ...] = ()
    full_attention_interval: int = 1
    linear_key_heads: int = 16
    linear_value_heads: int = 32
    linear_head_dim: int = 128

    @property
    def llm_hidden(self) -> int:
        return self.llm_heads * self.llm_head_dim  # as the released configs (Qwen3.5-9B: 16 x 256)


_QWEN3_VISION = dict(vision_depth=27, vision_heads=16, vision_head_dim=72, vision_intermediate=4304, patch=16)
PRESETS = {
    "qwen2.5-vl-7b": QwenShape("qwen2_5_vl"),
    "qwen2-vl-7b": QwenShape("qwen2_vl", vision_intermediate=5120),
    "qwen3-vl-8b": QwenShape(
        "qwen3_vl", **_QWEN3_VISION, llm_layers=36, llm_heads=32, llm_kv_heads=8, llm_intermediate=12288,
        vocab=151936, deepstack=(8, 16, 24),
    ),
    "qwen3.5-9b": QwenShape(
        "qwen3_5", **_QWEN3_VISION, llm_layers=32, llm_heads=16, llm_kv_heads=4, llm_head_dim=256,
        llm_intermediate=12288, vocab=248320, full_attention_interval=4,
    ),
}  # fmt: skip
MODEL_CLASSES = {
    "qwen2_vl": VisionZipQwen2VLForConditionalGeneration,
    "qwen2_5_vl": VisionZipQwen2_5_VLForConditionalGeneration,
    "qwen3_vl": VisionZipQwen3VLForConditionalGeneration,
    "qwen3_5": VisionZipQwen3_5ForConditionalGeneration,
}


def scale_shape(shape: QwenShape, scale: float) -> QwenShape:
    """Widths and depths times ``scale`` (head sizes kept), for a CPU; token counts do not change."""
    if scale == 1.0:
        return shape

    def times(value: int, least: int) -> int:
        return max(least, round(value * scale))

    heads = times(shape.llm_heads, 1)
    kv = max(d for d in range(1, heads + 1) if heads % d == 0 and d <= times(shape.llm_kv_heads, 1))
    depth = times(shape.vision_depth, 2)
    interval = shape.full_attention_interval  # whole periods of Qwen3.5's linear/full pattern: >= 1 full layer
    layers = max(1, round(shape.llm_layers * scale / interval)) * interval
    deepstack = tuple(sorted({min(depth - 1, round(i * scale)) for i in shape.deepstack}))  # same relative depths
    return replace(
        shape, vision_depth=depth, vision_heads=times(shape.vision_heads, 1),
        vision_intermediate=times(shape.vision_intermediate, 8), llm_layers=layers,
        llm_heads=heads, llm_kv_heads=kv, llm_intermediate=times(shape.llm_intermediate, 8),
        vocab=times(shape.vocab, 1024), deepstack=deepstack, linear_key_heads=times(shape.linear_key_heads, 1),
        linear_value_heads=times(shape.linear_value_heads, 1),
    )  # fmt: skip


def model_config(shape: QwenShape) -> PretrainedConfig:
    """The transformers config of ``shape``; Qwen2.5-VL: full attention in every 8th block and the last (as the 7B
    models)."""
    if shape.family in ("qwen3_vl", "qwen3_5"):
        return _qwen3_config(shape)
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


def _qwen3_config(shape: QwenShape) -> Qwen3VLConfig | Qwen3_5Config:
    """Qwen3-VL / Qwen3.5: their towers (no windows; DeepStack on Qwen3-VL) and LLMs, rotary as released."""
    vision = dict(
        depth=shape.vision_depth, num_heads=shape.vision_heads, hidden_size=shape.vision_heads * shape.vision_head_dim,
        intermediate_size=shape.vision_intermediate, patch_size=shape.patch, out_hidden_size=shape.llm_hidden,
    )  # fmt: skip
    text = dict(
        vocab_size=shape.vocab, hidden_size=shape.llm_hidden, intermediate_size=shape.llm_intermediate,
        num_hidden_layers=shape.llm_layers, num_attention_heads=shape.llm_heads, num_key_value_heads=shape.llm_kv_heads,
        head_dim=shape.llm_head_dim,
    )  # fmt: skip
    special = dict(
        image_token_id=shape.vocab - 4, video_token_id=shape.vocab - 3, vision_start_token_id=shape.vocab - 2,
        vision_end_token_id=shape.vocab - 1,
    )  # fmt: skip
    if shape.family == "qwen3_vl":
        vision["deepstack_visual_indexes"] = list(shape.deepstack)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                   "mrope_interleaved": True}  # fmt: skip
        return Qwen3VLConfig(text_config=text, vision_config=vision, **special)
    kinds = ["full_attention" if (i + 1) % shape.full_attention_interval == 0 else "linear_attention"
             for i in range(shape.llm_layers)]  # fmt: skip
    text.update(
        layer_types=kinds, linear_num_key_heads=shape.linear_key_heads, linear_num_value_heads=shape.linear_value_heads,
        linear_key_head_dim=shape.linear_head_dim, linear_value_head_dim=shape.linear_head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "mrope_section": [11, 11, 10],
                         "mrope_interleaved": True, "partial_rotary_factor": 0.25},
    )  # fmt: skip
    return Qwen3_5Config(text_config=text, vision_config=vision, **special)


def kv_bytes_per_token(model: Any) -> int:
    """Bytes the KV cache holds per prompt token: keys and values of the full-attention layers (Qwen3.5's linear
    layers keep a fixed-size recurrent state instead, whatever the prompt length)."""
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kinds = getattr(text, "layer_types", None)
    layers = text.num_hidden_layers if kinds is None else sum(kind == "full_attention" for kind in kinds)
    return 2 * layers * text.num_key_value_heads * head_dim * model.dtype.itemsize


def build_model(shape: QwenShape, device: torch.device, dtype: torch.dtype, attn: str) -> Any:
    """A VisionZip model of ``shape`` with random weights (VisionZip off until a path sets it)."""
    cls = MODEL_CLASSES[shape.family]
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
