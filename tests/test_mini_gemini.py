"""Mini-Gemini (MGM) in our LLaVA: the released layout loads by model_type, equals a plain restatement, and takes
VisionZip on its CLIP tokens with the budget reaching the LLM."""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.hub_cache import cache_repo, offline_hub
from helpers.mini_gemini import CONVNEXT_DIR, TinyMGM, write_tiny_mgm
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionModel

from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import process_images
from llava.model.builder import load_pretrained_model, read_config
from llava.model.mini_gemini import MiniGeminiConfig
from visionzip import VisionZipConfig, capture, select

SAMPLE = Path(__file__).resolve().parents[1] / "llava/serve/examples/chelsea.jpg"
LN_EPS, CONVNEXT_LN_EPS = 1e-5, 1e-6  # nn.LayerNorm's default (mining projectors); timm's ConvNeXt


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mgm")
    return {"plain": write_tiny_mgm(root / "plain"), "tuned": write_tiny_mgm(root / "tuned", aux_in_weights=True)}


def _load(path: Path, **kwargs):
    return load_pretrained_model(str(path), device="cpu", **kwargs)


def _pixels(processor, model, images: list[Image.Image] | None = None) -> torch.Tensor:
    return process_images(images or [Image.open(SAMPLE).convert("RGB")], processor, model.config)


def _ids(tokenizer, text: str = "What is in the image?") -> torch.Tensor:
    ids = tokenizer(text).input_ids
    return torch.tensor([[*ids[:1], IMAGE_TOKEN_INDEX, *ids[1:]]])


# --- a plain restatement: ConvNeXt, CLIP, mining and projector from the files, one patch at a time ----------------
def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Over the last axis."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _channel_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) normalised over C."""
    return _layer_norm(x.permute(0, 2, 3, 1), w, b, CONVNEXT_LN_EPS).permute(0, 3, 1, 2)


def _convnext_plain(trunk: dict[str, torch.Tensor], pixels: torch.Tensor, depths: tuple[int, ...]) -> torch.Tensor:
    x = F.conv2d(pixels, trunk["stem.0.weight"], trunk["stem.0.bias"], stride=4)
    x = _channel_norm(x, trunk["stem.1.weight"], trunk["stem.1.bias"])
    maps = []
    for s, depth in enumerate(depths):
        p = f"stages.{s}."
        if s > 0:
            x = _channel_norm(x, trunk[p + "downsample.0.weight"], trunk[p + "downsample.0.bias"])
            x = F.conv2d(x, trunk[p + "downsample.1.weight"], trunk[p + "downsample.1.bias"], stride=2)
        for b in range(depth):
            q = f"{p}blocks.{b}."
            y = F.conv2d(x, trunk[q + "conv_dw.weight"], trunk[q + "conv_dw.bias"], padding=3, groups=x.shape[1])
            y = _layer_norm(y.permute(0, 2, 3, 1), trunk[q + "norm.weight"], trunk[q + "norm.bias"], CONVNEXT_LN_EPS)
            y = F.gelu(y @ trunk[q + "mlp.fc1.weight"].T + trunk[q + "mlp.fc1.bias"])
            y = y @ trunk[q + "mlp.fc2.weight"].T + trunk[q + "mlp.fc2.bias"]
            x = x + (y * trunk[q + "gamma"]).permute(0, 3, 1, 2)
        maps.append(x)
    size = maps[0].shape[-2:]
    rest = [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]]
    return torch.cat([maps[0], *rest], dim=1)


