"""Tiny random Qwen2-VL / Qwen2.5-VL checkpoints for the tests (vision: patch 4, 2x2 merge, 2 blocks; LLM: 2 layers).

Qwen2.5-VL's windows are 2x2 merged tokens (16 px) and its last (scoring) block attends within them. The processor
is the VisionZip one with no budget (the parent's counts) and a plain chat template.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2VLConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from llava.tiny import llama_style_tokenizer, tokenizer_corpus

PATCH, MERGE, TEMPORAL = 4, 2, 2
SPECIALS = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def tiny_config(family: str, tokenizer) -> Qwen2VLConfig | Qwen2_5_VLConfig:
    """``"qwen2"`` or ``"qwen2_5"``: the config of a tiny model for ``tokenizer`` (with the SPECIALS added)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
    )  # fmt: skip
    common = dict(patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, depth=2, num_heads=4)
    special = dict(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
    )  # fmt: skip
    if family == "qwen2":
        vision = dict(common, embed_dim=32, hidden_size=32, mlp_ratio=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **special)
    vision = dict(
        common, hidden_size=32, intermediate_size=64, out_hidden_size=32, window_size=16, fullatt_block_indexes=[0],
        tokens_per_second=2,
    )  # fmt: skip
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)


def write_tiny_qwen(root: Path, families: dict[str, tuple]) -> dict[str, Path]:
    """One checkpoint per family (``name -> (plain model class, VisionZip processor class, ...)``) under ``root``."""
    tokenizer = llama_style_tokenizer(tokenizer_corpus(), vocab_size=320, model_max_length=1024)
    tokenizer.add_tokens(SPECIALS, special_tokens=True)
    tokenizer.padding_side = "left"
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
        size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64},
    )
    out = {}
    for seed, (family, (plain_cls, processor_cls, *_)) in enumerate(families.items()):
        torch.manual_seed(seed)
        plain_cls(tiny_config(family, tokenizer)).save_pretrained(root / family)
        processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
        processor.save_pretrained(root / family)
        out[family] = root / family
    return out
