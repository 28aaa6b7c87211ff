"""FastV, PDrop and SparseVLM in the subclasses of transformers' LLaVA classes (``visionzip.hf.inllm``).

The independent check is our own LLaVA: a tiny LLaVA-1.5 and LLaVA-NeXT checkpoint converted with
``python -m llava.convert --to-hf`` give, with the same method, the same logits and greedy tokens in transformers'
class as in ours on the source checkpoint. Also: keep-everything equals the parent class, a left-padded batch equals
its rows one by one, the method is saved in ``config.json`` and reloaded, and bad budgets are refused with numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

from llava import convert
from llava.conversation import get_conv_template
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from visionzip import VisionZipConfig
from visionzip.baselines import FastVConfig, PDropConfig, SparseVLMConfig
from visionzip.hf.inllm import image_ids_from_mask
from visionzip.hf.llava import VisionZipLlavaForConditionalGeneration, VisionZipLlavaProcessor
from visionzip.hf.llava_next import VisionZipLlavaNextForConditionalGeneration, VisionZipLlavaNextProcessor

FAMILIES = {
    "v15": (VisionZipLlavaForConditionalGeneration, VisionZipLlavaProcessor, LlavaForConditionalGeneration),
    "v16": (VisionZipLlavaNextForConditionalGeneration, VisionZipLlavaNextProcessor, LlavaNextForConditionalGeneration),
}
METHODS = {  # schedules that fit the tiny checkpoints' decoder layers
    "fastv": FastVConfig(layer=1, keep=10),
    "pdrop": PDropConfig(layers=(1,), ratio=0.25),
    "sparsevlm": SparseVLMConfig(layers=(0,), scale=2.0),
}
SIZES = [(97, 50), (40, 121)]  # (width, height)
QUESTIONS = ["What is in the image?", "Describe the colours, please."]
ATOL = 1e-5
NEW = 4


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _prompt(question: str) -> str:
    conv = get_conv_template("vicuna_v1")
    conv.append_message(conv.roles[0], f"<image>\n{question}")
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


@pytest.fixture(scope="module")
def exported(tiny_pair: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both tiny checkpoints through the command line's entry (``python -m llava.convert --to-hf``)."""
    root = tmp_path_factory.mktemp("inllm_hf")
    for family in FAMILIES:
        convert.main(["--to-hf", str(tiny_pair[family]), str(root / family)])
    return {family: root / family for family in FAMILIES}


@pytest.fixture(scope="module")
def ours(tiny_pair: dict[str, Path]) -> dict[str, tuple]:
    """Our LLaVA on each source checkpoint: (tokenizer, model, image processor)."""
    out = {}
    for family in FAMILIES:
        tokenizer, model, image_processor, _ = load_pretrained_model(
            str(tiny_pair[family]), device="cpu", device_map=None
        )
        out[family] = (tokenizer, model.eval(), image_processor)
    return out


def _ours_run(ours: tuple, method: Any, image: Image.Image, question: str) -> tuple[torch.Tensor, list[int]]:
    """Our LLaVA with ``method``: (prefill logits (1, L, V), greedy new tokens)."""
    tokenizer, model, image_processor = ours
    model.set_pruning(method)
    try:
        ids = tokenizer_image_token(_prompt(question), tokenizer, return_tensors="pt")[None]
        pixels = process_images([image], image_processor, model.config)
        with torch.no_grad():
            logits = model(ids, images=pixels, image_sizes=[image.size]).logits
            new = model.generate(ids, images=pixels, image_sizes=[image.size], max_new_tokens=NEW, do_sample=False)
    finally:
        model.set_pruning(None)
    return logits, new[0].tolist()


