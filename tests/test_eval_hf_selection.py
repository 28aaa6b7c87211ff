"""llava_hf_visionzip's method=divprune|vispruner|cdpruner on exported tiny checkpoints: the answers and the kept
tokens equal our own LLaVA's on the source checkpoint (an independent implementation of the same selection), CDPruner
with the CLIP text tower named by clip_text= and each row's question; refusals name what to pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.hf_runner import HfLlavaRunner
from eval.llava_hf_visionzip import FAMILIES
from eval.local_task import SHORT_ANSWER_PROMPT
from eval.options import ModelOptions
from eval.plugin import SELECTION_MODELS
from eval.runner import LlavaRunner
from llava.model.hf_export import export_to_hf

GEN = {"max_new_tokens": 5, "temperature": 0, "do_sample": False}
CONTEXTS = ["What colour is the image?" + SHORT_ANSWER_PROMPT, "Is there a circle?" + SHORT_ANSWER_PROMPT]
SIZES = [(48, 32), (20, 70)]  # (width, height): different AnyRes grids


@pytest.fixture(scope="module")
def exported(tiny_pair: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_selection")
    return {name: export_to_hf(tiny_pair[name], root / name) for name in ("v15", "v16")}


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


def _clip_folder(source: Path) -> str:
    """The full CLIP checkpoint our tiny LLaVA names as its vision tower (both towers)."""
    return json.loads((source / "config.json").read_text())["mm_vision_tower"]


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("v15", {"method": "divprune", "budget": 5}),
        ("v16", {"method": "vispruner", "budget": 6, "vispruner_important_ratio": 0.5}),
        ("v15", {"method": "cdpruner", "budget": 4}),
        ("v16", {"method": "cdpruner", "budget": 4}),
    ],
)
def test_transformers_classes_answer_as_our_llava(
    name: str, args: dict, tiny_pair: dict[str, Path], exported: dict[str, Path], images: list
) -> None:
    ours = LlavaRunner.load(ModelOptions.from_kwargs(pretrained=str(tiny_pair[name]), **args), "cpu")
    extra = {"clip_text": _clip_folder(tiny_pair[name])} if args["method"] == "cdpruner" else {}
    options = ModelOptions.from_kwargs(pretrained=str(exported[name]), **args, **extra)
    theirs = HfLlavaRunner.load(options, "cpu", FAMILIES, "llava_hf_visionzip")
    assert theirs.model.selection_config == options.requested_selection()
    expected = ours.generate(CONTEXTS, [[image] for image in images], dict(GEN))
    assert all(expected), "non-empty answers (comparing empty strings proves nothing)"
    assert theirs.generate(CONTEXTS, [[image] for image in images], dict(GEN)) == expected  # left-padded batch of 2
    assert theirs.tally.summary() == ours.tally.summary()  # the same kept tokens per request (T per view)
    scores = theirs.loglikelihood(CONTEXTS, [" red", " yes"], [[image] for image in images])
    reference = ours.loglikelihood(CONTEXTS, [" red", " yes"], [[image] for image in images])
    assert [s.loss for s in scores] == [pytest.approx(s.loss, rel=1e-4) for s in reference]


def test_refusals_name_what_to_pass(tiny_pair: dict[str, Path], exported: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="expected clip_text=<full CLIP checkpoint>"):
        HfLlavaRunner.load(
            ModelOptions.from_kwargs(pretrained=str(exported["v15"]), method="cdpruner"), "cpu", FAMILIES, "x"
        )
    with pytest.raises(ValueError, match="our LLaVA reads CDPruner's text tower from the CLIP checkpoint"):
        LlavaRunner.load(ModelOptions.from_kwargs(pretrained=str(tiny_pair["v15"]), clip_text="clip"), "cpu")
    assert set(SELECTION_MODELS) == {"llava_visionzip", "llava_hf_visionzip"}
    options = ModelOptions.from_kwargs(pretrained="p", method="divprune")
    options.refuse_llm_method("llava_hf_visionzip", selections=True)  # runs it
    with pytest.raises(ValueError, match="llava_onevision_visionzip runs VisionZip only; expected method=visionzip"):
        options.refuse_llm_method("llava_onevision_visionzip")
