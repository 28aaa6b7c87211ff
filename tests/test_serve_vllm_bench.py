"""``llava.serve.vllm.bench``'s sizes and first-token FLOPs, against ``llava.bench`` (runs without vLLM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava.bench.flops import path_flops
from llava.bench.shapes import PRESETS, scale_shape
from llava.serve.vllm.bench import Row, first_token_flops, render_table, tiny_config
from visionzip.config import VisionZipConfig

SHAPE = scale_shape(PRESETS["llava-1.5-7b"], 0.125)
TEXT_TOKENS = 14


@pytest.fixture
def export(tmp_path: Path) -> Path:
    """A config.json as the llava-hf export of the scaled shape writes it (what the bench reads)."""
    v, lm = SHAPE.vision, SHAPE.language
    config = {
        "vision_feature_layer": SHAPE.select_layer,
        "vision_config": {
            "hidden_size": v.hidden, "num_hidden_layers": v.layers, "num_attention_heads": v.heads,
            "intermediate_size": v.intermediate, "image_size": v.image_size, "patch_size": v.patch_size,
        },
        "text_config": {
            "hidden_size": lm.hidden, "num_hidden_layers": lm.layers, "num_attention_heads": lm.heads,
            "num_key_value_heads": lm.kv_heads, "intermediate_size": lm.intermediate, "vocab_size": lm.vocab,
            "max_position_embeddings": lm.max_positions,
        },
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_first_token_flops_equal_llava_bench(export: Path) -> None:
    """Vanilla and VisionZip first-token FLOPs equal ``llava.bench``'s closed form (its ``ours`` path: the tower to
    the select layer, the [CLS] scores and the merge), causal prefill, for LLaVA-1.5 at 576 and 64 image tokens."""
    cfg = VisionZipConfig(54, 10)
    vanilla = path_flops(SHAPE, "vanilla", None, 1, TEXT_TOKENS, 0, causal=True).first_token
    ours = path_flops(SHAPE, "ours", cfg, 1, TEXT_TOKENS, 0, causal=True).first_token
    assert first_token_flops(export, 1, TEXT_TOKENS + SHAPE.patches, None) == vanilla
    assert first_token_flops(export, 1, TEXT_TOKENS + cfg.tokens, cfg) == ours
    assert 4 < vanilla / ours < 10  # the LLM's prefill dominates at this scale as in the real model


def test_tiny_config_is_the_scaled_shape() -> None:
    """The written model has the scaled shape's sizes; its heads stay 128 (LLM) and 64 (CLIP) wide."""
    cfg = tiny_config(SHAPE)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size) == (512, 4, 4, 1376)
    assert (cfg.vision_hidden_size, cfg.vision_layers, cfg.image_size, cfg.patch_size) == (128, 3, 336, 14)
    assert cfg.head_dim == 128 and cfg.vision_hidden_size // cfg.vision_heads == 64


def test_table_ratios() -> None:
    """req/s and TTFT ratios to vanilla at the same concurrency, FLOPs as vanilla's over the path's."""
    rows = [
        Row("vanilla", 576, 1, 1.0, 16.0, 600.0, 600.0, 1000, 606, first_token_flops=600),
        Row("VisionZip 54+10", 64, 1, 2.0, 32.0, 200.0, 200.0, 1000, 94, first_token_flops=100),
    ]
    line = render_table(rows).splitlines()[-1]
    assert "| 2.00x | 200 | 200 | 3.00x | 6.00x | 94 | 10 |" in line
