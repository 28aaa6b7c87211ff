"""llava.bench.qwen end to end at a tiny scale on the CPU: its vanilla path is the parent class, its token counts
follow the budgets, its files are written."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from llava.bench.qwen import PRESETS, _first_token, build_model, main, make_inputs, model_config, scale_shape


def test_vanilla_path_is_the_parent_class() -> None:
    shape = scale_shape(PRESETS["qwen2.5-vl-7b"], 0.05)
    config = model_config(shape)
    assert config.vision_config.fullatt_block_indexes[-1] == shape.vision_depth - 1  # the scoring block: full
    torch.manual_seed(0)
    model = build_model(shape, torch.device("cpu"), torch.float32, "sdpa")
    plain = Qwen2_5_VLForConditionalGeneration(model.config).eval()
    plain.load_state_dict(model.state_dict())
    inputs = make_inputs(model, (112, 112), 10, None)
    with torch.no_grad():
        expected = plain(**inputs).logits[:, -1].argmax(-1)
    assert torch.equal(_first_token(model, None, inputs)[:, -1], expected)


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
