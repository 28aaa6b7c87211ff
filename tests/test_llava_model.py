"""Our LLaVA: released formats load; VisionZip's tokens reach the LLM exactly; NeXT layout; batches; isolation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import process_images
from llava.model.builder import checkpoint_kind, load_pretrained_model, read_config
from llava.tiny import write_projector_only, write_tiny_llava
from visionzip import VisionZipConfig, encode

SAMPLE = Path(__file__).resolve().parents[1] / "llava/serve/examples/chelsea.jpg"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    v15 = write_tiny_llava(root / "v15", next=False)
    return {
        "v15": v15,
        "v15_bin": write_tiny_llava(root / "v15bin", next=False, fmt="bin"),
        "v16": write_tiny_llava(root / "v16", next=True),
        "proj": write_projector_only(root / "proj", v15, seed=7),
    }


def _load(path: Path, **kwargs):
    return load_pretrained_model(str(path), device="cpu", **kwargs)


def _ids(tokenizer, images: int = 1, text: str = "What is in the image?") -> torch.Tensor:
    ids = tokenizer(text).input_ids
    placeholders = [IMAGE_TOKEN_INDEX] * images
    return torch.tensor([ids[:1] + placeholders + ids[1:]])


def _pixels(image_processor, model, image: Image.Image | None = None) -> torch.Tensor:
    return process_images([image or Image.open(SAMPLE).convert("RGB")], image_processor, model.config)


def test_formats_load_and_agree(ckpts: dict[str, Path]) -> None:
    assert [checkpoint_kind(ckpts[k]) for k in ("v15", "v15_bin", "proj")] == ["full", "full", "projector"]
    tok, model, proc, context = _load(ckpts["v15"])
    _, model_bin, _, _ = _load(ckpts["v15_bin"])
    ids, pixels = _ids(tok), _pixels(proc, model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, images=pixels).logits, model_bin(ids, images=pixels).logits)
    assert context == model.config.max_position_embeddings
    assert not any(p.requires_grad for p in model.get_vision_tower().parameters())


def test_released_model_type_llava_reads_into_our_config(ckpts: dict[str, Path]) -> None:
    raw = json.loads((ckpts["v15"] / "config.json").read_text())
    assert raw["model_type"] == "llava"
    config = read_config(ckpts["v15"])
    assert type(config).__name__ == "LlavaConfig" and config.mm_projector_type == raw["mm_projector_type"]
    assert config.mm_vision_select_layer == raw["mm_vision_select_layer"] and config.visionzip is None


def test_projector_only_checkpoint(ckpts: dict[str, Path]) -> None:
    _, model, _, _ = _load(ckpts["proj"], model_base=str(ckpts["v15"]))
    state = torch.load(ckpts["proj"] / "mm_projector.bin", weights_only=True)
    assert torch.equal(model.get_model().mm_projector[0].weight, state["model.mm_projector.0.weight"])
    with pytest.raises(ValueError, match="pass model_base"):
        _load(ckpts["proj"])


def test_v16_tuned_tower_comes_from_the_checkpoint(ckpts: dict[str, Path]) -> None:
    _, model, _, _ = _load(ckpts["v16"])
    clip = load_file(str(ckpts["v16"].parent / "clip" / "model.safetensors"))
    tuned = load_file(str(ckpts["v16"] / "model.safetensors"))
    ours = model.get_vision_tower().vision_tower.embeddings.class_embedding
    assert torch.equal(ours, tuned["model.vision_tower.vision_tower.vision_model.embeddings.class_embedding"])
    assert not torch.equal(ours, clip["vision_model.embeddings.class_embedding"])


def test_missing_weight_is_named(ckpts: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ckpts["v15"].iterdir():
        if f.is_file() and f.name != "model.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    state = load_file(str(ckpts["v15"] / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing: \[model\.layers\.1\.mlp\.up_proj\.weight\]"):
        _load(broken)


def test_visionzip_logits_equal_hand_fed_encode_features(ckpts: dict[str, Path]) -> None:
    cfg = VisionZipConfig(dominant=10, contextual=3)
    tok, model, proc, _ = _load(ckpts["v15"], visionzip=cfg)
    ids, pixels = _ids(tok), _pixels(proc, model)
    with torch.no_grad():
        logits = model(ids, images=pixels).logits
        tokens = encode(model.get_vision_tower().vision_tower, pixels, cfg).tokens  # independent path
        visual = model.get_model().mm_projector(tokens)[0]
        embed = model.get_input_embeddings()
        by_hand = torch.cat([embed(ids[0, :1]), visual, embed(ids[0, 2:])])[None]
        expected = model(inputs_embeds=by_hand).logits
    assert logits.shape[1] == cfg.tokens + ids.shape[1] - 1  # budget + text tokens
    torch.testing.assert_close(logits, expected)


def test_visionzip_off_on_and_saved(ckpts: dict[str, Path], tmp_path: Path) -> None:
    tok, model, proc, _ = _load(ckpts["v15"])
    ids, pixels = _ids(tok), _pixels(proc, model)
    side = model.get_vision_tower().num_patches_per_side
    with torch.no_grad():
        assert model(ids, images=pixels).logits.shape[1] == side**2 + ids.shape[1] - 1
        model.set_visionzip(VisionZipConfig(6, 2))
        assert model(ids, images=pixels).logits.shape[1] == 8 + ids.shape[1] - 1
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["visionzip"]["dominant"] == 6
    model.set_visionzip(None)
    assert model.config.visionzip is None


def test_budget_errors(ckpts: dict[str, Path]) -> None:
    _, model, _, _ = _load(ckpts["v15"])
    n = model.get_vision_tower().num_tokens
    with pytest.raises(ValueError, match=f"larger than a crop's {n} tokens"):
        model.set_visionzip(VisionZipConfig(n, 1))
    with pytest.raises(ValueError, match="differs from mm_vision_select_layer"):
        model.set_visionzip(VisionZipConfig(5, 1, layer=-1))
    with pytest.raises(ValueError, match="budget must be one of"):
        model.set_visionzip(VisionZipConfig(5, 1), budget="crop")


def _expected_next_layout(tokens, keep, grid, side, dominant):
    """Loop restatement of the released layout: base, dominant patches by stitched raster, [CLS]s, contextual."""
    nw, _ = grid
    entries = []
    for crop in range(1, tokens.shape[0]):
        r, c = divmod(crop - 1, nw)
        for j in range(1, dominant):
            i, k = divmod(int(keep[crop, j]) - 1, side)
            entries.append(((r * side + i) * nw * side + c * side + k, tokens[crop, j]))
    dominant_rows = [row for _, row in sorted(entries, key=lambda e: e[0])]
    cls_rows = [tokens[crop, 0] for crop in range(1, tokens.shape[0])]
    ctx_rows = [tokens[crop, j] for crop in range(1, tokens.shape[0]) for j in range(dominant, tokens.shape[1])]
    return torch.cat([tokens[0], torch.stack(dominant_rows + cls_rows + ctx_rows)])


def test_next_per_crop_layout_and_total_budget(ckpts: dict[str, Path]) -> None:
    from llava.mm_utils import get_anyres_image_grid_shape

    cfg = VisionZipConfig(dominant=7, contextual=2)
    _, model, proc, _ = _load(ckpts["v16"], visionzip=cfg)
    image = Image.open(SAMPLE).convert("RGB").resize((120, 60))  # wide: more than one crop
    pixels = _pixels(proc, model, image)  # (1, V, 3, S, S)
    views = pixels.shape[1]
    assert views > 2
    with torch.no_grad():
        feats = model.image_features(pixels, [image.size])[0]
        out = encode(model.get_vision_tower().vision_tower, pixels[0], cfg)
        projected = model.get_model().mm_projector(out.tokens)
    tower = model.get_vision_tower()
    grid = get_anyres_image_grid_shape(image.size, model.config.image_grid_pinpoints, tower.config.image_size)
    expected = _expected_next_layout(projected, out.keep_indices, grid, tower.num_patches_per_side, cfg.dominant)
    assert feats.shape[0] == views * cfg.tokens
    torch.testing.assert_close(feats, expected)
    model.set_visionzip(VisionZipConfig.from_budget(40), budget="total")
    with torch.no_grad():
        total = model.image_features(pixels, [image.size])[0]
    assert total.shape[0] == views * (40 // views)


def test_mixed_batch_matches_single_samples(ckpts: dict[str, Path]) -> None:
    tok, model, proc, _ = _load(ckpts["v15"], visionzip=VisionZipConfig(5, 2))
    img = _pixels(proc, model)
    other = _pixels(proc, model, Image.open(SAMPLE).convert("RGB").rotate(90))
    samples = [(_ids(tok, 2, "Compare these two."), torch.cat([img, other])), (_ids(tok, 0, "Just text."), None),
               (_ids(tok, 1), other)]  # fmt: skip
    width = max(ids.shape[1] for ids, _ in samples)
    batch_ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros_like(batch_ids)
    for i, (ids, _) in enumerate(samples):
        batch_ids[i, : ids.shape[1]], mask[i, : ids.shape[1]] = ids[0], 1
    images = torch.cat([im for _, im in samples if im is not None])
    with torch.no_grad():
        batch = model(batch_ids, attention_mask=mask, images=images).logits
        for i, (ids, im) in enumerate(samples):
            single = model(ids, images=im).logits[0]
            torch.testing.assert_close(batch[i, : single.shape[0]], single, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="2 image placeholders but 1 images"):
        model(samples[0][0], images=img)


def test_greedy_generation_equals_an_argmax_loop(ckpts: dict[str, Path]) -> None:
    tok, model, proc, _ = _load(ckpts["v15"], visionzip=VisionZipConfig(5, 2))
    ids, pixels = _ids(tok), _pixels(proc, model)
    with torch.no_grad():
        generated = model.generate(ids, images=pixels, max_new_tokens=6, do_sample=False)
        expected, sequence = [], ids
        for _ in range(6):  # independent of generate's cache: the whole sequence again, then the argmax
            token = model(sequence, images=pixels).logits[0, -1].argmax()
            expected.append(int(token))
            sequence = torch.cat([sequence, token.view(1, 1)], dim=1)
            if int(token) == tok.eos_token_id:
                break
    assert generated[0].tolist() == expected


def test_two_models_in_one_process_do_not_interfere(ckpts: dict[str, Path]) -> None:
    tok, zipped, proc, _ = _load(ckpts["v15"], visionzip=VisionZipConfig(5, 2))
    _, plain, _, _ = _load(ckpts["v15"])
    ids, pixels = _ids(tok), _pixels(proc, plain)

    def by_hand(model, visual: torch.Tensor) -> torch.Tensor:
        embed = model.get_input_embeddings()
        inputs = torch.cat([embed(ids[0, :1]), model.get_model().mm_projector(visual)[0], embed(ids[0, 2:])])
        return model(inputs_embeds=inputs[None]).logits

    with torch.no_grad():
        zipped_logits, plain_logits = zipped(ids, images=pixels).logits, plain(ids, images=pixels).logits
        zipped_again = zipped(ids, images=pixels).logits  # after the plain model ran in between
        # independent paths: transformers' own hidden states of the select layer, and encode() called directly
        clip = plain.get_vision_tower().vision_tower
        patches = clip(pixels, output_hidden_states=True).hidden_states[plain.config.mm_vision_select_layer][:, 1:]
        zipped_tokens = encode(zipped.get_vision_tower().vision_tower, pixels, VisionZipConfig(5, 2)).tokens
        expected_plain, expected_zipped = by_hand(plain, patches), by_hand(zipped, zipped_tokens)
    assert plain_logits.shape[1] > zipped_logits.shape[1]
    torch.testing.assert_close(plain_logits, expected_plain)
    torch.testing.assert_close(zipped_logits, expected_zipped)
    torch.testing.assert_close(zipped_again, expected_zipped)


def test_lora_checkpoint_merges(ckpts: dict[str, Path], tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    tok, model, proc, _ = _load(ckpts["v15"])
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, target_modules=r".*model\.layers\.\d+\.self_attn\.[qv]_proj")
    )
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # a non-zero update, so merging matters
    out = tmp_path / "lora"
    lora.save_pretrained(out)
    projector = {f"base_model.model.{k}": v * 2 for k, v in model.state_dict().items() if "mm_projector" in k}
    torch.save(projector, out / "non_lora_trainables.bin")
    (out / "config.json").write_text((ckpts["v15"] / "config.json").read_text())
    with torch.no_grad():
        for k, v in projector.items():
            lora.get_parameter(k).copy_(v)
        ids, pixels = _ids(tok), _pixels(proc, model)
        expected = lora(input_ids=ids, images=pixels).logits
    assert checkpoint_kind(out) == "lora"
    _, merged, _, _ = _load(out, model_base=str(ckpts["v15"]))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids, images=pixels).logits, expected, rtol=1e-4, atol=1e-4)
