"""DivPrune, VisPruner and CDPruner in the subclasses of transformers' LLaVA / LLaVA-NeXT (``visionzip.hf.selection``).

Tiny random llava-hf checkpoints (CLIP 32 px / patch 8: 16 patches + [CLS], 3 layers; Llama 2 layers) and a tiny full
CLIP (both towers, the same vision sizes) saved with ``save_pretrained`` in tmp_path. The reference is built by hand:
the plain transformers class's tower run with eager attention (``output_hidden_states``, ``output_attentions``), the
layer LLaVA reads without [CLS], its projector, CLIP's text features from ``CLIPModel.get_text_features`` and
``visual_projection`` over the tower's ``post_layernorm``, the plain selection functions, the kept tokens gathered and
laid out by loops, spliced into the plain class's ``inputs_embeds``.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from helpers.hf_llava import FAMILIES, LAYERS, PINPOINTS, PROMPTS, SIDE, SIZES, VIEW, sample_images
from helpers.hf_selection import write_checkpoints, write_siglip_llava
from safetensors import safe_open
from transformers import AutoTokenizer, CLIPModel, LlavaProcessor
from transformers.image_processing_utils import select_best_resolution

from visionzip import VisionZipConfig
from visionzip.baselines.cdpruner import CDPrunerConfig, cdpruner_relevance, cdpruner_select
from visionzip.baselines.divprune import DivPruneConfig, divprune_select
from visionzip.baselines.vispruner import VisPrunerConfig, vispruner_select

PATCHES = SIDE * SIDE
METHODS = {
    "divprune": DivPruneConfig(tokens=5),
    "vispruner": VisPrunerConfig(tokens=5, important_ratio=0.6),
    "cdpruner": CDPrunerConfig(tokens=5),
}
INSTRUCTIONS = ["What colour is the cat?", "Is there a shape in the middle of it, and why?"]  # one per PROMPTS row


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_checkpoints(tmp_path_factory.mktemp("hf_selection"))


def _load(checkpoints: dict[str, Path], family: str, cfg, path: Path | None = None):
    """The family's selection model and processor for ``cfg`` (CDPruner: with the tiny CLIP's text tower)."""
    _, model_cls, processor_cls = FAMILIES[family]
    path = path or checkpoints[family]
    extra = {"clip_text": str(checkpoints["clip"])} if cfg is not None and cfg.name == "cdpruner" else {}
    model = model_cls.from_pretrained(path, method=cfg, **extra).eval()
    return model, processor_cls.from_pretrained(path, method=model.method_config)


def _instructions(cfg, rows: int = len(PROMPTS)) -> list[str] | None:
    return INSTRUCTIONS[:rows] if cfg.name == "cdpruner" else None


# --- the reference ------------------------------------------------------------------------------------------------


def _text_features(clip: CLIPModel, tokenizer, text: str) -> torch.Tensor:
    """(D,) CLIP's projected text feature of one short instruction: [BOS] tokens [EOS]."""
    ids = [clip.config.text_config.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    ids.append(clip.config.text_config.eos_token_id)
    return clip.get_text_features(input_ids=torch.tensor([ids])).pooler_output[0]


def _reference_views(eager, clip, pixels: torch.Tensor, cfg, instructions: list[str] | None):
    """(V, T, C_llm) kept projected patches and (V, T) kept positions of (V, 3, S, S) views, by hand."""
    tower = eager.model.vision_tower
    out = tower(pixels, output_attentions=True, output_hidden_states=True)
    features = out.hidden_states[-2][:, 1:]  # (V, N, C): the layer LLaVA-1.5 reads, [CLS] dropped
    projected = eager.model.multi_modal_projector(features)  # (V, N, C_llm)
    if cfg.name == "divprune":
        keep = divprune_select(projected, cfg.tokens)
    elif cfg.name == "vispruner":
        attention = out.attentions[LAYERS - 2][:, :, 0, 1:].mean(dim=1)  # (V, N): [CLS] row, head mean
        keep = vispruner_select(features, attention, cfg.tokens, cfg.important)
    else:
        tokenizer = AutoTokenizer.from_pretrained(clip.name_or_path)
        image = clip.visual_projection(tower.post_layernorm(features))  # (V, N, D)
        text = torch.stack([_text_features(clip, tokenizer, t) for t in instructions])[:, None]  # (V, 1, D)
        keep = cdpruner_select(projected, cdpruner_relevance(image, text), cfg.tokens)
    kept = torch.stack([projected[v, keep[v]] for v in range(pixels.shape[0])])
    return kept, keep


def _views(size: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of the crop grid for a (height, width) image."""
    best_h, best_w = select_best_resolution(tuple(size), PINPOINTS)
    return best_h // VIEW, best_w // VIEW


def _loop_layout(tokens: torch.Tensor, keep: torch.Tensor, cols: int) -> torch.Tensor:
    """The base view's tokens, then every crop's by (row, column) of the stitched patch grid."""
    placed = []
    for view in range(1, tokens.shape[0]):
        crop_row, crop_col = divmod(view - 1, cols)
        for j in range(tokens.shape[1]):
            row, col = divmod(int(keep[view, j]), SIDE)
            placed.append(((crop_row * SIDE + row, crop_col * SIDE + col), tokens[view, j]))
    return torch.cat([tokens[0], torch.stack([t for _, t in sorted(placed, key=lambda e: e[0])])])


def _reference_features(family: str, eager, clip, inputs, cfg, instructions: list[str] | None) -> list[torch.Tensor]:
    """One (n_i, C_llm) tensor per image; images here are one per row, so image i has row i's instruction."""
    if family == "llava":
        kept, _ = _reference_views(eager, clip, inputs["pixel_values"], cfg, instructions)
        return list(kept)
    features = []
    for i, (pixels, size) in enumerate(zip(inputs["pixel_values"], inputs["image_sizes"].tolist(), strict=True)):
        rows, cols = _views(size)
        views = 1 + rows * cols
        texts = None if instructions is None else [instructions[i]] * views
        kept, keep = _reference_views(eager, clip, pixels[:views], cfg, texts)  # padding views dropped
        features.append(_loop_layout(kept, keep, cols))
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


def _pixels(inputs) -> dict:
    return {k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes")}


# --- tests --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_features_and_logits_equal_the_restatement(checkpoints: dict[str, Path], family: str, method: str) -> None:
    cfg = METHODS[method]
    model, proc = _load(checkpoints, family, cfg)
    plain_cls = FAMILIES[family][0]
    eager = plain_cls.from_pretrained(checkpoints[family], attn_implementation="eager").eval()
    plain = plain_cls.from_pretrained(checkpoints[family]).eval()
    clip = CLIPModel.from_pretrained(checkpoints["clip"]).eval()
    inputs = proc(text=PROMPTS, images=sample_images(SIZES[:2]), padding=True, return_tensors="pt")
    instructions = _instructions(cfg)
    with torch.no_grad():
        expected = _reference_features(family, eager, clip, inputs, cfg, instructions)
        got = model.get_image_features(**_pixels(inputs), image_instructions=instructions).pooler_output
        logits = model(**inputs, instructions=instructions).logits
    views = [1 + r * c for r, c in map(_views, SIZES[:2])] if family == "next" else [1, 1]
    assert [f.shape[0] for f in got] == [cfg.tokens * v for v in views]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, _spliced_logits(plain, inputs, expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_keep_all_is_the_parent_class_exactly(checkpoints: dict[str, Path], method: str) -> None:
    """LLaVA-1.5: all 16 patches kept is the parent's logits, bit for bit. NeXT: the base view's patches, then the
    crops' stitched patch grid (no unpadding, no image_newline), built by a reshape."""
    cfg = type(METHODS[method])(tokens=PATCHES)
    plain_cls, _, _ = FAMILIES["llava"]
    plain = plain_cls.from_pretrained(checkpoints["llava"]).eval()
    model, proc = _load(checkpoints, "llava", cfg)
    inputs = proc(text=PROMPTS, images=sample_images(SIZES[:2]), padding=True, return_tensors="pt")
    parent_inputs = LlavaProcessor.from_pretrained(checkpoints["llava"])(
        text=PROMPTS, images=sample_images(SIZES[:2]), padding=True, return_tensors="pt"
    )
    assert torch.equal(inputs["input_ids"], parent_inputs["input_ids"])  # 16 placeholders, the parent's count
    with torch.no_grad():
        assert torch.equal(model(**inputs, instructions=_instructions(cfg)).logits, plain(**inputs).logits)
    model, proc = _load(checkpoints, "next", cfg)
    inputs = proc(text=PROMPTS, images=sample_images(SIZES[:2]), padding=True, return_tensors="pt")
    with torch.no_grad():
        got = model.get_image_features(**_pixels(inputs), image_instructions=_instructions(cfg)).pooler_output
        for image, pixels, size in zip(got, inputs["pixel_values"], SIZES[:2], strict=True):
            rows, cols = _views(size)
            hidden = model.model.vision_tower(pixels[: 1 + rows * cols], output_hidden_states=True).hidden_states
            projected = model.model.multi_modal_projector(hidden[-2][:, 1:])  # (V, 16, C)
            crops = projected[1:].reshape(rows, cols, SIDE, SIDE, -1).permute(0, 2, 1, 3, 4)
            crops = crops.reshape(-1, projected.shape[-1])  # the stitched (rows * 4) x (cols * 4) grid, raster
            torch.testing.assert_close(image, torch.cat([projected[0], crops]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_batched_left_padded_generate_equals_one_by_one(checkpoints: dict[str, Path], family: str, method: str) -> None:
    """Images of different view counts, prompts of different lengths, and (CDPruner) a different instruction per row:
    each row generates what it generates alone; the processor's counts are the model's."""
    cfg = METHODS[method]
    model, proc = _load(checkpoints, family, cfg)
    images = sample_images([SIZES[0], SIZES[2]])  # NeXT: 4 and 5 views, padded to 5 in the batch
    options = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    batch = proc(text=PROMPTS, images=images, padding=True, return_tensors="pt")
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][1].all()  # the shorter prompt is padded
    views = [1 + r * c for r, c in map(_views, [SIZES[0], SIZES[2]])] if family == "next" else [1, 1]
    assert (batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist() == [cfg.tokens * v for v in views]
    batched = model.generate(**batch, **options, instructions=_instructions(cfg))[:, batch["input_ids"].shape[1] :]
    for row, (prompt, image) in enumerate(zip(PROMPTS, images, strict=True)):
        alone = proc(text=[prompt], images=[image], return_tensors="pt")
        texts = None if cfg.name != "cdpruner" else [INSTRUCTIONS[row]]
        single = model.generate(**alone, **options, instructions=texts)[:, alone["input_ids"].shape[1] :]
        assert batched[row].tolist() == single[0].tolist()


def test_cdpruner_reads_each_rows_instruction(checkpoints: dict[str, Path]) -> None:
    """Swapping the two rows' instructions changes the kept tokens of both images (one text for all would not)."""
    model, proc = _load(checkpoints, "llava", METHODS["cdpruner"])
    inputs = proc(text=PROMPTS, images=sample_images(SIZES[:2]), padding=True, return_tensors="pt")
    with torch.no_grad():
        right = model.get_image_features(**_pixels(inputs), image_instructions=INSTRUCTIONS).pooler_output
        swapped = model.get_image_features(**_pixels(inputs), image_instructions=INSTRUCTIONS[::-1]).pooler_output
        logits = model(**inputs, instructions=INSTRUCTIONS).logits
        plain = FAMILIES["llava"][0].from_pretrained(checkpoints["llava"]).eval()
    assert all(not torch.equal(a, b) for a, b in zip(right, swapped, strict=True))
    torch.testing.assert_close(logits, _spliced_logits(plain, inputs, list(right)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_keep_the_method(checkpoints: dict[str, Path], family: str, tmp_path: Path) -> None:
    cfg = METHODS["cdpruner"]
    model, proc = _load(checkpoints, family, cfg)
    assert not any(p is q for p in model.parameters() for q in model.model.clip_text.text.parameters())
    inputs = proc(text=PROMPTS, images=sample_images(SIZES[:2]), padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs, instructions=INSTRUCTIONS).logits
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["token_selection"] == cfg.to_dict()
    assert json.loads((tmp_path / "processor_config.json").read_text())["token_selection"] == cfg.to_dict()
    assert "token_selection" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as saved:
        assert not any("text_model" in key or "projection" in key for key in saved.keys())  # noqa: SIM118
    reloaded = type(model).from_pretrained(tmp_path, clip_text=str(checkpoints["clip"])).eval()
    reloaded_proc = type(proc).from_pretrained(tmp_path)
    assert reloaded.selection_config == cfg and reloaded_proc.method_config == cfg
    again = reloaded_proc(text=PROMPTS, images=sample_images(SIZES[:2]), padding=True, return_tensors="pt")
    assert torch.equal(again["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        assert torch.equal(reloaded(**again, instructions=INSTRUCTIONS).logits, expected)
    off = type(model).from_pretrained(tmp_path, method=None)
    assert off.method_config is None and type(proc).from_pretrained(tmp_path, method=None).method_config is None
    swapped = type(model).from_pretrained(tmp_path, method={"method": "divprune", "tokens": 4})
    assert swapped.method_config == DivPruneConfig(tokens=4) and swapped.config.visionzip is None
    _, info = FAMILIES[family][0].from_pretrained(tmp_path, output_loading_info=True)  # the llava-hf key layout
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))


def test_bad_configurations_are_refused(checkpoints: dict[str, Path]) -> None:
    model, _ = _load(checkpoints, "llava", None)
    with pytest.raises(ValueError, match="divprune keeps 17 tokens, but an image here has 16"):
        model.set_selection(DivPruneConfig(tokens=17))
    model.set_visionzip(VisionZipConfig(6, 3))
    with pytest.raises(ValueError, match=r"VisPruner, 5 tokens .* and VisionZip .* both asked for"):
        model.set_selection(METHODS["vispruner"])
    model.set_method(METHODS["divprune"])
    assert model.visionzip_config is None and model.selection_config == METHODS["divprune"]
    model.set_method({"method": "visionzip", "dominant": 6, "contextual": 3})  # the dicts lmms-eval args build
    assert model.method_config == VisionZipConfig(6, 3) and model.config.token_selection is None
    model.set_method({"method": "divprune", "tokens": 5})
    with pytest.raises(ValueError, match=r"VisionZip and DivPrune, 5 tokens .* both asked for"):
        model.set_visionzip(VisionZipConfig(6, 3))
    with pytest.raises(ValueError, match="give one of method= and visionzip="):
        type(model).from_pretrained(checkpoints["llava"], method=None, visionzip=None)
    with pytest.raises(ValueError, match="pass clip_text= naming the full CLIP checkpoint"):
        type(model).from_pretrained(checkpoints["llava"], method=METHODS["cdpruner"])
    model.set_method(METHODS["cdpruner"])  # a checkpoint saving CDPruner loads without clip_text; its images do not
    with pytest.raises(ValueError, match="CDPruner needs CLIP's text tower"):
        model.get_image_features(torch.zeros(1, 3, VIEW, VIEW), image_instructions=["a"])
    with pytest.raises(ValueError, match="not a full CLIP"):
        model.set_clip_text(str(checkpoints["llava"]))
    with pytest.raises(ValueError, match="vision_feature_layer=-1 differs from the config's -2"):
        model.get_image_features(torch.zeros(1, 3, VIEW, VIEW), vision_feature_layer=-1)
    cdpruner, proc = _load(checkpoints, "llava", METHODS["cdpruner"])
    inputs = proc(text=PROMPTS, images=sample_images(SIZES[:2]), padding=True, return_tensors="pt")
    with pytest.raises(ValueError, match="CDPruner needs each row's instruction: pass instructions="):
        cdpruner.generate(**inputs, max_new_tokens=1)
    with pytest.raises(ValueError, match="one per row: 1 given for 2 rows"):
        cdpruner(**inputs, instructions=INSTRUCTIONS[:1])


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_names_every_argument_of_the_parent(family: str) -> None:
    """generate checks its keyword arguments against ``forward``'s signature and encodes images ahead only when it
    names ``mm_encoder_outputs``: our ``forward`` must name all the parent's (an upgrade that adds one fails here)."""
    plain_cls, model_cls, _ = FAMILIES[family]
    parent = set(inspect.signature(plain_cls.forward).parameters) - {"self", "kwargs"}
    ours = set(inspect.signature(model_cls.forward).parameters)
    assert parent - ours <= {"use_cache"}  # NeXT names use_cache; ours passes it on in **kwargs
    assert "mm_encoder_outputs" in ours and "instructions" in ours


def test_tower_without_cls_selects_among_all_its_tokens(tmp_path: Path) -> None:
    """SigLIP (no [CLS]): VisPruner, which reads the [CLS] row, is refused; DivPrune keeping all 16 tokens is the
    parent ("full" strategy) bit for bit, and keeping 5 is the hand-made selection over all of them."""
    path = write_siglip_llava(tmp_path / "siglip")
    plain_cls, model_cls, proc_cls = FAMILIES["llava"]
    with pytest.raises(ValueError, match=r"VisPruner reads the \[CLS\] row's attention; SiglipVisionModel has no"):
        model_cls.from_pretrained(path, method=METHODS["vispruner"])
    plain = plain_cls.from_pretrained(path).eval()
    images = sample_images(SIZES[:2])
    parent_inputs = LlavaProcessor.from_pretrained(path)(text=PROMPTS, images=images, padding=True, return_tensors="pt")
    for tokens in (PATCHES, 5):
        model = model_cls.from_pretrained(path, method=DivPruneConfig(tokens=tokens)).eval()
        inputs = proc_cls.from_pretrained(path, method=model.method_config)(
            text=PROMPTS, images=images, padding=True, return_tensors="pt"
        )
        with torch.no_grad():
            logits = model(**inputs).logits
            if tokens == PATCHES:
                assert torch.equal(inputs["input_ids"], parent_inputs["input_ids"])
                assert torch.equal(logits, plain(**inputs).logits)
                continue
            hidden = plain.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2]
            projected = plain.model.multi_modal_projector(hidden)  # (B, 16, C): every token is a patch
            keep = divprune_select(projected, tokens)
            expected = [projected[b, keep[b]] for b in range(projected.shape[0])]
        torch.testing.assert_close(logits, _spliced_logits(plain, inputs, expected), rtol=1e-5, atol=1e-5)