def _theirs_run(model: Any, processor: Any, image: Image.Image, question: str) -> tuple[torch.Tensor, list[int]]:
    inputs = processor(images=image, text=_prompt(question), return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    return logits, out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_equals_our_llava(family: str, name: str, exported: dict[str, Path], ours: dict[str, tuple]) -> None:
    """Same image and prompt, same method: transformers' class gives our LLaVA's logits (fp32, 1e-5) and greedy
    tokens; and the method changed them (it pruned something)."""
    model_cls, processor_cls, _ = FAMILIES[family]
    method = METHODS[name]
    model = model_cls.from_pretrained(exported[family], method=method).eval()
    assert model.method_config == method == model.pruning_config
    processor = processor_cls.from_pretrained(exported[family], method=model.method_config)
    vanilla = model_cls.from_pretrained(exported[family]).eval()
    for (width, height), question in zip(SIZES, QUESTIONS, strict=True):
        image = _image(width, height)
        mine_logits, mine_tokens = _ours_run(ours[family], method, image, question)
        logits, tokens = _theirs_run(model, processor, image, question)
        vocab = mine_logits.shape[-1]
        torch.testing.assert_close(logits[..., -1, :vocab], mine_logits[..., -1, :], atol=ATOL, rtol=0)
        assert tokens == mine_tokens
        plain, _ = _theirs_run(vanilla, processor, image, question)
        assert not torch.allclose(plain[..., -1, :], logits[..., -1, :], atol=1e-4)
        assert all(report is not None for report in model.model.language_model.pruning_report())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_keep_everything_is_the_parent(family: str, exported: dict[str, Path]) -> None:
    """No method: exactly the parent class; FastV keeping every token (R=0): the parent's logits and tokens."""
    model_cls, processor_cls, parent_cls = FAMILIES[family]
    parent = parent_cls.from_pretrained(exported[family]).eval()
    off = model_cls.from_pretrained(exported[family]).eval()
    keep_all = model_cls.from_pretrained(exported[family], method=FastVConfig(layer=1, ratio=0.0)).eval()
    processor = processor_cls.from_pretrained(exported[family])
    image = _image(*SIZES[0])
    expected, expected_tokens = _theirs_run(parent, processor, image, QUESTIONS[0])
    logits, tokens = _theirs_run(off, processor, image, QUESTIONS[0])
    assert torch.equal(logits, expected) and tokens == expected_tokens
    logits, tokens = _theirs_run(keep_all, processor, image, QUESTIONS[0])
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
    assert tokens == expected_tokens


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_left_padded_batch_is_one_by_one(family: str, name: str, exported: dict[str, Path]) -> None:
    """Two rows of different lengths and images, left-padded: each row's last logits and greedy tokens are those it
    gets alone."""
    model_cls, processor_cls, _ = FAMILIES[family]
    model = model_cls.from_pretrained(exported[family], method=METHODS[name]).eval()
    processor = processor_cls.from_pretrained(exported[family])
    processor.tokenizer.padding_side = "left"
    images = [_image(*size, seed=i) for i, size in enumerate(SIZES)]
    prompts = [_prompt(question) for question in QUESTIONS]
    batch = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    assert int(batch["attention_mask"].sum(dim=1).min()) < batch["attention_mask"].shape[1]  # really padded
    with torch.no_grad():
        logits = model(**batch).logits[:, -1]
        out = model.generate(**batch, max_new_tokens=NEW, do_sample=False)[:, batch["input_ids"].shape[1] :]
    for row, (image, question) in enumerate(zip(images, QUESTIONS, strict=True)):
        alone, tokens = _theirs_run(model, processor, image, question)
        torch.testing.assert_close(logits[row], alone[0, -1], atol=ATOL, rtol=0)
        assert out[row].tolist() == tokens


@pytest.mark.parametrize("family", list(FAMILIES))
def test_saved_and_reloaded(family: str, exported: dict[str, Path], tmp_path: Path) -> None:
    """``config.json`` holds ``token_pruning`` (as our LLaVA saves it); reloaded, the model prunes the same way;
    ``method=None`` turns it off; another method replaces it."""
    model_cls, processor_cls, _ = FAMILIES[family]
    method = METHODS["pdrop"]
    model = model_cls.from_pretrained(exported[family], method=method).eval()
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["token_pruning"] == method.to_dict()
    reloaded = model_cls.from_pretrained(tmp_path / "saved").eval()
    assert reloaded.pruning_config == method
    processor = processor_cls.from_pretrained(exported[family])
    image = _image(*SIZES[1])
    torch.testing.assert_close(
        _theirs_run(reloaded, processor, image, QUESTIONS[1])[0], _theirs_run(model, processor, image, QUESTIONS[1])[0]
    )
    assert model_cls.from_pretrained(tmp_path / "saved", method=None).method_config is None
    model.set_method(VisionZipConfig(6, 2))
    assert model.pruning_config is None and model.method_config == VisionZipConfig(6, 2)
    model.set_method(method.to_dict())
    assert model.method_config == method and model.visionzip_config is None


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bad_budgets_refused(family: str, exported: dict[str, Path]) -> None:
    """Budgets the model cannot meet are refused with the numbers; one method at a time."""
    model_cls, _, _ = FAMILIES[family]
    model = model_cls.from_pretrained(exported[family])
    layers = model.config.text_config.num_hidden_layers
    with pytest.raises(ValueError, match=f"FastV layer K={layers} must be below the model's {layers}"):
        model.set_method(FastVConfig(layer=layers, keep=1))
    with pytest.raises(ValueError, match=r"FastV keep=100000 is larger than the image's \d+ tokens"):
        model.set_method(FastVConfig(layer=1, keep=100_000))
    with pytest.raises(ValueError, match=f"SparseVLM's last layer {layers - 1} must leave a layer"):
        model.set_method(SparseVLMConfig(layers=(layers - 1,)))
    assert model.method_config is None
    model.set_method(METHODS["fastv"])
    with pytest.raises(ValueError, match="one method at a time"):
        model.set_visionzip(VisionZipConfig(6, 2))


def test_image_ids_from_mask() -> None:
    """Placeholders and per-image counts -> ids per row (two adjacent images in one row, padding, a text-only row);
    counts that do not fill the placeholders, or an image split over rows, are refused."""
    mask = torch.tensor(
        [[0, 1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0]], dtype=torch.bool
    )  # fmt: skip
    ids = image_ids_from_mask(mask, [2, 3, 3])
    expected = [[-1, 0, 0, 1, 1, 1, -1], [-1] * 7, [-1, -1, 0, 0, 0, -1, -1]]
    assert ids.tolist() == expected
    with pytest.raises(ValueError, match=r"the images have 7 tokens \(\[2, 2, 3\]\) but input_ids hold 8"):
        image_ids_from_mask(mask, [2, 2, 3])
    with pytest.raises(ValueError, match="spans two rows"):
        image_ids_from_mask(mask, [2, 4, 2])


@pytest.mark.parametrize("name", ["fastv", "sparsevlm"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_follow_up_turn_continues_the_cut_cache(
    family: str, name: str, exported: dict[str, Path], ours: dict[str, tuple]
) -> None:  # fmt: skip
    """A second call on the prefill's cache (a follow-up turn's text) attends to the cut cache as our LLaVA's does:
    the same logits for the new tokens."""
    model_cls, processor_cls, _ = FAMILIES[family]
    method = METHODS[name]
    model = model_cls.from_pretrained(exported[family], method=method).eval()
    processor = processor_cls.from_pretrained(exported[family])
    image = _image(*SIZES[0])
    tokenizer, mine, image_processor = ours[family]
    follow = tokenizer(" And the shapes?", add_special_tokens=False, return_tensors="pt").input_ids  # (1, T)
    inputs = processor(images=image, text=_prompt(QUESTIONS[0]), return_tensors="pt")
    with torch.no_grad():
        first = model(**inputs, use_cache=True)
        last = first.past_key_values.get_seq_length(len(first.past_key_values.layers) - 1)
        assert last < inputs["input_ids"].shape[1]  # the last layer's cache was cut
        mask = torch.ones(1, inputs["input_ids"].shape[1] + follow.shape[1], dtype=torch.long)
        theirs = model(input_ids=follow, past_key_values=first.past_key_values, attention_mask=mask).logits
        mine.set_pruning(method)
        try:
            ids = tokenizer_image_token(_prompt(QUESTIONS[0]), tokenizer, return_tensors="pt")[None]
            pixels = process_images([image], image_processor, mine.config)
            cache = mine(ids, images=pixels, image_sizes=[image.size], use_cache=True).past_key_values
            expected = mine(input_ids=follow, past_key_values=cache, attention_mask=mask).logits
        finally:
            mine.set_pruning(None)
    torch.testing.assert_close(theirs[..., : expected.shape[-1]], expected, atol=ATOL, rtol=0)
