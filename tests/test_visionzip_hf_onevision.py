"""VisionZip subclass of transformers' LLaVA-OneVision: off is the parent, on is the eager-attention reference.

A tiny random llava-hf OneVision checkpoint (SigLIP 48 px / patch 8: 36 patches, no [CLS], 2 layers; Qwen2 2 layers)
saved with ``save_pretrained`` in tmp_path. The reference for VisionZip on is built by hand: the plain transformers
class's tower run with eager attention and ``output_attentions``, attention received (mean over heads and queries)
at the feature layer, keys recomputed from the layer's input, the loop restatement of the method
(``helpers/visionzip_reference.py``), the projector, the crops' layout as a loop, ``image_newline`` appended, and the
result spliced into ``inputs_embeds`` of the plain class.

transformers' ``LlavaOnevisionVideoProcessor`` needs torchvision, which this project does not install; the
processors here get a stand-in (``helpers.onevision.FrameProcessor``) that turns frames into ``pixel_values_videos``
the same way for the plain and the VisionZip processor (the counts under test depend only on the number of frames).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.onevision import (
    IMAGE_ID,
    LAYERS,
    PINPOINTS,
    SIDE,
    VIDEO_ID,
    VIEW,
    PlainProcessor,
    VisionZipProcessor,
    tiny_config,
    tiny_processor,
)
from helpers.sample import SAMPLE
from helpers.visionzip_reference import reference_compress
from PIL import Image
from transformers import (
    LlavaOnevisionForConditionalGeneration,
)
from transformers.image_processing_utils import select_best_resolution

from visionzip import VisionZipConfig
from visionzip.hf.llava_onevision import (
    VisionZipLlavaOnevisionForConditionalGeneration,
)

CFG = VisionZipConfig(dominant=5, contextual=2, layer=-1, cls_token=False, query_chunk=8)  # 7 per view / frame
SIZES = [(40, 130), (100, 40), (90, 90), (200, 190)]  # (height, width): views 1 + 1x3, 1 + 3x1, 1 + 2x2, 1 + 4x4
FRAMES = 3
PROMPT_IMAGE = "USER: <image>\nColour? ASSISTANT:"
PROMPT_VIDEO = "USER: <video>\nWhat happens in the video, and why? ASSISTANT:"
PROMPT_MULTI = "USER: <image> and <image>\nSame shape? ASSISTANT:"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llava-hf OneVision checkpoint written by ``save_pretrained``."""
    path = tmp_path_factory.mktemp("hf_onevision")
    torch.manual_seed(0)
    LlavaOnevisionForConditionalGeneration(tiny_config()).save_pretrained(path)
    return path


def _images(sizes: list[tuple[int, int]]) -> list[Image.Image]:
    with Image.open(SAMPLE) as photo:
        return [photo.convert("RGB").resize((w, h)) for h, w in sizes]  # PIL sizes are (width, height)


def _video(frames: int = FRAMES, size: tuple[int, int] = (50, 70)) -> np.ndarray:
    """(F, H, W, 3) uint8: the sample photo panned across, one step per frame."""
    with Image.open(SAMPLE) as photo:
        base = np.asarray(photo.convert("RGB").resize((size[1] + 10 * frames, size[0])))
    return np.stack([base[:, 10 * f : 10 * f + size[1]] for f in range(frames)])


def _batch(processor, kind: str):
    """Processor outputs of a left-padded batch: ``single`` (two images, 17 and 4 views; the parent downsamples the
    first's crops), ``mixed`` (one image, a
    video, a two-image prompt)."""
    if kind == "single":
        text = [PROMPT_IMAGE, PROMPT_VIDEO.replace("<video>", "<image>")]
        return processor(text=text, images=_images([SIZES[3], SIZES[1]]), padding=True, return_tensors="pt")
    a, b, c = _images([SIZES[2], SIZES[0], SIZES[1]])
    return processor(text=[PROMPT_IMAGE, PROMPT_VIDEO, PROMPT_MULTI], images=[[a], [], [b, c]], videos=[_video()],
                     padding=True, return_tensors="pt")  # fmt: skip


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# --- the reference ------------------------------------------------------------------------------------------------


