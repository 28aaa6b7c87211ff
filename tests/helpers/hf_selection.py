"""Tiny random llava-hf LLaVA-1.5 / NeXT checkpoints and the full CLIP (both towers) whose text tower CDPruner reads."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor, SiglipImageProcessorPil, SiglipVisionConfig

from helpers.hf_llava import FAMILIES, LAYERS, PATCH, VIEW, tiny_config, tiny_processor, tiny_tokenizer
from llava.tiny.clip import write_tiny_clip
from llava.tiny.config import TinyConfig

# the CLIP vision sizes of tiny_config's tower, so CLIP's visual_projection reads that tower's post_layernorm output
CLIP = TinyConfig(
    image_size=VIEW, patch_size=PATCH, vision_hidden_size=32, vision_layers=LAYERS, vision_heads=4,
    vision_intermediate_size=64,
)  # fmt: skip


def write_checkpoints(root: Path) -> dict[str, Path]:
    """``root/llava``, ``root/next`` (plain transformers classes and processors, save_pretrained) and ``root/clip``."""
    tokenizer = tiny_tokenizer()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    out = {}
    for seed, (family, (plain_cls, _, _)) in enumerate(FAMILIES.items()):
        torch.manual_seed(seed)
        plain_cls(tiny_config(family, len(tokenizer), image_id)).save_pretrained(root / family)
        tiny_processor(family, tokenizer).save_pretrained(root / family)
        out[family] = root / family
    out["clip"] = write_tiny_clip(root / "clip", CLIP)
    return out


def write_siglip_llava(root: Path) -> Path:
    """A tiny llava-hf LLaVA-1.5 whose tower is SigLIP (no [CLS]: every encoder token is a patch, strategy "full"),
    with its plain processor (16 placeholders per image), in ``root``."""
    tokenizer = tiny_tokenizer()
    config = tiny_config("llava", len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"))
    vision = config.vision_config
    config.vision_config = SiglipVisionConfig(
        hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size, num_hidden_layers=LAYERS,
        num_attention_heads=vision.num_attention_heads, image_size=VIEW, patch_size=PATCH,
    )  # fmt: skip
    config.vision_feature_select_strategy = "full"
    torch.manual_seed(2)
    LlavaForConditionalGeneration(config).save_pretrained(root)
    image = SiglipImageProcessorPil(size={"height": VIEW, "width": VIEW})
    LlavaProcessor(
        image_processor=image, tokenizer=tokenizer, patch_size=PATCH, vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
    ).save_pretrained(root)  # fmt: skip
    return root
