"""Tiny random Qwen3-VL / Qwen3-VL-MoE / Qwen3.5 / Qwen3.5-MoE checkpoints for the tests.

Vision: patch 4, 2x2 merge, 3 blocks of width 32 (4 heads), DeepStack levels after blocks 0 and 1 (Qwen3-VL), a
4x4 learned position grid. LLM: 4 layers (Qwen3.5: linear attention in layers 0-2, full attention in layer 3, as its
every-4th pattern), interleaved M-RoPE over 4 frequencies; the MoE variants route over 4 experts, 2 per token. The
processor is the VisionZip one with no budget (the parents' counts) and the Qwen2 tests' plain chat template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import Qwen3_5Config, Qwen3_5MoeConfig, Qwen3VLConfig, Qwen3VLMoeConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from llava.tiny import llama_style_tokenizer, tokenizer_corpus

PATCH, MERGE, TEMPORAL = 4, 2, 2
DEEPSTACK = [0, 1]  # vision blocks whose outputs DeepStack adds into LLM layers 0 and 1
SPECIALS = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
CONFIGS = {"qwen3_vl": Qwen3VLConfig, "qwen3_vl_moe": Qwen3VLMoeConfig, "qwen3_5": Qwen3_5Config,
           "qwen3_5_moe": Qwen3_5MoeConfig}  # fmt: skip
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)


def _text(family: str, vocab: int) -> dict[str, Any]:
    text = dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                         "mrope_interleaved": True},
    )  # fmt: skip
    if family.startswith("qwen3_5"):
        text.update(
            head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
            linear_num_value_heads=4, linear_conv_kernel_dim=2,
        )  # fmt: skip
        text["rope_parameters"] = dict(text["rope_parameters"], partial_rotary_factor=0.5)  # 8 of 16 dims rotate
    if family.endswith("moe"):
        text.update(MOE, shared_expert_intermediate_size=16) if family == "qwen3_5_moe" else text.update(MOE)
    return text


def tiny_config(family: str, tokenizer) -> Any:
    """A tiny config of ``family`` (a key of CONFIGS) for ``tokenizer`` (with the SPECIALS added)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    vision = dict(
        depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=PATCH, spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL, out_hidden_size=32, num_position_embeddings=16,
    )  # fmt: skip
    if family.startswith("qwen3_vl"):
        vision["deepstack_visual_indexes"] = DEEPSTACK
    return CONFIGS[family](
        text_config=_text(family, len(tokenizer)), vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip


def write_tiny_qwen3(root: Path, families: dict[str, tuple]) -> dict[str, Path]:
    """One checkpoint per family (``name -> (plain model class, VisionZip processor class, ...)``) under ``root``."""
    tokenizer = llama_style_tokenizer(tokenizer_corpus(), vocab_size=320, model_max_length=1024)
    tokenizer.add_tokens(SPECIALS, special_tokens=True)
    tokenizer.padding_side = "left"
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL,
        size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64},
    )  # fmt: skip
    out = {}
    for seed, (family, (plain_cls, processor_cls, *_)) in enumerate(families.items()):
        torch.manual_seed(seed)
        plain_cls(tiny_config(family, tokenizer)).save_pretrained(root / family)
        processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
        processor.save_pretrained(root / family)
        out[family] = root / family
    return out