def _eager_compress(eager, pixels: torch.Tensor, cfg: VisionZipConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Compressed encoder tokens (V, K, C) and keep (V, D) from the eager tower's attention maps."""
    tower = eager.model.vision_tower
    out = tower(pixels, output_attentions=True, output_hidden_states=True)
    index = cfg.resolve_layer(LAYERS)
    scores = out.attentions[index].mean(dim=(1, 2))  # (V, N): attention received, mean over heads and queries
    layer = tower.encoder.layers[index]
    normed = layer.layer_norm1(out.hidden_states[index])  # the layer's input, normalised as it does
    v, n, _ = normed.shape
    keys = layer.self_attn.k_proj(normed).view(v, n, layer.self_attn.num_heads, -1).mean(dim=2)
    hidden = out.hidden_states[index + 1]  # hidden_states[-1]: before post_layernorm
    tokens, keep = reference_compress(hidden, scores, keys, cfg)  # loops, float64
    return tokens, torch.tensor(keep)


def _loop_layout(tokens: torch.Tensor, keep: torch.Tensor, nh: int, nw: int, dominant: int) -> torch.Tensor:
    """Base view; the crops' dominant patches by (row, column) of the stitched grid; the crops' contextual tokens."""
    patches, contextual = [], []
    for view in range(1, tokens.shape[0]):
        crop_row, crop_col = divmod(view - 1, nw)
        for j in range(dominant):
            row, col = divmod(int(keep[view, j]), SIDE)
            patches.append((crop_row * SIDE + row, crop_col * SIDE + col, tokens[view, j]))
        contextual += list(tokens[view, dominant:])
    ordered = [t for _, _, t in sorted(patches, key=lambda e: (e[0], e[1]))]
    return torch.cat([tokens[0], torch.stack(ordered + contextual)])


def _grid(height: int, width: int) -> tuple[int, int]:
    best_h, best_w = select_best_resolution((height, width), PINPOINTS)
    return best_h // VIEW, best_w // VIEW


def _reference_images(eager, inputs, cfg: VisionZipConfig) -> list[torch.Tensor]:
    """One (n_i, C_llm) tensor per image, by hand."""
    newline = eager.model.image_newline[None]
    counts = [int(n) for n in inputs["batch_num_images"] for _ in range(int(n))]
    features = []
    for pixels, size, count in zip(inputs["pixel_values"], inputs["image_sizes"].tolist(), counts, strict=True):
        nh, nw = _grid(*size) if count == 1 else (0, 0)  # a multi-image prompt: the base view only
        tokens, keep = _eager_compress(eager, pixels[: 1 + nh * nw], cfg)  # padding views dropped
        projected = eager.model.multi_modal_projector(tokens)  # (V, K, C_llm)
        packed = _loop_layout(projected, keep, nh, nw, cfg.dominant) if count == 1 else projected[0]
        features.append(torch.cat([packed, newline]))
    return features


def _reference_videos(eager, inputs, cfg: VisionZipConfig) -> list[torch.Tensor]:
    """One (F * K + 1, C_llm) tensor per video: frames compressed one by one, then ``image_newline``."""
    out = []
    for video in inputs.get("pixel_values_videos", []):
        frames = [eager.model.multi_modal_projector(_eager_compress(eager, f[None], cfg)[0])[0] for f in video]
        out.append(torch.cat([*frames, eager.model.image_newline[None]]))
    return out


def _spliced_logits(plain, inputs, images: list[torch.Tensor], videos: list[torch.Tensor]) -> torch.Tensor:
    """The plain class's logits with the features written over the image and video placeholders."""
    ids = inputs["input_ids"]
    embeds = plain.get_input_embeddings()(ids).clone()
    for token, features in ((IMAGE_ID, images), (VIDEO_ID, videos)):
        mask = ids == token
        assert int(mask.sum()) == sum(f.shape[0] for f in features)
        if features:
            embeds[mask] = torch.cat(features)
    with torch.no_grad():
        return plain(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits


# --- tests --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["single", "mixed"])
def test_off_is_the_transformers_class(checkpoint: Path, kind: str) -> None:
    """VisionZip off (nothing saved, or visionzip=None) gives the parent's placeholders and logits, exactly."""
    plain = LlavaOnevisionForConditionalGeneration.from_pretrained(checkpoint).eval()
    inputs = _batch(tiny_processor(PlainProcessor), kind)
    expected = _logits(plain, inputs)
    for kwargs in ({}, {"visionzip": None}):
        model = VisionZipLlavaOnevisionForConditionalGeneration.from_pretrained(checkpoint, **kwargs).eval()
        proc = tiny_processor(VisionZipProcessor, **kwargs)
        assert model.visionzip_config is None and proc.visionzip_config is None
        off = _batch(proc, kind)
        assert torch.equal(off["input_ids"], inputs["input_ids"])
        assert torch.equal(_logits(model, off), expected)


@pytest.mark.parametrize("kind", ["single", "mixed"])
def test_on_equals_eager_reference_spliced_into_the_plain_class(checkpoint: Path, kind: str) -> None:
    model = VisionZipLlavaOnevisionForConditionalGeneration.from_pretrained(checkpoint, visionzip=CFG).eval()
    inputs = _batch(tiny_processor(VisionZipProcessor, visionzip=CFG), kind)
    eager = LlavaOnevisionForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="eager").eval()
    plain = LlavaOnevisionForConditionalGeneration.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        images, videos = _reference_images(eager, inputs, CFG), _reference_videos(eager, inputs, CFG)
        got = model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"], batch_num_images=inputs["batch_num_images"]
        ).pooler_output
        got_videos = model.get_video_features(inputs["pixel_values_videos"]).pooler_output if videos else []
    assert [g.shape[0] for g in got] == [f.shape[0] for f in images]
    for g, f in zip([*got, *got_videos], [*images, *videos], strict=True):
        torch.testing.assert_close(g, f, rtol=1e-5, atol=1e-5)
    expected = _spliced_logits(plain, inputs, images, videos)
    torch.testing.assert_close(_logits(model, inputs), expected, rtol=1e-5, atol=1e-5)