def _proj(w: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    p = f"model.vlm_uni_{name}_projector."
    return _layer_norm(x, w[p + "0.weight"], w[p + "0.bias"], LN_EPS) @ w[p + "1.weight"].T + w[p + "1.bias"]


def _mine_plain(w: dict[str, torch.Tensor], tokens: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """(N, C) tokens, (C_aux, H, W) map: token (row, col) attends to the map's pixels under its patch."""
    side = math.isqrt(tokens.shape[0])
    cell = aux.shape[-1] // side
    out = []
    for row in range(side):
        for col in range(side):
            token = tokens[row * side + col]
            pixels = aux[:, row * cell : (row + 1) * cell, col * cell : (col + 1) * cell].reshape(aux.shape[0], -1).T
            q, k, v = _proj(w, "query", token), _proj(w, "aux", pixels), _proj(w, "val", pixels)
            attention = torch.softmax(k @ q / math.sqrt(q.shape[0]), dim=0)  # (P,)
            out.append(token + attention @ v)
    return torch.stack(out)


def _reference_features(ckpt: Path, pixels: torch.Tensor) -> torch.Tensor:
    """(1, 3, S_aux, S_aux) -> (N, C_llm), from the files alone."""
    config = json.loads((ckpt / "config.json").read_text())
    weights = load_file(str(ckpt / "model.safetensors"))
    aux_dir = Path(config["mm_vision_tower_aux"])
    whole = torch.load(aux_dir / "open_clip_pytorch_model.bin", weights_only=True)
    trunk = {k.removeprefix("visual.trunk."): v for k, v in whole.items() if k.startswith("visual.trunk.")}
    depths = tuple(json.loads((aux_dir / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"]["depths"])
    aux = _convnext_plain(trunk, pixels, depths)[0]
    clip = CLIPVisionModel.from_pretrained(config["mm_vision_tower"])
    side = clip.config.image_size
    small = F.interpolate(pixels, size=(side, side), mode="bilinear", align_corners=False)
    with torch.no_grad():
        hidden = clip(small, output_hidden_states=True).hidden_states[config["mm_vision_select_layer"]][0, 1:]
    mined = _mine_plain(weights, hidden, aux)
    h = F.gelu(mined @ weights["model.mm_projector.0.weight"].T + weights["model.mm_projector.0.bias"])
    return h @ weights["model.mm_projector.2.weight"].T + weights["model.mm_projector.2.bias"]


# --- tests ----------------------------------------------------------------------------------------------------------
def test_dispatch_by_model_type_not_folder_name(ckpts: dict[str, Path], tmp_path: Path) -> None:
    renamed = tmp_path / "llava-v1.5-7b"  # a LLaVA-looking name: the files decide
    shutil.copytree(ckpts["plain"], renamed)
    config = read_config(renamed)
    assert type(config) is MiniGeminiConfig and config.image_size_aux == TinyMGM().image_size_aux
    _, model, processor, _ = _load(renamed)
    assert type(model).__name__ == "MiniGeminiLlamaForCausalLM"
    assert _pixels(processor, model).shape[-2:] == (TinyMGM().image_size_aux,) * 2
    assert not any(p.requires_grad for p in model.get_vision_tower_aux().parameters())


def test_loader_equals_plain_reimplementation(ckpts: dict[str, Path]) -> None:
    tok, model, processor, _ = _load(ckpts["plain"])
    pixels = _pixels(processor, model)
    with torch.no_grad():
        ours = model.image_features(pixels)[0]
        logits = model(_ids(tok), images=pixels).logits
    expected = _reference_features(ckpts["plain"], pixels)
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)
    side = model.get_vision_tower().num_patches_per_side
    assert logits.shape[1] == side * side + _ids(tok).shape[1] - 1  # vanilla: every patch, mined


def test_tuned_convnext_comes_from_the_checkpoint(ckpts: dict[str, Path]) -> None:
    _, model, _, _ = _load(ckpts["tuned"])
    tuned = load_file(str(ckpts["tuned"] / "model.safetensors"))
    key = "model.vision_tower_aux.vision_stages.1.blocks.0.conv_dw.weight"
    assert torch.equal(model.state_dict()[key], tuned[key])
    folder = torch.load(ckpts["tuned"].parent / CONVNEXT_DIR / "open_clip_pytorch_model.bin", weights_only=True)
    assert not torch.equal(tuned[key], folder["visual.trunk.stages.1.blocks.0.conv_dw.weight"])


@pytest.mark.parametrize(("dominant", "contextual"), [(10, 3), (6, 0), (1, 5)])
def test_the_llm_sees_the_budget(ckpts: dict[str, Path], dominant: int, contextual: int) -> None:
    tok, model, processor, _ = _load(ckpts["plain"], visionzip=VisionZipConfig(dominant, contextual))
    ids, pixels = _ids(tok), _pixels(processor, model)
    with torch.no_grad():
        assert model(ids, images=pixels).logits.shape[1] == dominant + contextual + ids.shape[1] - 1
        assert model.generate(ids, images=pixels, max_new_tokens=3, do_sample=False).shape == (1, 3)


def test_keep_all_visionzip_equals_vanilla(ckpts: dict[str, Path]) -> None:
    tok, model, processor, _ = _load(ckpts["plain"])
    ids, pixels = _ids(tok), _pixels(processor, model)
    patches = model.get_vision_tower().num_patches_per_side ** 2
    with torch.no_grad():
        vanilla = model.image_features(pixels)[0]  # (N, C_llm)
        model.set_visionzip(VisionZipConfig(dominant=patches + 1, contextual=0))  # every token, [CLS] too
        kept = model.image_features(pixels)[0]  # (1 + N, C_llm), in position order
        logits = model(ids, images=pixels).logits
        embed = model.get_input_embeddings()
        by_hand = torch.cat([embed(ids[0, :1]), kept[:1], vanilla, embed(ids[0, 2:])])[None]
        expected = model(inputs_embeds=by_hand).logits
    torch.testing.assert_close(kept[1:], vanilla)  # VisionZip always keeps [CLS] (unmined); the rest is vanilla
    torch.testing.assert_close(logits, expected)


def test_mining_runs_before_the_compression(ckpts: dict[str, Path]) -> None:
    """Dominant patches are vanilla's mined tokens at their positions; a contextual token is the merge of its
    group's mined tokens (VisionZip's "paper" merge: target + mean of the others), then projected."""
    cfg = VisionZipConfig(dominant=9, contextual=4)
    _, model, processor, _ = _load(ckpts["plain"])
    pixels = _pixels(processor, model)
    tower = model.get_vision_tower()
    with torch.no_grad():
        mined = model.mine(tower(tower.clip_pixels(pixels)), pixels)[0]  # (N, C) before the projector
        vanilla = model.get_model().mm_projector(mined)
        seen = capture(tower.vision_tower, tower.clip_pixels(pixels), cfg)
        choice = select(seen.scores, seen.keys, cfg)
        model.set_visionzip(cfg)
        zipped = model.image_features(pixels)[0]
    patches_kept = choice.keep[0, 1:] - 1  # [CLS] is position 0 and always kept
    torch.testing.assert_close(zipped[1 : cfg.dominant], vanilla[patches_kept])
    groups = choice.groups[0, 1:]  # per patch
    for t in range(cfg.contextual):
        members = (groups == t).nonzero().flatten()
        target = int(choice.targets[0, t]) - 1
        others = [int(m) for m in members if int(m) != target]
        merged = mined[target] + (mined[others].mean(0) if others else 0)
        expected = model.get_model().mm_projector(merged)
        torch.testing.assert_close(zipped[cfg.dominant + t], expected, atol=1e-5, rtol=1e-4)


def test_batch_equals_one_by_one(ckpts: dict[str, Path]) -> None:
    _, model, processor, _ = _load(ckpts["plain"], visionzip=VisionZipConfig(7, 2))
    images = [Image.open(SAMPLE).convert("RGB"), Image.new("RGB", (50, 80), (200, 30, 90))]
    with torch.no_grad():
        batched = model.image_features(_pixels(processor, model, images))
        single = [model.image_features(_pixels(processor, model, [image]))[0] for image in images]
    for b, s in zip(batched, single, strict=True):
        torch.testing.assert_close(b, s, atol=1e-5, rtol=1e-4)


def test_images_at_clip_size_are_refused(ckpts: dict[str, Path]) -> None:
    _, model, _, _ = _load(ckpts["plain"])
    side = model.get_vision_tower().config.image_size
    with pytest.raises(ValueError, match=f"image_size_aux = {TinyMGM().image_size_aux}"):
        model.image_features(torch.zeros(1, 3, side, side))


def _without(ckpt: Path, dest: Path, *keys: str) -> Path:
    shutil.copytree(ckpt, dest)
    state = load_file(str(dest / "model.safetensors"))
    for key in keys:
        del state[key]
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def test_missing_keys_are_refused_by_name(ckpts: dict[str, Path], tmp_path: Path) -> None:
    mining = _without(ckpts["plain"], tmp_path / "a", "model.vlm_uni_val_projector.1.weight")
    with pytest.raises(ValueError, match=r"missing: \[model\.vlm_uni_val_projector\.1\.weight\]"):
        _load(mining)
    part = "model.vision_tower_aux.vision_stages.2.blocks.0.gamma"
    tower = _without(ckpts["tuned"], tmp_path / "b", part)
    with pytest.raises(ValueError, match=rf"part of the vision tower model\.vision_tower_aux\.\*; missing: {part}"):
        _load(tower)


def test_convnext_folder_missing_a_tensor_is_named(ckpts: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(ckpts["plain"].parent, root)
    bin_path = root / CONVNEXT_DIR / "open_clip_pytorch_model.bin"
    state = torch.load(bin_path, weights_only=True)
    del state["visual.trunk.stages.3.downsample.1.bias"]
    torch.save(state, bin_path)
    config = json.loads((root / "mgm-tiny" / "config.json").read_text())
    config["mm_vision_tower_aux"] = str(root / CONVNEXT_DIR)
    (root / "mgm-tiny" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lacks ConvNeXt weights: \['vision_stages\.3\.downsample\.1\.bias'\]"):
        _load(root / "mgm-tiny")


class _NotATensor:
    """Anything ``torch.load(weights_only=True)`` refuses to unpickle."""


@pytest.mark.parametrize("safetensors_name", ["open_clip_model.safetensors", "open_clip_pytorch_model.safetensors"])
def test_convnext_folder_prefers_safetensors_and_loads_bin_weights_only(
    ckpts: dict[str, Path], tmp_path: Path, safetensors_name: str
) -> None:
    root = tmp_path / "root"
    shutil.copytree(ckpts["plain"].parent, root)
    folder = root / CONVNEXT_DIR
    state = torch.load(folder / "open_clip_pytorch_model.bin", weights_only=True)
    key = "visual.trunk.stem.0.bias"
    save_file({**state, key: state[key] + 1.0}, str(folder / safetensors_name))
    config = json.loads((root / "mgm-tiny" / "config.json").read_text())
    config["mm_vision_tower_aux"] = str(folder)
    (root / "mgm-tiny" / "config.json").write_text(json.dumps(config))
    _, model, _, _ = _load(root / "mgm-tiny")
    torch.testing.assert_close(model.get_vision_tower_aux().vision_stem[0].bias, state[key] + 1.0)
    (folder / safetensors_name).unlink()
    torch.save({**state, "extra": _NotATensor()}, folder / "open_clip_pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError, match=r"weights_only"):
        _load(root / "mgm-tiny")


def test_hd_variants_are_refused(ckpts: dict[str, Path], tmp_path: Path) -> None:
    hd = tmp_path / "hd"
    shutil.copytree(ckpts["plain"], hd)
    config = json.loads((hd / "config.json").read_text())
    (hd / "config.json").write_text(json.dumps({**config, "image_grid": 2, "image_global": True}))
    with pytest.raises(ValueError, match="image_grid=2, image_global=True"):
        _load(hd)


def test_released_model_zoo_tower_names_read_from_the_hub_cache(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """MGM-7B's config.json names its towers model_zoo/OpenAI/<name> (the training machine's folders); where no such
    folder exists, the same towers come from the hub (here an offline cache holding the tiny ones)."""
    src = ckpts["plain"]
    config = json.loads((src / "config.json").read_text())
    hf_home = tmp_path / "hf_home"
    cache_repo(hf_home, "openai/clip-vit-large-patch14-336", Path(config["mm_vision_tower"]))
    aux_id = "laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup"
    cache_repo(hf_home, aux_id, Path(config["mm_vision_tower_aux"]))
    released = tmp_path / "MGM-7B"
    shutil.copytree(src, released)
    config["mm_vision_tower"] = "model_zoo/OpenAI/clip-vit-large-patch14-336"
    config["mm_vision_tower_aux"] = "model_zoo/OpenAI/openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup"
    (released / "config.json").write_text(json.dumps(config))
    _, reference, processor, _ = _load(src)
    pixels = _pixels(processor, reference)
    with offline_hub(hf_home):
        _, model, _, _ = _load(released)
    with torch.no_grad():
        torch.testing.assert_close(model.image_features(pixels)[0], reference.image_features(pixels)[0])
    assert model.config.mm_vision_tower_aux.startswith("model_zoo/")  # saved back as released
