"""eval.runner on tiny checkpoints: batched answers equal one-by-one answers, scores equal the model's own loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from eval.options import ModelOptions
from eval.runner import LlavaRunner
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.conversation import get_conv_template
from llava.mm_utils import process_images, tokenizer_image_token
from llava.tiny import write_tiny_llava
from visionzip import VisionZipConfig

SAMPLE = Path(__file__).resolve().parents[1] / "llava/serve/examples/chelsea.jpg"
GEN = {"max_new_tokens": 8, "temperature": 0, "do_sample": False}
CONTEXTS = ["What colour is it?", "What is the shape of the object in the middle?", "Describe the image."]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-runner")
    return {"v15": write_tiny_llava(root), "v16": write_tiny_llava(root, next=True)}


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    with Image.open(SAMPLE) as photo:
        cat = photo.convert("RGB")
    return [Image.new("RGB", (40, 30), (220, 20, 20)), Image.new("RGB", (64, 64), (20, 20, 220)), cat]


def _runner(ckpt: Path, **kwargs: object) -> LlavaRunner:
    return LlavaRunner.load(ModelOptions.from_kwargs(pretrained=str(ckpt), **kwargs), "cpu")


def test_visionzip_is_on_with_the_towers_layer(ckpts: dict[str, Path]) -> None:
    runner = _runner(ckpts["v15"], dominant=8, contextual=2)
    assert runner.model.config.visionzip == VisionZipConfig(8, 2, layer=-2).to_dict()
    assert _runner(ckpts["v15"]).model.config.visionzip is None
    assert runner.conv_template == "vicuna_v1"  # the backbone's template when none is given


@pytest.mark.parametrize("visionzip", [{}, {"dominant": 8, "contextual": 2}])
def test_batched_generation_equals_one_by_one(ckpts: dict[str, Path], images: list, visionzip: dict) -> None:
    runner = _runner(ckpts["v15"], **visionzip)
    visuals = [[image] for image in images]
    batched = runner.generate(CONTEXTS, visuals, dict(GEN))
    single = [runner.generate([c], [v], dict(GEN))[0] for c, v in zip(CONTEXTS, visuals, strict=True)]
    assert batched == single
    assert all(isinstance(answer, str) for answer in batched)


def test_visionzip_changes_what_the_model_sees(ckpts: dict[str, Path], images: list) -> None:
    plain, zipped = _runner(ckpts["v15"]), _runner(ckpts["v15"], dominant=8, contextual=2)
    prompt = plain.prompt("What is it?", 1)
    ids = tokenizer_image_token(prompt, plain.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    lengths = []
    for runner in (plain, zipped):
        pixels, sizes = runner._images([[images[2]]])
        embeds = runner.model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, pixels, sizes)[4]
        lengths.append(embeds.shape[1] - (ids.shape[1] - 1))
    tower = plain.model.get_vision_tower()
    assert lengths == [tower.num_patches_per_side**2, 10]


def _reference_loss(runner: LlavaRunner, context: str, continuation: str, image: Image.Image) -> tuple[float, int]:
    """The model's own mean loss on the conversation answered with ``continuation`` (labels past the open prompt,
    so the reply and the template's ``</s>``), and how many tokens it averages."""
    conv = get_conv_template(runner.conv_template)
    conv.append_message(conv.roles[0], "<image>\n" + context)
    conv.append_message(conv.roles[1], continuation)
    context_len = len(tokenizer_image_token(runner.prompt(context, 1), runner.tokenizer))
    ids = tokenizer_image_token(conv.get_prompt(), runner.tokenizer, return_tensors="pt")[None]
    assert ids[0, -1] == runner.tokenizer.eos_token_id  # vicuna_v1 ends the reply with </s>
    labels = ids.clone()
    labels[:, :context_len] = IGNORE_INDEX
    pixels, sizes = runner._images([[image]])
    with torch.inference_mode():
        loss = runner.model(input_ids=ids, labels=labels, images=pixels, image_sizes=sizes).loss
    return loss.item(), int((labels[:, 1:] != IGNORE_INDEX).sum())


