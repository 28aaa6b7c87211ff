"""lmms-eval models qwen3_vl_visionzip / qwen3_5_visionzip: registration, the runner on tiny Qwen3-VL and Qwen3.5
checkpoints (the class follows model_type, answers are the model's own greedy ``generate`` on the chat template's
prompt, built here by hand), and the table specs' rows -> budgets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.qwen3_tiny import write_tiny_qwen3
from PIL import Image
from transformers import Qwen3_5MoeForConditionalGeneration, Qwen3VLForConditionalGeneration

from eval.options import ModelOptions
from eval.plugin import EXTRA_OPTIONS, MODELS
from eval.qwen_vl_visionzip import QwenOptions, load_qwen_runner, requested_budget
from visionzip.hf.qwen3_vl import (
    QwenVisionZipConfig,
    VisionZipQwen3_5MoeForConditionalGeneration,
    VisionZipQwen3VLForConditionalGeneration,
    VisionZipQwen3VLProcessor,
)

ROOT = Path(__file__).resolve().parents[1]
OURS = {
    "qwen3_vl": VisionZipQwen3VLForConditionalGeneration,
    "qwen3_5_moe": VisionZipQwen3_5MoeForConditionalGeneration,
}


def test_names_are_registered() -> None:
    for name, path in (("qwen3_vl_visionzip", "Qwen3VLVisionZip"), ("qwen3_5_visionzip", "Qwen3_5VisionZip")):
        assert MODELS[name] == f"eval.qwen_vl_visionzip.{path}"
        assert EXTRA_OPTIONS[name] == "eval.qwen_vl_visionzip.QwenOptions"
        module, _, cls = MODELS[name].rpartition(".")
        assert getattr(__import__(module, fromlist=[cls]), cls).model_name == name


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    families = {
        "qwen3_vl": (Qwen3VLForConditionalGeneration, VisionZipQwen3VLProcessor),
        "qwen3_5_moe": (Qwen3_5MoeForConditionalGeneration, VisionZipQwen3VLProcessor),
    }
    return write_tiny_qwen3(tmp_path_factory.mktemp("eval_qwen3"), families)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5_moe"])
def test_runner_answers_are_the_models(family: str, checkpoints: dict[str, Path]) -> None:
    options = ModelOptions(pretrained=str(checkpoints[family]), device="cpu", batch_size=2)
    runner = load_qwen_runner(options, QwenOptions(retention=0.5, max_pixels=48 * 48), "cpu", "test")
    assert type(runner.model) is OURS[family]  # by the checkpoint's model_type
    assert runner.model.visionzip_config == QwenVisionZipConfig(0.45, 0.05)
    rng = np.random.default_rng(0)
    images = [[Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))] for h, w in [(32, 48), (64, 64)]]
    contexts = ["What is it?", "Colour?"]
    answers = runner.generate(contexts, images, {"max_new_tokens": 3})
    cfg = QwenVisionZipConfig(0.45, 0.05)
    model = OURS[family].from_pretrained(checkpoints[family], visionzip=cfg).eval()
    processor = VisionZipQwen3VLProcessor.from_pretrained(checkpoints[family], visionzip=cfg, max_pixels=48 * 48)
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    for context, visual, answer in zip(contexts, images, answers, strict=True):
        # the template's newline after the turn is trimmed (transformers renders chat templates with trim_blocks)
        inputs = processor(text=[f"user: {image}{context}assistant:"], images=visual, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert answer == text.strip()  # answers come stripped (a random model may end on a control character)
    assert all(np.isfinite(s.loss) for s in runner.loglikelihood(contexts, ["red", "blue"], images))


@pytest.mark.parametrize(
    ("name", "model", "pretrained"),
    [
        ("qwen3_vl", "qwen3_vl_visionzip", "Qwen/Qwen3-VL-8B-Instruct"),
        ("qwen3_5", "qwen3_5_visionzip", "Qwen/Qwen3.5-9B"),
    ],
)
def test_table_specs_rows_and_benchmarks(name: str, model: str, pretrained: str) -> None:
    from eval import grid
    from eval.tables import load_spec

    spec = load_spec(ROOT / f"eval/tables/{name}.yaml")
    assert spec.lmms_model == model and spec.paper is None
    assert spec.tasks == ("mme", "ocrbench", "pope", "docvqa_val", "chartqa", "mmmu_val")
    budgets = {}
    for row in spec.rows:
        args = dict(item.split("=", 1) for item in grid.model_args_string(spec, row, {}).split(","))
        assert args.pop("pretrained") == pretrained
        qwen, rest = QwenOptions.split_kwargs(args)
        budgets[row.tokens] = requested_budget(ModelOptions.from_kwargs(pretrained="x", **rest), qwen, None)
    assert budgets == {100: None, 70: QwenVisionZipConfig(0.65, 0.05), 50: QwenVisionZipConfig(0.45, 0.05)}
    assert [b.column for b in spec.benchmarks] == ["MME", "OCRBench", "POPE", "DocVQA", "ChartQA", "MMMU"]
