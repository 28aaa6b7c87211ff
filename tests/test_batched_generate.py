"""Batched greedy ``generate`` equals one prompt at a time, row by row, on released-layout tiny checkpoints.

The checkpoints' config.json says ``tokenizer_padding_side: right`` (as the released ones do); generation must
left-pad the spliced prompts anyway. Reference: the same model generating each prompt alone (no padding at all).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.batched import check_batched_equals_single, generate_greedy, pad_rows, prompt_rows

from llava.model.builder import load_pretrained_model
from visionzip import VisionZipConfig
from visionzip.baselines import FastVConfig, PDropConfig, SparseVLMConfig


@pytest.fixture(scope="module")
def loaded(tiny_pair: dict[str, Path]) -> dict[str, tuple]:
    out = {}
    for name, path in tiny_pair.items():
        assert json.loads((path / "config.json").read_text())["tokenizer_padding_side"] == "right"
        tokenizer, model, processor, _ = load_pretrained_model(str(path), device="cpu")
        out[name] = (tokenizer, model, processor)
    return out


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("visionzip", [None, VisionZipConfig(6, 2)], ids=["plain", "visionzip"])
@pytest.mark.parametrize("name", ["v15", "v16"])
def test_batched_greedy_equals_one_prompt_at_a_time(
    loaded: dict[str, tuple], name: str, visionzip: VisionZipConfig | None, side: str
) -> None:
    tokenizer, model, processor = loaded[name]
    model.set_visionzip(visionzip)
    try:
        if name == "v16":  # AnyRes: the images of the batch get different crop grids
            views = [
                image.shape[0] for _, image_list, _ in prompt_rows(tokenizer, processor, model) for image in image_list
            ]
            assert len(set(views)) > 1
        check_batched_equals_single(tokenizer, model, processor, side)
    finally:
        model.set_visionzip(None)


def test_static_cache_batch_equals_one_prompt_at_a_time(loaded: dict[str, tuple]) -> None:
    tokenizer, model, processor = loaded["v16"]
    model.set_visionzip(VisionZipConfig(6, 2))
    try:
        check_batched_equals_single(tokenizer, model, processor, "right", cache_implementation="static")
    finally:
        model.set_visionzip(None)


def test_training_input_keeps_the_configured_right_padding(loaded: dict[str, tuple]) -> None:
    """forward/training: padded on config.tokenizer_padding_side; positions count real tokens in both layouts."""
    tokenizer, model, processor = loaded["v15"]
    rows = prompt_rows(tokenizer, processor, model)
    padded = pad_rows(tokenizer, rows, "left")
    images = [image for _, row_images, _ in rows for image in row_images]
    prepare = model.prepare_inputs_labels_for_multimodal
    with torch.no_grad():
        singles = [prepare(ids[None], None, None, None, None, im or None)[4][0] for ids, im, _ in rows]
        configured = prepare(padded["input_ids"], None, padded["attention_mask"], None, None, images)
        left = prepare(padded["input_ids"], None, padded["attention_mask"], None, None, images, padding_side="left")
    for batch, side in ((configured, "right"), (left, "left")):
        _, positions, mask, _, embeds, _ = batch
        width = embeds.shape[1]
        for r, single in enumerate(singles):
            n = single.shape[0]
            span = slice(0, n) if side == "right" else slice(width - n, width)
            assert mask[r].nonzero().flatten().tolist() == list(range(width))[span]
            assert positions[r, span].tolist() == list(range(n))
            torch.testing.assert_close(embeds[r, span], single, rtol=0, atol=0)


def test_generate_rejects_position_ids(loaded: dict[str, tuple]) -> None:
    tokenizer, model, _ = loaded["v15"]
    ids = tokenizer("Hello there", return_tensors="pt").input_ids
    with pytest.raises(ValueError, match="position_ids"):
        model.generate(ids, position_ids=torch.arange(ids.shape[1])[None], max_new_tokens=1)


def test_generation_never_cuts_a_prompt_at_the_training_limit(loaded: dict[str, tuple]) -> None:
    """tokenizer_model_max_length is training's limit; a longer prompt (its question at the end) generates from
    the whole prompt, as a model whose limit is above it does. Training still cuts at the limit."""
    tokenizer, model, processor = loaded["v15"]
    ids, images, sizes = prompt_rows(tokenizer, processor, model)[0]
    limit = model.config.tokenizer_model_max_length
    prompt_tokens = ids.shape[0] - 1 + model.get_vision_tower().num_patches_per_side ** 2  # one image, "patch"
    try:
        model.config.tokenizer_model_max_length = prompt_tokens - 3
        cut = generate_greedy(model, ids[None], None, images, sizes)
        with torch.no_grad():
            embeds = model.prepare_inputs_labels_for_multimodal(ids[None], None, None, None, None, images)[4]
        assert embeds.shape[1] == prompt_tokens - 3
    finally:
        model.config.tokenizer_model_max_length = limit
    whole = generate_greedy(model, ids[None], None, images, sizes)
    assert cut.sequences.tolist() == whole.sequences.tolist()
    torch.testing.assert_close(cut.logits[0], whole.logits[0], rtol=0, atol=0)


# Methods that prune inside the language model (2 layers in the tiny Llama: cut after layer 0).
PRUNING = [
    FastVConfig(layer=1, keep=10),
    PDropConfig(layers=(1,), ratio=0.25),
    SparseVLMConfig(layers=(0,), scale=2.0),
]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("method", PRUNING, ids=lambda m: m.name)
@pytest.mark.parametrize("name", ["v15", "v16"])
def test_batched_greedy_with_pruning_inside_the_llm(loaded: dict[str, tuple], name: str, method, side: str) -> None:
    """Every method, on our LLaVA-1.5 and NeXT (the image span is all of an image's views): batched = one by one."""
    tokenizer, model, processor = loaded[name]
    model.set_pruning(method)
    try:
        check_batched_equals_single(tokenizer, model, processor, side)
        counts = model.model.visual_counts  # (B, L) the last call's image tokens per layer (one image here)
        assert int(counts[0, -1]) < int(counts[0, 0]), "the method must have cut the image"
    finally:
        model.set_pruning(None)


def test_pruning_that_keeps_everything_is_vanilla(loaded: dict[str, tuple]) -> None:
    tokenizer, model, processor = loaded["v16"]
    ids, images, sizes = prompt_rows(tokenizer, processor, model)[2]
    vanilla = generate_greedy(model, ids[None], None, images, sizes)
    model.set_pruning(FastVConfig(layer=1, ratio=0.0))
    try:
        kept = generate_greedy(model, ids[None], None, images, sizes)
    finally:
        model.set_pruning(None)
    assert kept.sequences.tolist() == vanilla.sequences.tolist()
    for a, b in zip(kept.logits, vanilla.logits, strict=True):
        assert torch.equal(a, b)


def test_pruning_is_saved_refused_with_numbers_and_reloaded(loaded: dict[str, tuple], tmp_path: Path) -> None:
    tokenizer, model, _ = loaded["v15"]
    with pytest.raises(ValueError, match=r"cannot average 20 .* on 64 tokens: the first 1 layers alone average 32"):
        model.set_pruning(FastVConfig(layer=1, budget=20))
    with pytest.raises(ValueError, match="must leave a layer of the model's 2"):
        model.set_pruning(SparseVLMConfig(layers=(1,)))
    model.set_pruning(PDropConfig(layers=(1,), ratio=0.5))
    try:
        model.save_pretrained(tmp_path)
        tokenizer.save_pretrained(tmp_path)
    finally:
        model.set_pruning(None)
    saved = json.loads((tmp_path / "config.json").read_text())["token_pruning"]
    assert saved == PDropConfig(layers=(1,), ratio=0.5).to_dict()
    _, reloaded, _, _ = load_pretrained_model(str(tmp_path), device="cpu")
    assert reloaded.model.pruning_config() == PDropConfig(layers=(1,), ratio=0.5)
