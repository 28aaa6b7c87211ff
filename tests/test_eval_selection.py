"""llava_visionzip's method=divprune|vispruner|cdpruner: model args -> the model's selection; answers equal the
model's own generate with the selection set by hand; CDPruner reads each row's question without the benchmark's
answer-format suffix (a data file); the tally records the visual tokens the language model received."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from eval import instructions
from eval.options import ModelOptions
from eval.runner import LlavaRunner
from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import get_conv_template
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model import selection as selection_module
from llava.model.builder import load_pretrained_model
from llava.tiny import write_tiny_llava
from visionzip.baselines import FastVConfig
from visionzip.baselines.cdpruner import CDPrunerConfig
from visionzip.baselines.divprune import DivPruneConfig
from visionzip.baselines.vispruner import VisPrunerConfig

GEN = {"max_new_tokens": 5, "temperature": 0, "do_sample": False}
SUFFIX = "\nAnswer the question using a single word or phrase."
CONTEXTS = ["What colour is it?" + SUFFIX, "Is the shape in the middle round?" + SUFFIX, "Say hello."]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-selection")
    return {"v15": write_tiny_llava(root), "v16": write_tiny_llava(root, next=True)}


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [Image.new("RGB", (40, 30), (220, 20, 20)), Image.effect_noise((64, 48), 40).convert("RGB")]


def _runner(ckpt: Path, **kwargs: object) -> LlavaRunner:
    return LlavaRunner.load(ModelOptions.from_kwargs(pretrained=str(ckpt), **kwargs), "cpu")


def test_selection_model_args_build_the_config() -> None:
    options = ModelOptions.from_kwargs(pretrained="p", method="vispruner", budget=32, vispruner_important_ratio=0.75)
    assert options.requested_selection() == VisPrunerConfig(tokens=32, important_ratio=0.75)
    assert options.requested_pruning() is None and options.visionzip_args() == []  # budget is the selection's
    assert options.nominal_budget() == 32.0
    assert ModelOptions.from_kwargs(pretrained="p", method="cdpruner").requested_selection() == CDPrunerConfig(64)
    assert ModelOptions.from_kwargs(pretrained="p", method="divprune", divprune_tokens=9).nominal_budget() == 9.0
    assert ModelOptions.from_kwargs(pretrained="p", method="fastv").requested_selection() is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "divprune", "dominant": 54, "contextual": 10}, "are VisionZip's, but method=divprune"),
        ({"method": "divprune", "budget": 16, "divprune_tokens": 8}, "a budget and tokens both set the count"),
        ({"method": "divprune", "vispruner_important_ratio": 0.5}, "options of method=vispruner"),
        ({"method": "vispruner", "vispruner_important_ratio": 1.5}, "important_ratio must be in [0, 1], got 1.5"),
        ({"method": "cdpruner", "cdpruner_layer": 2}, "cdpruner has no option 'layer'"),
    ],
)
def test_bad_selection_args_are_refused_naming_the_arg(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ModelOptions.from_kwargs(pretrained="p", **kwargs)


def test_instructions_drop_every_listed_answer_format_suffix() -> None:
    listed = [entry["text"] for entry in yaml.safe_load(instructions.ANSWER_FORMATS.read_text())["suffixes"]]
    assert SUFFIX in listed  # the reference's (CDPruner's model_vqa_loader)
    for suffix in listed:
        assert instructions.instruction_of(f"<image>\nWhat is it?{suffix}") == "What is it?"
    vizwiz = "Q?\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SUFFIX
    assert instructions.instruction_of(vizwiz) == "Q?"  # two suffixes, one after the other
    ocr = "Q?\nReference OCR token: STOP, 25" + SUFFIX
    assert instructions.instruction_of(ocr) == "Q?\nReference OCR token: STOP, 25"  # the OCR tokens are the question's
    assert instructions.instruction_of(SUFFIX) == SUFFIX.strip()  # never empty
    assert instructions.instruction_of("Q? Answer briefly.", suffixes=[" Answer briefly."]) == "Q?"


def _reference_answers(ckpt: Path, cfg, contexts: list[str], visuals: list[list[Image.Image]], texts) -> list[str]:
    """The model's own greedy ``generate``, one prompt at a time, loaded afresh with ``cfg`` set by hand (CDPruner
    with the instruction ``texts[i]``)."""
    tokenizer, model, processor, _ = load_pretrained_model(str(ckpt), device="cpu")
    model.set_selection(cfg)
    answers = []
    for context, images, text in zip(contexts, visuals, texts, strict=True):
        conv = get_conv_template("vicuna_v1")
        conv.append_message(conv.roles[0], ("<image>\n" if images else "") + context)
        conv.append_message(conv.roles[1], None)
        ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
        pixels = process_images(images, processor, model.config) if images else None
        extra = {"instructions": [text]} if isinstance(cfg, CDPrunerConfig) else {}
        sizes = [image.size for image in images] if images else None
        with torch.inference_mode():
            output = model.generate(ids, images=pixels, image_sizes=sizes, **extra, **GEN)
        answers.append(tokenizer.batch_decode(output, skip_special_tokens=True)[0].split("</s>")[0].strip())
    return answers


def _views(runner: LlavaRunner, image: Image.Image) -> int:
    """How many views the model encodes for ``image`` (1, or the base view and the AnyRes crops)."""
    pixels = process_images([image], runner.image_processor, runner.model.config)  # (1, 3, H, W), (1, V, 3, H, W)
    first = pixels[0]  # or a list of (V, 3, H, W)
    return first.shape[0] if first.dim() == 4 else 1


@pytest.mark.parametrize(
    ("name", "args", "cfg"),
    [
        ("v15", {"method": "divprune", "budget": 5}, DivPruneConfig(tokens=5)),
        ("v16", {"method": "vispruner", "budget": 6, "vispruner_important_ratio": 0.5}, VisPrunerConfig(6, 0.5)),
        ("v15", {"method": "cdpruner", "budget": 4}, CDPrunerConfig(tokens=4)),
    ],
)
def test_answers_equal_the_models_own_generate_and_the_tally_counts_kept(
    ckpts: dict[str, Path], images: list, name: str, args: dict, cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = _runner(ckpts[name], **args)
    assert runner.model.config.token_selection == cfg.to_dict()
    assert runner.model.config.visionzip_config() is None and not runner.model.config.token_pruning
    seen: list = []  # the instructions the selection read, image by image
    select = selection_module.select_images
    monkeypatch.setattr(
        "llava.model.llava_arch.select_images", lambda m, v, c, t=None: seen.append(t) or select(m, v, c, t)
    )
    visuals = [[images[0]], [images[1]], []]
    questions = ["What colour is it?", "Is the shape in the middle round?", "Say hello."]
    expected = _reference_answers(ckpts[name], cfg, CONTEXTS, visuals, questions)
    assert all(expected), "every reference answer has text (comparing empty strings proves nothing)"
    seen.clear()
    assert runner.generate(CONTEXTS, visuals, dict(GEN)) == expected  # one left-padded batch
    assert seen == [questions[:2] if isinstance(cfg, CDPrunerConfig) else None]  # each row's own question
    summary = runner.tally.summary()
    assert (summary["kind"], summary["method"], summary["nominal_budget"]) == ("kept", cfg.name, float(cfg.tokens))
    kept = [cfg.tokens * _views(runner, image) for image in images]  # T per view
    assert (summary["requests"], summary["requests_without_image"]) == (2, 1)
    assert summary["layer_average_inputs"] == summary["layer_average_outputs"] == sum(kept) / 2
    runner.loglikelihood(CONTEXTS[:2], [" red", " yes"], visuals[:2])  # a selection scores in one pass
    assert runner.tally.summary()["requests"] == 4
    assert seen[-1] == (questions[:2] if isinstance(cfg, CDPrunerConfig) else None)


def test_a_saved_selection_stays_unless_another_method_is_named(ckpts: dict[str, Path], tmp_path: Path) -> None:
    tokenizer, model, _, _ = load_pretrained_model(str(ckpts["v15"]), device="cpu")
    model.set_selection(DivPruneConfig(tokens=8))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    kept = _runner(tmp_path)
    assert kept.model.config.token_selection == DivPruneConfig(tokens=8).to_dict()
    assert kept.tally.summary()["nominal_budget"] == 8.0
    visionzip = _runner(tmp_path, method="visionzip")  # VisionZip 54+10 instead: the selection goes
    assert visionzip.model.config.token_selection is None and visionzip.model.config.visionzip_config() is not None
    fastv = _runner(tmp_path, method="fastv", budget=40, fastv_layer=1)  # the tiny LLaVA has 2 layers
    assert fastv.model.config.token_selection is None
    assert fastv.model.config.token_pruning == FastVConfig(layer=1, budget=40).to_dict()
    assert _runner(tmp_path, method="vispruner", budget=4).model.config.token_selection == VisPrunerConfig(4).to_dict()