def test_loglikelihood_matches_the_models_loss_batched_or_not(ckpts: dict[str, Path], images: list) -> None:
    runner = _runner(ckpts["v15"], dominant=8, contextual=2)
    continuations = [" red", " a small circle", " a cat on a blanket"]
    visuals = [[image] for image in images]
    batched = runner.loglikelihood(CONTEXTS, continuations, visuals)
    for score, context, continuation, image in zip(batched, CONTEXTS, continuations, images, strict=True):
        assert score.log_prob < 0 and isinstance(score.greedy, bool)
        loss, count = _reference_loss(runner, context, continuation, image)
        assert (score.loss, score.num_tokens) == (pytest.approx(loss, rel=1e-4), count)
        single = runner.loglikelihood([context], [continuation], [[image]])[0]
        assert single.log_prob == pytest.approx(score.log_prob, rel=1e-5)


def _reference_answer(runner: LlavaRunner, query: str, images: list[Image.Image]) -> str:
    """The model's own greedy ``generate`` on the vicuna_v1 prompt of ``query`` (its ``<image>`` tokens written out),
    with the images preprocessed by ``process_images`` (none: no pixels at all)."""
    conv = get_conv_template("vicuna_v1")
    conv.append_message(conv.roles[0], query)
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), runner.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    assert int((ids == IMAGE_TOKEN_INDEX).sum()) == len(images)
    pixels = process_images(images, runner.image_processor, runner.model.config) if images else None
    sizes = [image.size for image in images] if images else None
    with torch.inference_mode():
        output = runner.model.generate(
            ids, images=pixels, image_sizes=sizes, do_sample=False, max_new_tokens=GEN["max_new_tokens"]
        )
    return runner.tokenizer.batch_decode(output, skip_special_tokens=True)[0].split("</s>")[0].strip()


def test_several_images_and_none(ckpts: dict[str, Path], images: list, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two images where the context places them, two put in front of a context without ``<image>``, and none: each
    answer is the model's own greedy answer to that prompt with those images (in that order), batched or not."""
    runner = _runner(ckpts["v15"], budget=10)
    red, blue, cat = images
    requests = [
        ("Compare <image> with <image>.", [red, cat], "Compare <image> with <image>."),
        ("Compare <image> with <image>.", [cat, red], "Compare <image> with <image>."),  # the order is kept
        ("Compare them.", [blue, cat], "<image>\n<image>\nCompare them."),  # <image> tokens put in front
        ("Say hello.", [], "Say hello."),
    ]
    expected = [_reference_answer(runner, query, visuals) for _, visuals, query in requests]
    seen: list[dict] = []  # what the runner hands the model's generate
    model_generate = runner.model.generate
    monkeypatch.setattr(runner.model, "generate", lambda *a, **kw: seen.append(kw) or model_generate(*a, **kw))
    one_by_one = [runner.generate([context], [visuals], dict(GEN))[0] for context, visuals, _ in requests]
    assert one_by_one == expected
    for kwargs, (_, visuals, _) in zip(seen, requests, strict=True):  # the images themselves, in reading order
        assert kwargs["image_sizes"] == ([image.size for image in visuals] or None)
        if visuals:
            assert torch.equal(kwargs["images"], process_images(visuals, runner.image_processor, runner.model.config))
        else:
            assert kwargs["images"] is None
    batched = runner.generate([r[0] for r in requests], [r[1] for r in requests], dict(GEN))
    assert batched == expected
    assert all(expected), "every reference answer has text (a test that compares empty strings proves nothing)"
    with pytest.raises(ValueError, match="image tokens"):
        runner.generate(["One <image> only."], [images[:2]], dict(GEN))
    with pytest.raises(ValueError, match="PIL images"):
        runner.generate(["A video?"], [["frame.mp4"]], dict(GEN))


@pytest.mark.parametrize("budget", ["per_crop", "total"])
def test_anyres_batches_of_different_grids(ckpts: dict[str, Path], images: list, budget: str) -> None:
    runner = _runner(ckpts["v16"], budget=16, visionzip_budget=budget)
    visuals = [[image] for image in images]  # different sizes: different AnyRes grids in one batch
    batched = runner.generate(CONTEXTS, visuals, dict(GEN))
    assert batched == [runner.generate([c], [v], dict(GEN))[0] for c, v in zip(CONTEXTS, visuals, strict=True)]
