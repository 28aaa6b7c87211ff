"""FastV, PDrop and SparseVLM inside transformers' Video-LLaVA language model (``visionzip.hf.inllm``; Table 3's rows).

A tiny random Video-LLaVA (``tests/helpers/video_llava.py``). The reference is built by hand from the plain parent
class: its image and video features written over the placeholders of its own ``inputs_embeds``, each image's and each
video's span numbered by walking the row, and a separate Llama decoder with the owned loop (its weights copied from the
parent's language model) run on them, then the parent's head. Also: keep-everything is the parent, a left-padded batch
is its rows one by one (logits and greedy tokens), save / reload, refusals.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.video_llava import write_tiny_video_llava
from transformers import LlamaModel, VideoLlavaForConditionalGeneration

from visionzip import VisionZipConfig
from visionzip.baselines import FastVConfig, PDropConfig, SparseVLMConfig
from visionzip.hf.pruned.decoder import PrunedDecoderMixin
from visionzip.hf.video_llava import VisionZipVideoLlavaForConditionalGeneration, VisionZipVideoLlavaProcessor
from visionzip.video import VideoBudget

METHODS = {
    "fastv": FastVConfig(layer=1, keep=5),
    "pdrop": PDropConfig(layers=(1,), ratio=0.25),
    "sparsevlm": SparseVLMConfig(layers=(0,), scale=1.0, bias=0.0),  # the paper's Video-LLaVA setting: keep = rank
}
PROMPTS = [
    "USER: <video>\nWhat happens? ASSISTANT:",
    "USER: <image>\nColour? ASSISTANT:",
    "USER: <image>\nAnd in the clip <video> what is it, and why? ASSISTANT:",
]
ATOL = 1e-5


class ReferenceDecoder(PrunedDecoderMixin, LlamaModel):
    """The owned loop on a plain Llama decoder, outside any LLaVA class."""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_video_llava(tmp_path_factory.mktemp("video_llava_inllm"))


def _batch(processor, prompts: list[str], seed: int = 0) -> dict:
    """The processor's inputs for ``prompts``: as many random videos (4 frames) and images as they ask for."""
    rng = np.random.default_rng(seed)
    videos = [rng.integers(0, 256, (4, 40, 48, 3), dtype=np.uint8) for _ in range(2)]
    images = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(2)]
    n_video, n_image = sum("<video>" in p for p in prompts), sum("<image>" in p for p in prompts)
    return processor(
        text=prompts, videos=videos[:n_video] or None, images=images[:n_image] or None, padding=True,
        return_tensors="pt",
    )  # fmt: skip


def _spans_by_hand(ids: torch.Tensor, image_id: int, video_id: int, image_tokens: int) -> torch.Tensor:
    """Walk each row: every ``image_tokens`` image placeholders are one image, every run of video placeholders one
    video; images are numbered first, then videos, per row."""
    out = torch.full_like(ids, -1)
    for row in range(ids.shape[0]):
        tokens = ids[row].tolist()
        images = sum(t == image_id for t in tokens) // image_tokens
        seen_image, videos, previous = 0, 0, None
        for col, token in enumerate(tokens):
            if token == image_id:
                out[row, col] = seen_image // image_tokens
                seen_image += 1
            elif token == video_id:
                if previous != video_id:
                    videos += 1
                out[row, col] = images + videos - 1
            previous = token
    return out


def _row(inputs: dict, row: int, config) -> dict:
    """Row ``row`` of a left-padded batch alone: its real tokens, and the images and videos the batch dealt it (in row
    order, each row here holding at most one of each)."""
    real = inputs["attention_mask"][row].bool()
    out = {
        "input_ids": inputs["input_ids"][row][real][None],
        "attention_mask": inputs["attention_mask"][row][real][None],
    }
    for key, token in (("pixel_values_images", config.image_token_id), ("pixel_values_videos", config.video_token_id)):
        holds = (inputs["input_ids"] == token).any(dim=1).tolist()  # (B,) rows holding one
        if holds[row]:
            out[key] = inputs[key][sum(holds[:row])][None]
    return out


