"""llava.bench.qwen end to end at a tiny scale on the CPU: its vanilla path is the parent class, its token counts
follow the budgets, its files are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen3_5ForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)

from llava.bench.qwen import _timed_ms, main
from llava.bench.qwen_shapes import (
    PRESETS,
    build_model,
    first_token,
    kv_bytes_per_token,
    make_inputs,
    model_config,
    scale_shape,
)
from visionzip.config import QwenVisionZipConfig


def test_vanilla_path_is_the_parent_class() -> None:
    """With VisionZip off, the bench's model gives transformers' own class's logits exactly (fp32, every position,
    and the first generated step), so the vanilla row times the parent class."""
    shape = scale_shape(PRESETS["qwen2.5-vl-7b"], 0.05)
    config = model_config(shape)
    assert config.vision_config.fullatt_block_indexes[-1] == shape.vision_depth - 1  # the scoring block: full
    torch.manual_seed(0)
    model = build_model(shape, torch.device("cpu"), torch.float32, "sdpa")
    plain = Qwen2_5_VLForConditionalGeneration(model.config).eval()
    plain.load_state_dict(model.state_dict())
    inputs = make_inputs(model, (112, 112), 10, None)
    model.set_visionzip(None)
    step = {"max_new_tokens": 1, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    with torch.inference_mode():
        expected = plain(**inputs).logits  # (1, L, V)
        got = model(**inputs).logits
        expected_step = plain.generate(**inputs, **step).logits[0]  # (1, V): the first token's
        got_step = model.generate(**inputs, **step).logits[0]
    assert expected.shape == (1, inputs["input_ids"].shape[1], config.text_config.vocab_size)
    assert torch.equal(got, expected)
    assert torch.equal(got_step, expected_step)
    # generate's first step is the prefill's last row (its lm_head runs on one row: the same values to rounding)
    assert torch.allclose(expected_step, expected[:, -1], rtol=0, atol=1e-5)
    assert torch.equal(first_token(model, None, inputs)[:, -1], expected_step.argmax(-1))


def test_cli_rows_and_files(tmp_path: Path) -> None:
    rows = main(["--scale", "0.05", "--image", "112x112", "--text-tokens", "10", "--warmup", "0", "--repeat", "1",
                 "--device", "cpu", "--out", str(tmp_path)])  # fmt: skip
    # 8 x 8 patches -> 16 merged tokens; 70% = round(10.4) + round(0.8) = 11, 50% = round(7.2) + round(0.8) = 8
    assert [(r["retention"], r["visual_tokens"]) for r in rows] == [(1.0, 16), (0.7, 11), (0.5, 8)]
    assert [r["prompt_tokens"] - r["visual_tokens"] for r in rows] == [11, 11, 11]  # text + <|vision_start|>
    assert rows[2]["kv_cache_mib"] / rows[0]["kv_cache_mib"] == rows[2]["prompt_tokens"] / rows[0]["prompt_tokens"]
    assert all(r["ttft_ms"] > 0 and r["extra_mib"] > 0 for r in rows)
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == rows
    assert "| VisionZip | 50% | 8 |" in (tmp_path / "table.md").read_text()
    assert all(r["ttft_ms"] > 0 for r in rows)  # process CPU time
    with pytest.raises(ValueError, match="CPU runs only"):
        _timed_ms(lambda: None, torch.device("meta"), "cpu")


@pytest.mark.parametrize(
    ("preset", "parent"),
    [("qwen3-vl-8b", Qwen3VLForConditionalGeneration), ("qwen3.5-9b", Qwen3_5ForConditionalGeneration)],
)
def test_qwen3_rows_are_the_parent_class_and_kv_is_the_cache_s(preset: str, parent: type) -> None:
    """The Qwen3 presets at a tiny scale: vanilla logits are the parent class's exactly; the KV MiB the bench
    reports per prompt token is what the prefill's cache holds in its attention layers (Qwen3.5: the full-attention
    ones; its linear layers' state does not grow with the prompt), vanilla and VisionZip."""
    shape = scale_shape(PRESETS[preset], 0.05)
    config = model_config(shape)
    if preset == "qwen3.5-9b":
        assert config.text_config.layer_types.count("full_attention") >= 1  # scaling keeps a whole period
    else:
        assert len(config.vision_config.deepstack_visual_indexes) == len(PRESETS[preset].deepstack) - 1  # 2 blocks
    torch.manual_seed(0)
    model = build_model(shape, torch.device("cpu"), torch.float32, "sdpa")
    plain = parent(model.config).eval()
    plain.load_state_dict(model.state_dict())
    for cfg in (None, QwenVisionZipConfig(0.45, 0.05)):
        inputs = make_inputs(model, (128, 128), 10, cfg)
        model.set_visionzip(cfg)
        with torch.inference_mode():
            out = model(**inputs, use_cache=True)
            if cfg is None:
                assert torch.equal(out.logits, plain(**inputs).logits)
        cache = out.past_key_values
        held = sum(
            layer.keys.nbytes + layer.values.nbytes
            for layer in cache.layers
            if isinstance(getattr(layer, "keys", None), torch.Tensor)
        )
        assert held == inputs["input_ids"].shape[1] * kv_bytes_per_token(model)
    model.set_visionzip(None)


def test_cli_qwen3_vl_rows(tmp_path: Path) -> None:
    rows = main(["--model", "qwen3-vl-8b", "--scale", "0.05", "--image", "128x128", "--text-tokens", "10", "--warmup",
                 "0", "--repeat", "1", "--device", "cpu", "--clock", "cpu", "--out", str(tmp_path)])  # fmt: skip
    # 8 x 8 patches of 16 px -> 16 merged tokens; 70% = 10 + 1, 50% = 7 + 1
    assert [(r["retention"], r["visual_tokens"]) for r in rows] == [(1.0, 16), (0.7, 11), (0.5, 8)]
    assert "| VisionZip | 50% | 8 |" in (tmp_path / "table.md").read_text()
    assert all(r["ttft_ms"] > 0 for r in rows)  # process CPU time
    with pytest.raises(ValueError, match="CPU runs only"):
        _timed_ms(lambda: None, torch.device("meta"), "cpu")
