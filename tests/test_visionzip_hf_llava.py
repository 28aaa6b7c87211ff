"""VisionZip subclasses of transformers' LLaVA / LLaVA-NeXT: off is the parent, on is the eager-attention reference.

Tiny random llava-hf checkpoints (CLIP 32 px / patch 8: 16 patches + [CLS], 3 layers; Llama 2 layers) saved with
``save_pretrained`` in tmp_path. The reference for VisionZip on is built by hand: the plain transformers class's
tower run with eager attention and ``output_attentions``, [CLS] row summed over heads, keys recomputed from the
layer's input, the loop restatement of the method (``helpers/visionzip_reference.py``), the projector, the NeXT layout
as a loop, and the result spliced into ``inputs_embeds`` of the plain class.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.hf_llava import (
    CFG,
    FAMILIES,
    LAYERS,
    PINPOINTS,
    PROMPTS,
    SIDE,
    SIZES,
    VIEW,
    sample_images,
    tiny_config,
    tiny_processor,
    tiny_tokenizer,
)
from helpers.visionzip_reference import reference_compress
from transformers import LlavaNextProcessor, LlavaProcessor
from transformers.image_processing_utils import select_best_resolution

from visionzip import VisionZipConfig
from visionzip.hf.llava import VisionZipLlavaForConditionalGeneration


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random checkpoint per family, with its plain transformers processor, saved by save_pretrained."""
    root, tokenizer = tmp_path_factory.mktemp("hf_llava"), tiny_tokenizer()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    out = {}
    for seed, (family, (plain_cls, _, _)) in enumerate(FAMILIES.items()):
        torch.manual_seed(seed)
        plain_cls(tiny_config(family, len(tokenizer), image_id)).save_pretrained(root / family)
        tiny_processor(family, tokenizer).save_pretrained(root / family)
        out[family] = root / family
    return out


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# --- references ---------------------------------------------------------------------------------------------------


