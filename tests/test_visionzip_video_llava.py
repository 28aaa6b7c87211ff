"""VisionZip for transformers' Video-LLaVA: off is the parent, on an eager-attention reference, per frame and video.

A tiny random ``VideoLlavaForConditionalGeneration`` (two CLIP towers of 32 px / patch 8: 16 patches + [CLS], 3 layers;
Llama 2 layers) and its processor are saved with ``save_pretrained`` in tmp_path. The reference for VisionZip on is
built by hand from the plain class loaded with eager attention: each tower run with ``output_attentions``, the [CLS]
row summed over heads, keys recomputed from the layer's input, the loop restatement of the method
(``tests/helpers/visionzip_reference.py``) per image or per frame with
the frame's counts, the projector, and the result written over the placeholders of the plain class's
``inputs_embeds``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.video_llava import FRAMES, LAYERS, TOKENS, write_tiny_video_llava
from helpers.visionzip_reference import reference_compress
from transformers import VideoLlavaForConditionalGeneration

from visionzip import VisionZipConfig
from visionzip.hf.video_llava import (
    VisionZipVideoLlavaForConditionalGeneration,
    VisionZipVideoLlavaProcessor,
)
from visionzip.video import PAPER_FRAME_SPLIT, VideoBudget, apportion, frame_mass, split_evenly

IMAGE = VisionZipConfig(dominant=6, contextual=3)
FRAME = VisionZipConfig(dominant=4, contextual=2)
BUDGETS = {
    "per_frame": VideoBudget(FRAME),
    "uniform": VideoBudget(FRAME, split="uniform", total=22),  # 15 dominant (4,4,4,3) + 7 contextual (2,2,2,1)
    "proportional": VideoBudget(FRAME, split="proportional", total=30),
}
PROMPTS = [
    "USER: <video>\nWhat happens? ASSISTANT:",
    "USER: <image>\nColour? ASSISTANT:",
    "USER: <image>\nAnd in the clip <video> what is it, and why? ASSISTANT:",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_video_llava(tmp_path_factory.mktemp("video_llava"))


def _media(seed: int = 0, frames: int = FRAMES) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two videos (F, 40, 48, 3) and two images (40, 40, 3) of random pixels; a frame of the first video is flat, so
    its frames differ in how [CLS] attends."""
    rng = np.random.default_rng(seed)
    videos = [rng.integers(0, 256, (frames, 40, 48, 3), dtype=np.uint8) for _ in range(2)]
    videos[0][1] = 128
    images = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(2)]
    return videos, images


def _batch(processor, prompts: list[str], seed: int = 0) -> dict:
    """The processor's inputs for ``prompts``, with as many videos and images as their placeholders ask for."""
    videos, images = _media(seed)
    n_video, n_image = sum("<video>" in p for p in prompts), sum("<image>" in p for p in prompts)
    return processor(
        text=prompts, videos=videos[:n_video] or None, images=images[:n_image] or None, padding=True,
        return_tensors="pt",
    )  # fmt: skip


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _load(path: Path, budget: VideoBudget | None, image: VisionZipConfig | None = IMAGE):
    model = VisionZipVideoLlavaForConditionalGeneration.from_pretrained(path, visionzip=image, visionzip_video=budget)
    processor = VisionZipVideoLlavaProcessor.from_pretrained(path, visionzip=image, visionzip_video=budget)
    return model.eval(), processor


# --- reference ------------------------------------------------------------------------------------------------------


def _eager_parts(tower, pixels: torch.Tensor, cfg: VisionZipConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features (V, N, C), [CLS]-row scores (V, N), head-mean keys (V, N, Dh)) from an eager tower's attention maps."""
    out = tower(pixels, output_attentions=True, output_hidden_states=True)
    index = cfg.resolve_layer(LAYERS)
    scores = out.attentions[index][:, :, 0, :].sum(dim=1)  # the [CLS] row, summed over heads
    layer = tower.encoder.layers[index]
    normed = layer.layer_norm1(out.hidden_states[index])  # the layer's input, normalised as it does
    v, n, _ = normed.shape
    keys = layer.self_attn.k_proj(normed).view(v, n, layer.self_attn.num_heads, -1).mean(dim=2)
    return out.hidden_states[index + 1], scores, keys