def test_processor_counts_equal_feature_counts(checkpoint: Path) -> None:
    """Mixed sizes (one past anyres_max_9), a two-image prompt and a video: placeholders == features."""
    model = VisionZipLlavaOnevisionForConditionalGeneration.from_pretrained(checkpoint, visionzip=CFG).eval()
    proc = tiny_processor(VisionZipProcessor, visionzip=CFG)
    images = _images([*SIZES, SIZES[0], SIZES[3]])
    inputs = proc(
        text=[PROMPT_IMAGE] * 4 + [PROMPT_MULTI, PROMPT_VIDEO], images=[[i] for i in images[:4]] + [images[4:], []],
        videos=[_video(frames=4)], padding=True, return_tensors="pt",
    )  # fmt: skip
    singles = [(1 + nh * nw) * CFG.tokens + 1 for nh, nw in (_grid(*size) for size in SIZES)]
    assert singles == [4 * 7 + 1, 4 * 7 + 1, 5 * 7 + 1, 17 * 7 + 1]
    images_per_row = (inputs["input_ids"] == IMAGE_ID).sum(dim=1).tolist()
    assert images_per_row == [*singles, 2 * (CFG.tokens + 1), 0]
    assert (inputs["input_ids"] == VIDEO_ID).sum(dim=1).tolist() == [0] * 5 + [4 * CFG.tokens + 1]
    counts = proc._get_num_multimodal_tokens(image_sizes=SIZES, video_sizes=[(4, 50, 70)])
    assert counts.num_image_tokens == singles and counts.num_video_tokens == [4 * CFG.tokens + 1]
    with torch.no_grad():
        got = model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"], batch_num_images=inputs["batch_num_images"]
        ).pooler_output
        video = model.get_video_features(inputs["pixel_values_videos"]).pooler_output
    assert [g.shape[0] for g in got] == [*singles, CFG.tokens + 1, CFG.tokens + 1]
    assert tuple(video.shape[:2]) == (1, 4 * CFG.tokens + 1)
    assert _logits(model, inputs).shape[:2] == inputs["input_ids"].shape  # the model's own count checks pass