def _eager_compress(eager, pixels: torch.Tensor, cfg: VisionZipConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Compressed encoder tokens (V, K, C) and keep (V, D) from the eager tower's attention maps."""
    tower = eager.model.vision_tower
    out = tower(pixels, output_attentions=True, output_hidden_states=True)
    index = cfg.resolve_layer(LAYERS)
    scores = out.attentions[index][:, :, 0, :].sum(dim=1)  # (V, N): the [CLS] row, summed over heads
    layer = tower.encoder.layers[index]
    normed = layer.layer_norm1(out.hidden_states[index])  # the layer's input, normalised as it does
    v, n, _ = normed.shape
    keys = layer.self_attn.k_proj(normed).view(v, n, layer.self_attn.num_heads, -1).mean(dim=2)
    tokens, keep = reference_compress(out.hidden_states[index + 1], scores, keys, cfg)  # loops, float64
    return tokens, torch.tensor(keep)


def _loop_layout(tokens: torch.Tensor, keep: torch.Tensor, nh: int, nw: int, dominant: int) -> torch.Tensor:
    """Base view; the crops' dominant patches by (row, column) of the stitched grid; their [CLS]; their contextual."""
    patches, cls_rows, contextual = [], [], []
    for view in range(1, tokens.shape[0]):
        crop_row, crop_col = divmod(view - 1, nw)
        for j in range(dominant):
            position = int(keep[view, j])
            if position == 0:
                cls_rows.append(tokens[view, j])
                continue
            row, col = divmod(position - 1, SIDE)
            patches.append((crop_row * SIDE + row, crop_col * SIDE + col, tokens[view, j]))
        contextual += list(tokens[view, dominant:])
    ordered = [t for _, _, t in sorted(patches, key=lambda e: (e[0], e[1]))]
    assert len(ordered) + len(cls_rows) == (tokens.shape[0] - 1) * dominant
    return torch.cat([tokens[0], torch.stack(ordered + cls_rows + contextual)])


def _reference_features(family: str, eager, inputs, cfg: VisionZipConfig) -> list[torch.Tensor]:
    """One (n_i, C_llm) tensor per image, by hand."""
    if family == "llava":
        tokens, _ = _eager_compress(eager, inputs["pixel_values"], cfg)
        return list(eager.model.multi_modal_projector(tokens))
    features = []
    for pixels, (height, width) in zip(inputs["pixel_values"], inputs["image_sizes"].tolist(), strict=True):
        best_h, best_w = select_best_resolution((height, width), PINPOINTS)
        nh, nw = best_h // VIEW, best_w // VIEW
        tokens, keep = _eager_compress(eager, pixels[: 1 + nh * nw], cfg)  # padding views dropped
        features.append(_loop_layout(eager.model.multi_modal_projector(tokens), keep, nh, nw, cfg.dominant))
    return features


def _spliced_logits(plain, inputs, features: list[torch.Tensor]) -> torch.Tensor:
    """The plain class's logits with ``features`` written over the image placeholders of ``inputs_embeds``."""
    ids = inputs["input_ids"]
    embeds = plain.get_input_embeddings()(ids).clone()
    mask = ids == plain.config.image_token_id
    assert int(mask.sum()) == sum(f.shape[0] for f in features)
    embeds[mask] = torch.cat(features)
    with torch.no_grad():
        return plain(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits


# --- tests --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_off_is_the_transformers_class(checkpoints: dict[str, Path], family: str) -> None:
    """VisionZip off (nothing saved, or visionzip=None) gives the parent's placeholders and logits, exactly; a
    VisionZip model in the same process does not change the plain one."""
    plain_cls, vz_cls, vz_proc_cls = FAMILIES[family]
    path = checkpoints[family]
    plain = plain_cls.from_pretrained(path).eval()
    plain_proc = _processor_from(path, family)
    images = sample_images(SIZES[:2])
    inputs = plain_proc(text=PROMPTS, images=images, padding=True, return_tensors="pt")
    expected = _logits(plain, inputs)
    for kwargs in ({}, {"visionzip": None}):
        model = vz_cls.from_pretrained(path, **kwargs).eval()
        proc = vz_proc_cls.from_pretrained(path, **kwargs)
        assert model.visionzip_config is None and proc.visionzip_config is None
        off_inputs = proc(text=PROMPTS, images=images, padding=True, return_tensors="pt")
        assert torch.equal(off_inputs["input_ids"], inputs["input_ids"])
        assert torch.equal(_logits(model, off_inputs), expected)
    on = vz_cls.from_pretrained(path, visionzip=CFG).eval()
    on_proc = vz_proc_cls.from_pretrained(path, visionzip=CFG)
    _logits(on, on_proc(text=PROMPTS, images=images, padding=True, return_tensors="pt"))
    assert torch.equal(_logits(plain, inputs), expected)


def _processor_from(path: Path, family: str):
    return (LlavaProcessor if family == "llava" else LlavaNextProcessor).from_pretrained(path)


@pytest.mark.parametrize("family", FAMILIES)
def test_on_equals_eager_reference_spliced_into_the_plain_class(checkpoints: dict[str, Path], family: str) -> None:
    plain_cls, vz_cls, vz_proc_cls = FAMILIES[family]
    path = checkpoints[family]
    model = vz_cls.from_pretrained(path, visionzip=CFG).eval()
    proc = vz_proc_cls.from_pretrained(path, visionzip=CFG)
    images = sample_images(SIZES[:2])
    inputs = proc(text=PROMPTS, images=images, padding=True, return_tensors="pt")
    eager = plain_cls.from_pretrained(path, attn_implementation="eager").eval()
    plain = plain_cls.from_pretrained(path).eval()
    with torch.no_grad():
        features = _reference_features(family, eager, inputs, CFG)
        got = model.get_image_features(**{k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes")})
    assert [f.shape[0] for f in got.pooler_output] == [f.shape[0] for f in features]
    for g, f in zip(got.pooler_output, features, strict=True):
        torch.testing.assert_close(g, f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(model, inputs), _spliced_logits(plain, inputs, features), rtol=1e-5, atol=1e-5)


def _views(height: int, width: int) -> int:
    best_h, best_w = select_best_resolution((height, width), PINPOINTS)
    return 1 + (best_h // VIEW) * (best_w // VIEW)


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_counts_equal_feature_counts_for_mixed_sizes(checkpoints: dict[str, Path], family: str) -> None:
    _, vz_cls, vz_proc_cls = FAMILIES[family]
    path = checkpoints[family]
    model = vz_cls.from_pretrained(path, visionzip=CFG).eval()
    proc = vz_proc_cls.from_pretrained(path, visionzip=CFG)
    prompts = [PROMPTS[i % 2] for i in range(len(SIZES))]
    inputs = proc(text=prompts, images=sample_images(SIZES), padding=True, return_tensors="pt")
    placeholders = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    expected = [CFG.tokens * (_views(h, w) if family == "next" else 1) for h, w in SIZES]
    assert placeholders == expected
    assert proc._get_num_multimodal_tokens(image_sizes=SIZES).num_image_tokens == expected
    with torch.no_grad():
        pixels = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes")}
        got = model.get_image_features(**pixels).pooler_output
    assert [f.shape[0] for f in got] == expected
    assert _logits(model, inputs).shape[:2] == inputs["input_ids"].shape  # the model's own count check passes


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_left_padded_generate_equals_one_by_one(checkpoints: dict[str, Path], family: str) -> None:
    _, vz_cls, vz_proc_cls = FAMILIES[family]
    path = checkpoints[family]
    model = vz_cls.from_pretrained(path, visionzip=CFG).eval()
    proc = vz_proc_cls.from_pretrained(path, visionzip=CFG)
    images = sample_images([SIZES[0], SIZES[2]])  # NeXT: 4 and 5 views, padded to 5 in the batch
    options = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    batch = proc(text=PROMPTS, images=images, padding=True, return_tensors="pt")
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][1].all()  # the shorter prompt is padded
    batched = model.generate(**batch, **options)[:, batch["input_ids"].shape[1] :]
    for row, (prompt, image) in enumerate(zip(PROMPTS, images, strict=True)):
        alone = proc(text=[prompt], images=[image], return_tensors="pt")
        single = model.generate(**alone, **options)[:, alone["input_ids"].shape[1] :]
        assert batched[row].tolist() == single[0].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_keep_the_budget(checkpoints: dict[str, Path], family: str, tmp_path: Path) -> None:
    plain_cls, vz_cls, vz_proc_cls = FAMILIES[family]
    path = checkpoints[family]
    model = vz_cls.from_pretrained(path, visionzip=CFG).eval()
    proc = vz_proc_cls.from_pretrained(path, visionzip=model.visionzip_config)
    inputs = proc(text=PROMPTS, images=sample_images(SIZES[:2]), padding=True, return_tensors="pt")
    expected = _logits(model, inputs)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["visionzip"] == CFG.to_dict()
    assert json.loads((tmp_path / "processor_config.json").read_text())["visionzip"] == CFG.to_dict()
    assert "visionzip" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
    reloaded, reloaded_proc = vz_cls.from_pretrained(tmp_path).eval(), vz_proc_cls.from_pretrained(tmp_path)
    assert reloaded.visionzip_config == CFG and reloaded_proc.visionzip_config == CFG
    again = reloaded_proc(text=PROMPTS, images=sample_images(SIZES[:2]), padding=True, return_tensors="pt")
    assert torch.equal(again["input_ids"], inputs["input_ids"])
    assert torch.equal(_logits(reloaded, again), expected)
    assert vz_cls.from_pretrained(tmp_path, visionzip=None).visionzip_config is None  # None turns a saved one off
    _, info = plain_cls.from_pretrained(tmp_path, output_loading_info=True)  # the llava-hf key layout
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))


def test_budget_checks(checkpoints: dict[str, Path]) -> None:
    model = VisionZipLlavaForConditionalGeneration.from_pretrained(checkpoints["llava"])
    with pytest.raises(ValueError, match="layer=-1 differs from vision_feature_layer=-2"):
        model.set_visionzip(VisionZipConfig(6, 3, layer=-1))
    with pytest.raises(ValueError, match="larger than the 17 tokens"):
        model.set_visionzip(VisionZipConfig(18, 0))
    with pytest.raises(ValueError, match="positions='original' is not supported"):
        model.set_visionzip(VisionZipConfig(6, 3, positions="original"))
    assert model.visionzip_config is None
    model.set_visionzip(CFG.to_dict())
    assert model.visionzip_config == CFG and model.model.config.visionzip == CFG.to_dict()  # the inner model sees it