def _reference_logits(parent, inputs: dict, method) -> torch.Tensor:
    """(B, V) last-position logits, by hand (module docstring)."""
    model, ids = parent.model, inputs["input_ids"]
    config = parent.config
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        image_tokens = 0
        if inputs.get("pixel_values_images") is not None:
            images = model.get_image_features(pixel_values=inputs["pixel_values_images"], return_dict=True)
            image_tokens = images.pooler_output.shape[1]
            embeds[ids == config.image_token_id] = images.pooler_output.flatten(0, 1)
        if inputs.get("pixel_values_videos") is not None:
            videos = model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"], return_dict=True)
            embeds[ids == config.video_token_id] = videos.pooler_output.flatten(0, 1)
        spans = _spans_by_hand(ids, config.image_token_id, config.video_token_id, image_tokens)
        decoder = ReferenceDecoder(config.text_config).eval()
        decoder.load_state_dict(model.language_model.state_dict())
        decoder.config.token_pruning = method.to_dict()
        hidden = decoder(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], image_ids=spans)
        return parent.lm_head(hidden.last_hidden_state[:, -1])


@pytest.mark.parametrize("name", list(METHODS))
def test_equals_the_reference_and_batch_is_one_by_one(name: str, checkpoint: Path) -> None:
    """A left-padded batch (a video; an image; an image and a video in one row): the reference's logits, and each
    row's logits and greedy tokens alone; the method changed them."""
    method = METHODS[name]
    parent = VideoLlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
    model = VisionZipVideoLlavaForConditionalGeneration.from_pretrained(checkpoint, method=method).eval()
    assert model.method_config == method and model.visionzip_config is None
    processor = VisionZipVideoLlavaProcessor.from_pretrained(checkpoint)
    inputs = _batch(processor, PROMPTS)
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1]
        tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)[:, inputs["input_ids"].shape[1] :]
        plain = parent(**inputs).logits[:, -1]
    torch.testing.assert_close(logits, _reference_logits(parent, inputs, method), atol=ATOL, rtol=0)
    assert not torch.allclose(logits, plain, atol=1e-4)
    assert all(report is not None for report in model.pruning_report())
    for row in range(len(PROMPTS)):
        alone = _row(inputs, row, model.config)
        with torch.no_grad():
            one = model(**alone).logits[:, -1]
            new = model.generate(**alone, max_new_tokens=3, do_sample=False)[:, alone["input_ids"].shape[1] :]
        torch.testing.assert_close(one[0], logits[row], atol=ATOL, rtol=0)
        assert new[0].tolist() == tokens[row].tolist()


def test_keep_everything_is_the_parent(checkpoint: Path) -> None:
    """No method: exactly the parent; FastV keeping every token: the parent's logits."""
    parent = VideoLlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = VisionZipVideoLlavaProcessor.from_pretrained(checkpoint)
    inputs = _batch(processor, PROMPTS)
    with torch.no_grad():
        expected = parent(**inputs).logits
        off = VisionZipVideoLlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
        assert torch.equal(off(**inputs).logits, expected)
        keep = VisionZipVideoLlavaForConditionalGeneration.from_pretrained(
            checkpoint, method=FastVConfig(layer=1, ratio=0.0)
        ).eval()
        torch.testing.assert_close(keep(**inputs).logits, expected, atol=ATOL, rtol=0)


def test_saved_reloaded_and_refused(checkpoint: Path, tmp_path: Path) -> None:
    """config.json keeps the method; bad budgets are refused with the numbers; one method at a time."""
    model = VisionZipVideoLlavaForConditionalGeneration.from_pretrained(checkpoint, method=METHODS["sparsevlm"])
    model.save_pretrained(tmp_path / "saved")
    reloaded = VisionZipVideoLlavaForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert reloaded.pruning_config == METHODS["sparsevlm"]
    tokens = model.config.video_seq_length
    with pytest.raises(ValueError, match=f"FastV keep={tokens + 1} is larger than the image's {tokens} tokens"):
        model.set_method(FastVConfig(layer=1, keep=tokens + 1))
    model.set_method(METHODS["fastv"])
    with pytest.raises(ValueError, match="one method at a time"):
        model.set_visionzip_video(VideoBudget(VisionZipConfig(4, 2)))
    model.set_method(None)
    assert model.method_config is None and model.pruning_config is None
