"""lmms-eval models qwen2_vl_visionzip / qwen2_5_vl_visionzip: model args -> budget, and the runner on a tiny model.

The runner's answers must be the model's own greedy ``generate`` on the chat template's prompt (built here by hand),
with the budget the args ask for; its multiple-choice losses must be the model's cross-entropy on the reply.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.qwen_tiny import write_tiny_qwen
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration

from eval.options import ModelOptions
from eval.plugin import MODELS
from eval.qwen_vl_visionzip import QwenOptions, load_qwen_runner, requested_budget
from visionzip.hf.qwen2_vl import (
    QwenVisionZipConfig,
    VisionZipQwen2_5_VLForConditionalGeneration,
    VisionZipQwen2_5_VLProcessor,
)


def _budget(saved: QwenVisionZipConfig | None = None, **args) -> QwenVisionZipConfig | None:
    qwen, rest = QwenOptions.split_kwargs(args)
    return requested_budget(ModelOptions.from_kwargs(pretrained="x", **rest), qwen, saved)


def test_model_args_give_the_budget() -> None:
    assert _budget(retention="0.7") == QwenVisionZipConfig(0.65, 0.05)
    assert _budget(retention=0.5, merge="mean") == QwenVisionZipConfig(0.45, 0.05, merge="mean")
    assert _budget(dominant_ratio=0.3, contextual_ratio=0.1) == QwenVisionZipConfig(0.3, 0.1)
    assert _budget(dominant=40, contextual=8) == QwenVisionZipConfig(40, 8)
    saved = QwenVisionZipConfig(0.45, 0.05)
    assert _budget(saved) == saved and _budget() is None
    assert _budget(saved, selection="random") == QwenVisionZipConfig(0.45, 0.05, selection="random")
    assert _budget(saved, visionzip="off") is None
    for bad in [{"retention": 0.7, "visionzip": "off"}, {"dominant_ratio": 0.5}, {"selection": "random"},
                {"retention": 0.7, "dominant_ratio": 0.5, "contextual_ratio": 0.1}]:  # fmt: skip
        with pytest.raises(ValueError):
            _budget(**bad)
    assert {"qwen2_vl_visionzip", "qwen2_5_vl_visionzip"} <= set(MODELS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    families = {"qwen2_5": (Qwen2_5_VLForConditionalGeneration, VisionZipQwen2_5_VLProcessor)}
    return write_tiny_qwen(tmp_path_factory.mktemp("eval_qwen"), families)["qwen2_5"]


def test_runner_answers_and_losses_are_the_models(checkpoint: Path) -> None:
    options = ModelOptions(pretrained=str(checkpoint), device="cpu", batch_size=2)
    with pytest.raises(ValueError, match="our LLaVA"):
        load_qwen_runner(options.replace(budget=64), QwenOptions(), "cpu", "test")
    runner = load_qwen_runner(options, QwenOptions(retention=0.5, max_pixels=48 * 48), "cpu", "test")
    assert runner.model.visionzip_config == QwenVisionZipConfig(0.45, 0.05)
    assert runner.processor.image_processor.size.longest_edge == 48 * 48
    rng = np.random.default_rng(0)
    images = [[Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))] for h, w in [(32, 48), (64, 64)]]
    contexts = ["What is it?", "Colour?"]
    answers = runner.generate(contexts, images, {"max_new_tokens": 3})
    model = VisionZipQwen2_5_VLForConditionalGeneration.from_pretrained(
        checkpoint, visionzip=QwenVisionZipConfig(0.45, 0.05)
    )
    processor = VisionZipQwen2_5_VLProcessor.from_pretrained(
        checkpoint, visionzip=model.visionzip_config, max_pixels=48 * 48
    )
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    for context, visual, answer in zip(contexts, images, answers, strict=True):
        inputs = processor(text=[f"user: {image}{context}\nassistant:"], images=visual, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert answer == processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    scores = runner.loglikelihood(contexts, ["red", "blue"], images)
    assert all(np.isfinite(s.loss) for s in scores)


def test_table_spec_rows_and_the_released_numbers() -> None:
    from eval import grid
    from eval.tables import build_table, load_spec, markdown

    spec = load_spec(Path(__file__).resolve().parents[1] / "eval/tables/qwen2_5_vl.yaml")
    assert spec.lmms_model == "qwen2_5_vl_visionzip" and spec.tasks == ("mme", "ocrbench", "pope", "docvqa_val")
    budgets = {}
    for row in spec.rows:
        args = dict(item.split("=", 1) for item in grid.model_args_string(spec, row, {}).split(","))
        pretrained = args.pop("pretrained")
        budgets[row.tokens] = _budget(**args)
        assert pretrained == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert budgets == {100: None, 70: QwenVisionZipConfig(0.65, 0.05), 50: QwenVisionZipConfig(0.45, 0.05)}
    table = {(r.method, r.tokens): r for r in build_table(spec, {})}
    ratios = [2334 / 2316, 80.9 / 81.5, 86.4 / 86.7, 94.5 / 95.1]  # the README's 70% row over its 100% row
    assert table[("VisionZip", 70)].avg_paper == pytest.approx(100 * sum(ratios) / 4)
    assert "| VisionZip | 50 |" in markdown(spec, list(table.values()))
