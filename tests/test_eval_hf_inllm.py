"""llava_hf_visionzip's method=fastv|pdrop|sparsevlm on exported tiny checkpoints: the answers, the log-likelihoods
and the achieved visual tokens equal our own LLaVA plugin's on the source checkpoint (the same method in our own
LLaVA); the lmms-eval models without an owned decoder loop still refuse them, naming those that run them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.hf_runner import HfLlavaRunner
from eval.llava_hf_visionzip import FAMILIES
from eval.local_task import SHORT_ANSWER_PROMPT
from eval.options import ModelOptions
from eval.plugin import IN_LLM_MODELS
from eval.runner import LlavaRunner
from llava import convert

GEN = {"max_new_tokens": 5, "temperature": 0, "do_sample": False}
CONTEXTS = ["What colour is the image?" + SHORT_ANSWER_PROMPT, "Is there a circle?" + SHORT_ANSWER_PROMPT]
SIZES = [(48, 32), (20, 70)]  # (width, height): different AnyRes grids


@pytest.fixture(scope="module")
def exported(tiny_pair: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_inllm")
    for name in ("v15", "v16"):
        convert.main(["--to-hf", str(tiny_pair[name]), str(root / name)])
    return {name: root / name for name in ("v15", "v16")}


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("v15", {"method": "fastv", "fastv_layer": 1, "budget": 40}),
        ("v16", {"method": "fastv", "fastv_layer": 1, "fastv_keep": 30}),
        ("v15", {"method": "pdrop", "pdrop_layers": "1", "pdrop_ratio": 0.25}),
        ("v16", {"method": "pdrop", "pdrop_layers": "1", "pdrop_ratio": 0.5}),
        ("v15", {"method": "sparsevlm", "sparsevlm_layers": "0", "sparsevlm_scale": 2.0}),
        ("v16", {"method": "sparsevlm", "sparsevlm_layers": "0", "sparsevlm_scale": 2.0}),
    ],
)
def test_transformers_classes_answer_as_our_llava(
    name: str, args: dict, tiny_pair: dict[str, Path], exported: dict[str, Path], images: list
) -> None:
    ours = LlavaRunner.load(ModelOptions.from_kwargs(pretrained=str(tiny_pair[name]), **args), "cpu")
    options = ModelOptions.from_kwargs(pretrained=str(exported[name]), **args)
    options.refuse_llm_method("llava_hf_visionzip", selections=True)  # runs it
    theirs = HfLlavaRunner.load(options, "cpu", FAMILIES, "llava_hf_visionzip")
    assert theirs.model.method_config == options.requested_pruning() == theirs.model.pruning_config
    visuals = [[image] for image in images]
    expected = ours.generate(CONTEXTS, visuals, dict(GEN))
    assert all(expected), "non-empty answers (comparing empty strings proves nothing)"
    assert theirs.generate(CONTEXTS, visuals, dict(GEN)) == expected  # left-padded batch of 2
    scores = theirs.loglikelihood(CONTEXTS, [" red", " yes"], visuals)
    reference = ours.loglikelihood(CONTEXTS, [" red", " yes"], visuals)
    assert [s.loss for s in scores] == [pytest.approx(s.loss, rel=1e-4) for s in reference]
    mine, their = ours.tally.summary(), theirs.tally.summary()
    assert their == mine and their["requests"] == 4  # the same achieved layer-averages over both calls' rows
    plain = HfLlavaRunner.load(ModelOptions.from_kwargs(pretrained=str(exported[name])), "cpu", FAMILIES, "x")
    assert plain.loglikelihood(CONTEXTS, [" red", " yes"], visuals) != scores  # the method changed something


def test_refusals_name_the_models_and_numbers(exported: dict[str, Path]) -> None:
    assert set(IN_LLM_MODELS) == {"llava_visionzip", "llava_hf_visionzip", "video_llava_visionzip"}
    options = ModelOptions.from_kwargs(pretrained="p", method="pdrop")
    with pytest.raises(
        ValueError,
        match=r"llava_onevision_visionzip does not run: .* llava_hf_visionzip or video_llava_visionzip runs pdrop",
    ):
        options.refuse_llm_method("llava_onevision_visionzip", selections=True)
    too_many = ModelOptions.from_kwargs(pretrained=str(exported["v15"]), method="fastv", fastv_layer=1, fastv_keep=999)
    with pytest.raises(ValueError, match=r"method=fastv on .*: FastV keep=999 is larger than the image's \d+ tokens"):
        HfLlavaRunner.load(too_many, "cpu", FAMILIES, "llava_hf_visionzip")