def _reference_video(eager, clip: torch.Tensor, budget: VideoBudget) -> torch.Tensor:
    """One video (F, 3, H, W) -> (T, C_llm): every frame compressed alone with its own counts, frame after frame."""
    features, scores, keys = _eager_parts(eager.model.video_tower, clip, budget.frame)
    mass = [float(s[1:].sum()) for s in scores]  # what [CLS] gives the frame's patches
    counts = budget.frame_counts(clip.shape[0], TOKENS, mass)
    frames = []
    for f, (dominant, contextual) in enumerate(counts):
        cfg = dataclasses.replace(budget.frame, dominant=dominant, contextual=contextual)
        tokens, _ = reference_compress(features[f : f + 1], scores[f : f + 1], keys[f : f + 1], cfg)
        frames.append(tokens[0])
    return eager.model.multi_modal_projector(torch.cat(frames))


def _spliced_logits(plain, eager, inputs, budget: VideoBudget) -> torch.Tensor:
    """The plain class's logits with the reference image and video features over the placeholders."""
    ids = inputs["input_ids"]
    embeds = plain.get_input_embeddings()(ids).clone()
    with torch.no_grad():
        if "pixel_values_images" in inputs:
            image_parts = _eager_parts(eager.model.image_tower, inputs["pixel_values_images"], IMAGE)
            image_tokens, _ = reference_compress(*image_parts, IMAGE)
            embeds[ids == plain.config.image_token_id] = eager.model.multi_modal_projector(image_tokens).flatten(0, 1)
        videos = [_reference_video(eager, clip, budget) for clip in inputs["pixel_values_videos"]]
        embeds[ids == plain.config.video_token_id] = torch.cat(videos)
        return plain(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits


# --- tests ----------------------------------------------------------------------------------------------------------


def test_off_is_the_transformers_class(checkpoint: Path) -> None:
    """Both budgets None (nothing saved, or passed as None): the parent's placeholder counts and logits, exactly."""
    plain = VideoLlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
    for kwargs in ({}, {"visionzip": None, "visionzip_video": None}):
        model = VisionZipVideoLlavaForConditionalGeneration.from_pretrained(checkpoint, **kwargs).eval()
        processor = VisionZipVideoLlavaProcessor.from_pretrained(checkpoint, **kwargs)
        assert model.visionzip_config is None and model.visionzip_video_config is None
        inputs = _batch(processor, PROMPTS)
        ids = inputs["input_ids"]
        assert (ids == model.config.video_token_id).sum(dim=1).tolist() == [TOKENS * FRAMES, 0, TOKENS * FRAMES]
        assert (ids == model.config.image_token_id).sum(dim=1).tolist() == [0, TOKENS - 1, TOKENS - 1]  # [CLS] off
        assert torch.equal(_logits(model, inputs), _logits(plain, inputs))


@pytest.mark.parametrize("split", BUDGETS)
def test_on_equals_eager_reference_spliced_into_the_plain_class(checkpoint: Path, split: str) -> None:
    budget = BUDGETS[split]
    model, processor = _load(checkpoint, budget)
    inputs = _batch(processor, PROMPTS)
    plain = VideoLlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
    eager = VideoLlavaForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="eager").eval()
    with torch.no_grad():
        got = model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"]).pooler_output
        for clip, features in zip(inputs["pixel_values_videos"], got, strict=True):
            torch.testing.assert_close(features, _reference_video(eager, clip, budget), rtol=1e-5, atol=1e-5)
    expected = _spliced_logits(plain, eager, inputs, budget)
    torch.testing.assert_close(_logits(model, inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split", BUDGETS)
def test_token_counts_per_frame_and_per_video_equal_the_processors(checkpoint: Path, split: str) -> None:
    budget = BUDGETS[split]
    model, processor = _load(checkpoint, budget)
    for frames in (FRAMES, 3):
        videos, _ = _media(1, frames)
        inputs = processor(text=[PROMPTS[0]] * 2, videos=videos, padding=True, return_tensors="pt")
        placeholders = (inputs["input_ids"] == model.config.video_token_id).sum(dim=1).tolist()
        with torch.no_grad():
            features = model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"]).pooler_output
        assert placeholders == [features.shape[1]] * 2 == [budget.tokens(frames)] * 2
        if split != "proportional":  # the per-frame counts do not depend on the pixels
            per_frame = budget.frame_counts(frames, TOKENS)
            assert sum(d + c for d, c in per_frame) == budget.tokens(frames)
    assert BUDGETS["per_frame"].frame_counts(FRAMES, TOKENS) == [(4, 2)] * FRAMES
    assert BUDGETS["uniform"].frame_counts(FRAMES, TOKENS) == [(4, 2), (4, 2), (4, 2), (3, 1)]
    inputs = _batch(processor, PROMPTS[1:2])
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == IMAGE.tokens


def test_batched_video_and_image_prompts_equal_one_by_one(checkpoint: Path) -> None:
    """Left-padded greedy generate over a video, an image and an image+video prompt equals each prompt alone."""
    model, processor = _load(checkpoint, BUDGETS["proportional"])
    batch = _batch(processor, PROMPTS)
    assert batch["attention_mask"].min() == 0  # the prompts differ in length: there is padding
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        together = model.generate(**batch, **settings)[:, batch["input_ids"].shape[1] :]
        videos, images = _media(0)
        alone = []
        for prompt, video, image in ((PROMPTS[0], videos[0], None), (PROMPTS[1], None, images[0])):
            inputs = processor(text=[prompt], videos=video, images=image, return_tensors="pt")
            alone.append(model.generate(**inputs, **settings)[0, inputs["input_ids"].shape[1] :])
        inputs = processor(text=[PROMPTS[2]], videos=[videos[1]], images=[images[1]], return_tensors="pt")
        alone.append(model.generate(**inputs, **settings)[0, inputs["input_ids"].shape[1] :])
    assert [row.tolist() for row in together] == [row.tolist() for row in alone]


def test_budgets_are_saved_and_reloaded(checkpoint: Path, tmp_path: Path) -> None:
    model, processor = _load(checkpoint, BUDGETS["proportional"])
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again = VisionZipVideoLlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert again.visionzip_config == IMAGE and again.visionzip_video_config == BUDGETS["proportional"]
    assert VisionZipVideoLlavaProcessor.from_pretrained(tmp_path).visionzip_video_config == BUDGETS["proportional"]
    off = VisionZipVideoLlavaForConditionalGeneration.from_pretrained(tmp_path, visionzip_video=None)
    assert off.visionzip_video_config is None and off.visionzip_config == IMAGE


def test_proportional_split_sums_to_the_total_and_follows_the_mass() -> None:
    """Constructed masses: the counts sum to the totals, a frame with more mass gets more, caps hold."""
    assert apportion(10, [3.0, 1.0, 1.0, 0.0], [99] * 4) == [6, 2, 2, 0]
    assert apportion(10, [3.0, 1.0, 1.0, 0.0], [4, 99, 99, 99]) == [4, 3, 3, 0]  # the capped part's excess, shared
    assert apportion(5, [0.0, 0.0], [9, 9]) == [3, 2] == split_evenly(5, 2)
    scores = torch.tensor([[0.9, 0.05, 0.05], [0.2, 0.4, 0.4], [0.5, 0.25, 0.25]]) * 4  # 4 heads; [CLS] first
    mass = frame_mass(scores, cls_token=True)
    torch.testing.assert_close(mass, torch.tensor([0.4, 3.2, 2.0]))
    budget = VideoBudget(VisionZipConfig(dominant=14, contextual=3), split="proportional", total=136)
    counts = budget.frame_counts(3, 257, mass.tolist())
    assert sum(d for d, _ in counts) == 112 and sum(c for _, c in counts) == 24  # 136 = 112 + 24, as 8 x (14 + 3)
    dominant = [d for d, _ in counts]
    assert dominant[1] > dominant[2] > dominant[0] >= 1
    assert budget.tokens(8) == 136 == VideoBudget().tokens(8) and VideoBudget().frame.tokens == sum(PAPER_FRAME_SPLIT)


def test_bad_budgets_are_errors(checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="takes no total"):
        VideoBudget(FRAME, total=10)
    with pytest.raises(ValueError, match="needs an int total"):
        VideoBudget(FRAME, split="uniform")
    with pytest.raises(ValueError, match="at least one"):
        VideoBudget(FRAME, split="uniform", total=3).tokens(FRAMES)
    with pytest.raises(ValueError, match="unknown VideoBudget keys"):
        VideoBudget.from_dict({"frames": 8})
    model = VisionZipVideoLlavaForConditionalGeneration.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match="larger than"):
        model.set_visionzip_video(VideoBudget(VisionZipConfig(dominant=TOKENS + 1, contextual=0)))
    with pytest.raises(ValueError, match="vision_feature_layer"):
        model.set_visionzip(VisionZipConfig(dominant=4, contextual=2, layer=-1))