def test_batched_left_padded_generate_equals_one_by_one(checkpoint: Path) -> None:
    """An image, a video and a two-image prompt, batched with left padding, give the tokens each gives alone."""
    model = VisionZipLlavaOnevisionForConditionalGeneration.from_pretrained(checkpoint, visionzip=CFG).eval()
    proc = tiny_processor(VisionZipProcessor, visionzip=CFG)
    batch = _batch(proc, "mixed")
    assert not batch["attention_mask"].all(dim=1).all()  # some prompt is padded
    options = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    batched = model.generate(**batch, **options)[:, batch["input_ids"].shape[1] :]
    a, b, c = _images([SIZES[2], SIZES[0], SIZES[1]])
    alone = [
        proc(text=[PROMPT_IMAGE], images=[a], return_tensors="pt"),
        proc(text=[PROMPT_VIDEO], videos=[_video()], return_tensors="pt"),
        proc(text=[PROMPT_MULTI], images=[[b, c]], return_tensors="pt"),
    ]
    for row, inputs in enumerate(alone):
        single = model.generate(**inputs, **options)[:, inputs["input_ids"].shape[1] :]
        assert batched[row].tolist() == single[0].tolist()


def test_two_models_in_one_process_do_not_interfere(checkpoint: Path) -> None:
    """A model with VisionZip and one without, used in turn, each give what they give alone."""
    plain_proc, vz_proc = tiny_processor(PlainProcessor), tiny_processor(VisionZipProcessor, visionzip=CFG)
    plain_inputs, vz_inputs = _batch(plain_proc, "mixed"), _batch(vz_proc, "mixed")
    off = VisionZipLlavaOnevisionForConditionalGeneration.from_pretrained(checkpoint).eval()
    expected_off = _logits(off, plain_inputs)
    on = VisionZipLlavaOnevisionForConditionalGeneration.from_pretrained(checkpoint, visionzip=CFG).eval()
    expected_on = _logits(on, vz_inputs)
    plain = LlavaOnevisionForConditionalGeneration.from_pretrained(checkpoint).eval()
    for _ in range(2):
        assert torch.equal(_logits(off, plain_inputs), expected_off)
        assert torch.equal(_logits(plain, plain_inputs), expected_off)
        assert torch.equal(_logits(on, vz_inputs), expected_on)
    assert off.visionzip_config is None and on.visionzip_config == CFG


def test_save_reload_and_budget_checks(checkpoint: Path, tmp_path: Path) -> None:
    model = VisionZipLlavaOnevisionForConditionalGeneration.from_pretrained(checkpoint, visionzip=CFG).eval()
    inputs = _batch(tiny_processor(VisionZipProcessor, visionzip=CFG), "single")
    model.save_pretrained(tmp_path)
    reloaded = VisionZipLlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert reloaded.visionzip_config == CFG
    assert torch.equal(_logits(reloaded, inputs), _logits(model, inputs))
    _, info = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with pytest.raises(ValueError, match="has no \\[CLS\\] token"):
        model.set_visionzip(VisionZipConfig(5, 2, layer=-1))
    with pytest.raises(ValueError, match="layer=-2 differs from vision_feature_layer=-1"):
        model.set_visionzip(VisionZipConfig(5, 2, cls_token=False))
    with pytest.raises(ValueError, match="larger than the 36 tokens"):
        model.set_visionzip(VisionZipConfig(37, 0, layer=-1, cls_token=False))
