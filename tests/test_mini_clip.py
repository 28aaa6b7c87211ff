"""Tests for eval.mini.clip: the tiny CLIP trained on the mini splits' captions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTextModelWithProjection, CLIPVisionModel

from eval.mini.clip import (
    ClipConfig,
    build_caption_tokenizer,
    contrastive_loss,
    object_patches,
    swapped_caption,
    tokenize_captions,
    write_clip,
)
from eval.mini.data import DataConfig, write_kind
from eval.mini.shapes import PALETTE
from llava.model.vision_tower import CLIPVisionTower

TINY = ClipConfig(kinds=("multi",), hidden_size=32, heads=2, intermediate_size=64, text_hidden_size=32, text_heads=2,
                  text_intermediate_size=64, projection_dim=16, batch_size=8, epochs=2, max_steps=3,
                  hard_negatives=True)  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mini-data")
    write_kind(DataConfig("multi", train_images=16, test_images=6), out)
    return out


def test_caption_tokenizer() -> None:
    tokenizer = build_caption_tokenizer(32)
    batch = tokenize_captions(tokenizer, ["a red circle", "a small teal triangle, a gray circle and a blue rectangle"])
    ids = batch["input_ids"]
    assert tokenizer.eos_token_id != 2  # CLIP's text tower treats eos id 2 as a legacy config
    assert ids[0, 0] == tokenizer.bos_token_id and ids[0, 4] == tokenizer.eos_token_id and ids[0, 5:].eq(0).all()
    assert ids.shape[1] == 2 + 12 and batch["attention_mask"][1].all()  # "circle," is two words
    with pytest.raises(ValueError, match="outside"):
        tokenize_captions(tokenizer, ["a purple circle"])


def test_contrastive_loss() -> None:
    """CLIP's loss for distinct captions; duplicates and extra negatives change the targets as documented."""
    logits = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    reference = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.t(), torch.arange(6))) / 2
    torch.testing.assert_close(contrastive_loss(logits, torch.arange(6), torch.arange(6)), reference)
    # two images with the same caption: both copies are positives, so tying them is optimal (loss = entropy of the
    # targets, log 2 for two rows of three in each direction), while distinct ids push the diagonal up
    same = torch.tensor([0, 0, 1])
    tied = torch.tensor([[50.0, 50, 0], [50, 50, 0], [0, 0, 50]])
    diagonal = torch.tensor([[60.0, 50, 0], [50, 60, 0], [0, 0, 50]])
    torch.testing.assert_close(contrastive_loss(tied, same, same), torch.tensor(2 / 3 * np.log(2), dtype=torch.float32))
    assert contrastive_loss(tied, same, same) < contrastive_loss(diagonal, same, same)
    ids = torch.arange(3)
    assert contrastive_loss(diagonal, ids, ids) < contrastive_loss(tied, ids, ids)
    # an extra negative column enters the image-to-text term only; one that repeats a caption is a positive
    extra = torch.cat([logits, torch.randn(6, 2)], dim=1)
    i2t = F.cross_entropy(extra, torch.arange(6))
    t2i = F.cross_entropy(logits.t(), torch.arange(6))
    torch.testing.assert_close(contrastive_loss(extra, torch.arange(6), torch.arange(8)), (i2t + t2i) / 2)
    repeated = contrastive_loss(extra, torch.arange(6), torch.tensor([0, 1, 2, 3, 4, 5, 0, 9]))
    targets = torch.eye(6, 8)
    targets[0, 6] = 1
    torch.testing.assert_close(repeated, (F.cross_entropy(extra, targets / targets.sum(1, keepdim=True)) + t2i) / 2)


def test_swapped_caption_changes_one_attribute_of_one_object() -> None:
    meta = {"objects": [{"shape": "circle", "color": "red", "box": [0, 0, 9, 9], "small": True},
                        {"shape": "triangle", "color": "blue", "box": [50, 0, 69, 19], "small": False}]}  # fmt: skip
    rng = np.random.default_rng(0)
    for _ in range(20):
        words = swapped_caption(meta, rng).replace(",", "").split()
        original = ["a", "small", "red", "circle", "and", "a", "blue", "triangle"]
        assert len(words) == len(original)
        changed = [(a, b) for a, b in zip(original, words, strict=True) if a != b]
        assert len(changed) == 1 and changed[0][1] not in ("red", "blue")  # a new colour is one not in the image


def test_object_patches() -> None:
    image = np.full((96, 96, 3), 230, dtype=np.uint8)
    image[0:12, 0:12] = PALETTE["red"]  # exactly patch 0
    image[50:52, 90:96] = PALETTE["blue"]  # row 50 // 12 = 4, column 90 // 12 = 7 -> patch 39
    cells = object_patches(image, ["red", "blue", "green"], grid=8)
    assert cells.shape == (3, 64)
    assert np.flatnonzero(cells[0]).tolist() == [0] and np.flatnonzero(cells[1]).tolist() == [39]
    assert not cells[2].any()
    with pytest.raises(ValueError, match="patch grid"):
        object_patches(image[:90], ["red"], grid=8)


def test_write_clip_trains_saves_a_loadable_tower_and_resumes(data_dir: Path, tmp_path: Path) -> None:
    out = write_clip(data_dir, tmp_path / "clip", TINY)
    vision = CLIPVisionModel.from_pretrained(out)
    processor = CLIPImageProcessorPil.from_pretrained(out)
    assert processor.crop_size == {"height": 96, "width": 96} and vision.config.image_size == 96
    assert vision.config.image_size // vision.config.patch_size == 8
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training"]["steps"] == 3 and metrics["multi"]["images"] == 6
    assert 0 <= metrics["multi"]["cls_mass_on_objects"] <= 1 and 0 <= metrics["multi"]["swap_accuracy"] <= 1
    # LLaVA's own tower reads it: 64 patch tokens of layer -2
    tower = CLIPVisionTower(str(out))
    tower.load_pretrained()
    pixels = torch.randn(2, 3, 96, 96)
    assert tower(pixels).shape == (2, 64, TINY.hidden_size)
    torch.testing.assert_close(tower(pixels), vision(pixels, output_hidden_states=True).hidden_states[-2][:, 1:])
    # CDPruner's text relevance loads the text tower with its projection: the same weights as the full CLIP's
    full, text = CLIPModel.from_pretrained(out), CLIPTextModelWithProjection.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(text(input_ids=ids).text_embeds, full.get_text_features(input_ids=ids).pooler_output)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    write_clip(data_dir, tmp_path / "clip", TINY)  # resume: same settings, nothing to do
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_training_is_deterministic(data_dir: Path, tmp_path: Path) -> None:
    first = write_clip(data_dir, tmp_path / "a", TINY)
    second = write_clip(data_dir, tmp_path / "b", TINY)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
