"""DivPrune, VisPruner and CDPruner in our LLaVA-1.5 and NeXT: the tokens against a by-hand restatement (eager
tower, plain selection functions, loop layout), keep-all as the identity, batch = one by one, reload, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.hub_cache import CLIP_ID, V15_ID, build_tiny_hub, offline_hub
from PIL import Image
from transformers import CLIPVisionModel

from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import get_anyres_image_grid_shape, process_images, tokenizer_image_token
from llava.model.anyres import image_grid, spatial_layout
from llava.model.builder import load_pretrained_model
from llava.model.selection import image_instructions
from llava.tiny import write_tiny_llava
from visionzip import VisionZipConfig
from visionzip.baselines import FastVConfig
from visionzip.baselines.cdpruner import CDPrunerConfig, cdpruner_relevance, cdpruner_select
from visionzip.baselines.divprune import DivPruneConfig, divprune_select
from visionzip.baselines.vispruner import VisPrunerConfig, vispruner_select

SAMPLE = Path(__file__).resolve().parents[1] / "llava/serve/examples/chelsea.jpg"
QUESTIONS = ("What colour is the cat's left ear?", "Is there a remote control on the sofa?")
METHODS = {
    "divprune": lambda t: DivPruneConfig(tokens=t),
    "vispruner": lambda t: VisPrunerConfig(tokens=t, important_ratio=0.5),
    "cdpruner": lambda t: CDPrunerConfig(tokens=t),
}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """(tokenizer, model, image processor, checkpoint folder) of a tiny LLaVA-1.5 and NeXT sharing one CLIP."""
    root = tmp_path_factory.mktemp("selection")
    out = {}
    for name, next_ in (("v15", False), ("v16", True)):
        path = write_tiny_llava(root, next=next_)
        tok, model, proc, _ = load_pretrained_model(str(path), device="cpu")
        out[name] = (tok, model, proc, path)
    return out


@pytest.fixture(autouse=True)
def _selection_off(loaded: dict[str, tuple]):
    yield
    for _, model, _, _ in loaded.values():
        model.set_selection(None)
        model.set_pruning(None)
        model.set_visionzip(None)


def _image(size: tuple[int, int], shift: int = 0) -> Image.Image:
    with Image.open(SAMPLE) as photo:
        return photo.convert("RGB").rotate(shift).resize(size)


def _eager_tower(model) -> CLIPVisionModel:
    """A second copy of the model's tower with eager attention (its attention maps are returned)."""
    tower = model.get_vision_tower().vision_tower
    config = tower.config.__class__.from_dict(tower.config.to_dict())
    config._attn_implementation = "eager"
    eager = CLIPVisionModel(config).eval()
    eager.load_state_dict(tower.state_dict())
    return eager


def _reference_relevance(model, patches: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """CDPruner's relevance by hand from transformers' CLIPModel of the tower's checkpoint: each text as one CLIP text
    (BOS, its ids, EOS), its projected embedding against visual_projection(post_layernorm(patches))."""
    from transformers import AutoTokenizer, CLIPModel

    clip_dir = model.config.mm_vision_tower
    clip, tokenizer = CLIPModel.from_pretrained(clip_dir).eval(), AutoTokenizer.from_pretrained(clip_dir)
    text_config = clip.config.text_config
    image_embeds = clip.visual_projection(model.get_vision_tower().vision_tower.post_layernorm(patches))  # (V, N, D)
    rows = []
    for text in texts:
        ids = [
            text_config.bos_token_id,
            *tokenizer(text, add_special_tokens=False)["input_ids"],
            text_config.eos_token_id,
        ]
        rows.append(clip.get_text_features(input_ids=torch.tensor([ids])).pooler_output)  # (1, D)
    return cdpruner_relevance(image_embeds, torch.cat(rows)[:, None])  # one segment per text


def reference_tokens(
    model, pixels: torch.Tensor, cfg, texts: list[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each view's kept projected tokens (V, T, C) and kept patch positions (V, T), by hand: the eager tower's hidden
    states and attention maps at the layer LLaVA reads, the projector, the plain selection function, a gather."""
    tower = model.get_vision_tower()
    out = _eager_tower(model)(pixels, output_hidden_states=True, output_attentions=True)
    layer = tower.select_layer
    patches = out.hidden_states[layer][:, 1:]  # (V, N, C_vis)
    attention = out.attentions[layer][:, :, 0, 1:].mean(dim=1)  # (V, N): the [CLS] row, head mean
    projected = model.get_model().mm_projector(patches)  # (V, N, C)
    if isinstance(cfg, DivPruneConfig):
        keep = divprune_select(projected, cfg.tokens)
    elif isinstance(cfg, VisPrunerConfig):
        keep = vispruner_select(patches, attention, cfg.tokens, cfg.important)
    else:
        keep = cdpruner_select(projected, _reference_relevance(model, patches, texts), cfg.tokens)
    kept = torch.stack([projected[v, keep[v]] for v in range(projected.shape[0])])
    return kept, keep


def loop_layout(kept: torch.Tensor, keep: torch.Tensor, grid: tuple[int, int], side: int) -> torch.Tensor:
    """The base view's tokens, then every crop's kept patches by (row, column) of the stitched grid, one by one.
    ``grid``: (across, down) as LLaVA's ``get_anyres_image_grid_shape`` gives it."""
    across, _ = grid
    placed = []
    for view in range(1, kept.shape[0]):
        crop_row, crop_col = divmod(view - 1, across)
        for j in range(keep.shape[1]):
            row, col = divmod(int(keep[view, j]), side)
            placed.append((crop_row * side + row, crop_col * side + col, kept[view, j]))
    return torch.cat([kept[0], torch.stack([t for _, _, t in sorted(placed, key=lambda e: (e[0], e[1]))])])


def _pixels(model, proc, image: Image.Image) -> torch.Tensor:
    """One image's views (V, 3, S, S) (V = 1 on LLaVA-1.5)."""
    pixels = process_images([image], proc, model.config)[0]
    return pixels[None] if pixels.dim() == 3 else pixels


@pytest.mark.parametrize("family", ["v15", "v16"])
@pytest.mark.parametrize("method", list(METHODS))
def test_tokens_equal_by_hand_restatement(loaded: dict, family: str, method: str) -> None:
    _, model, proc, _ = loaded[family]
    image = _image((120, 60))
    pixels = _pixels(model, proc, image)
    cfg = METHODS[method](5)
    model.set_selection(cfg)
    texts = [QUESTIONS[0]] * pixels.shape[0]
    with torch.no_grad():
        got = model.image_tokens(pixels[None], [image.size], instructions=[QUESTIONS[0]])[0]
        kept, keep = reference_tokens(model, pixels, cfg, texts)
    assert got.positions is None  # packed
    if family == "v15":
        expected = kept[0]
    else:
        tower = model.get_vision_tower()
        grid = get_anyres_image_grid_shape(image.size, model.config.image_grid_pinpoints, tower.config.image_size)
        expected = loop_layout(kept, keep, grid, tower.num_patches_per_side)
        assert pixels.shape[0] > 2  # crops in two directions would need more; this one is 2 across
    assert got.tokens.shape == (pixels.shape[0] * 5, model.config.hidden_size)
    torch.testing.assert_close(got.tokens, expected)


def _ids(tok, question: str) -> torch.Tensor:
    return tokenizer_image_token(f"USER: <image>\n{question} ASSISTANT:", tok, IMAGE_TOKEN_INDEX, return_tensors="pt")


@pytest.mark.parametrize("method", list(METHODS))
def test_keep_all_is_vanilla(loaded: dict, method: str) -> None:
    """T = every patch: each method keeps them all, in raster order, so the logits are the vanilla model's."""
    tok, model, proc, _ = loaded["v15"]
    ids, pixels = _ids(tok, QUESTIONS[0])[None], _pixels(model, proc, _image((80, 64)))
    with torch.no_grad():
        vanilla = model(ids, images=pixels).logits
        model.set_selection(METHODS[method](model.get_vision_tower().num_patches_per_side ** 2))
        kept = model(ids, images=pixels, instructions=[QUESTIONS[0]]).logits
    assert torch.equal(kept, vanilla)


def test_keep_all_on_next_is_the_stitched_raster(loaded: dict) -> None:
    """NeXT keep-all: the base view, then the stitched crops row by row, no unpadding and no image_newline (the
    per-crop layout the references use), from the vanilla tower + projector features."""
    _, model, proc, _ = loaded["v16"]
    image = _image((120, 60))
    pixels = _pixels(model, proc, image)
    tower = model.get_vision_tower()
    side = tower.num_patches_per_side
    with torch.no_grad():
        vanilla = model.encode_images(pixels)  # (V, N, C)
        model.set_selection(DivPruneConfig(tokens=side * side))
        got = model.image_features(pixels[None], [image.size])[0]
    grid = image_grid(image.size, model.config.image_grid_pinpoints, tower.config.image_size)
    torch.testing.assert_close(got, spatial_layout(vanilla, grid, side, image.size, None, unpad=False), rtol=0, atol=0)


def _greedy(model, ids, mask, images, sizes, instructions):
    return model.generate(
        ids, attention_mask=mask, images=images, image_sizes=sizes, instructions=instructions, max_new_tokens=4,
        do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip


@pytest.mark.parametrize("family", ["v15", "v16"])
@pytest.mark.parametrize("method", list(METHODS))
def test_left_padded_batch_equals_one_by_one(loaded: dict, family: str, method: str) -> None:
    tok, model, proc, _ = loaded[family]
    model.set_selection(METHODS[method](6))
    images = [_image((120, 60)), _image((64, 100), shift=90)]
    pixels = [_pixels(model, proc, image) for image in images]
    pixels = [p[0] if family == "v15" else p for p in pixels]
    sizes = [image.size for image in images]
    rows = [_ids(tok, "Colour?"), _ids(tok, QUESTIONS[1] + " Answer in one word, please.")]
    padded = tok.pad({"input_ids": [r.tolist() for r in rows]}, padding_side="left", return_tensors="pt")
    batched = _greedy(model, padded["input_ids"], padded["attention_mask"], pixels, sizes, list(QUESTIONS))
    for r in range(2):
        single = _greedy(model, rows[r][None], None, pixels[r : r + 1], sizes[r : r + 1], [QUESTIONS[r]])
        assert batched.sequences[r].tolist() == single.sequences[0].tolist(), f"row {r}"
        torch.testing.assert_close(batched.logits[0][r], single.logits[0][0], rtol=0, atol=1e-5)
    if method == "cdpruner":  # each row's own instruction matters: row 1's image selects otherwise with row 0's
        with torch.no_grad():
            own, other = (model.image_features(pixels[1:], sizes[1:], [q])[0] for q in reversed(QUESTIONS))
        assert not torch.equal(own, other)


def test_save_and_reload_keep_the_selection(loaded: dict, tmp_path: Path) -> None:
    tok, model, _, _ = loaded["v15"]
    cfg = VisPrunerConfig(tokens=12, important_ratio=0.75)
    model.set_selection(cfg.to_dict())  # a dict, as config.json holds it
    assert model.config.token_selection == {"method": "vispruner", "tokens": 12, "important_ratio": 0.75}
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    _, again, _, _ = load_pretrained_model(str(tmp_path), device="cpu")
    assert again.config.selection_config() == cfg
    _, other, _, _ = load_pretrained_model(str(tmp_path), device="cpu", selection={"method": "divprune", "tokens": 3})
    assert other.config.selection_config() == DivPruneConfig(tokens=3)  # the loader's argument replaces the saved one
    model.set_selection(None)
    assert model.config.selection_config() is None


def test_bad_configs_refused_with_numbers(loaded: dict) -> None:
    tok, model, proc, _ = loaded["v15"]
    patches = model.get_vision_tower().num_patches_per_side ** 2
    too_many = f"DivPrune, {patches + 1} tokens .* per view, but a view here has {patches} patches: expected tokens"
    with pytest.raises(ValueError, match=f"{too_many} <= {patches}"):
        model.set_selection(DivPruneConfig(tokens=patches + 1))
    assert model.config.token_selection is None
    with pytest.raises(ValueError, match="a saved token selection needs 'method'"):
        model.set_selection({"method": "visionzip", "tokens": 4})
    model.set_visionzip(VisionZipConfig(dominant=6, contextual=2))
    with pytest.raises(ValueError, match=r"DivPrune, 8 tokens.*and VisionZip 6\+2 both"):
        model.set_selection(DivPruneConfig(tokens=8))
    model.set_visionzip(None)
    model.set_pruning(FastVConfig(layer=1, budget=40))
    with pytest.raises(ValueError, match=r"DivPrune, 8 tokens.*in-LLM method fastv"):
        model.set_selection(DivPruneConfig(tokens=8))
    model.set_pruning(None)
    model.set_selection(DivPruneConfig(tokens=8))
    with pytest.raises(ValueError, match=r"VisionZip 6\+2 and DivPrune, 8 tokens.*both set"):
        model.set_visionzip(VisionZipConfig(dominant=6, contextual=2))
    with pytest.raises(ValueError, match=r"in-LLM method fastv and DivPrune, 8 tokens.*both set"):
        model.set_pruning(FastVConfig(layer=1, budget=40))
    ids, pixels = _ids(tok, "Hi")[None], _pixels(model, proc, _image((64, 64)))
    with pytest.raises(ValueError, match="instructions are one text per row of input_ids: expected 1, got 2"):
        model(ids, images=pixels, instructions=list(QUESTIONS))


def test_cdpruner_needs_each_rows_instruction(loaded: dict) -> None:
    tok, model, proc, _ = loaded["v15"]
    model.set_selection(CDPrunerConfig(tokens=4))
    ids, pixels = _ids(tok, "Hi")[None], _pixels(model, proc, _image((64, 64)))
    with pytest.raises(ValueError, match=r"CDPruner needs each row's instruction: pass instructions="):
        model.generate(ids, images=pixels, max_new_tokens=1)
    assert not any("text" in name for name, _ in model.named_parameters())  # the text tower is held aside
    assert not any(key.startswith(("text_model", "model.text")) for key in model.state_dict())


def test_cdpruner_text_tower_from_an_offline_hub_cache(tmp_path: Path) -> None:
    """A checkpoint naming its tower by hub id (as the released ones do) finds CLIP's text tower in the cache; the
    tokens equal those of the same checkpoint naming the tower by its local folder."""
    hub = build_tiny_hub(tmp_path)
    image = _image((64, 64))
    tokens = {}
    for source in ("cache", "folder"):
        with offline_hub(hub.hf_home):
            path = V15_ID if source == "cache" else str(hub.sources[V15_ID])
            _, model, proc, _ = load_pretrained_model(path, device="cpu")
            before = (len(list(model.parameters())), set(model.state_dict()))
            model.set_selection(CDPrunerConfig(tokens=7))
            assert (len(list(model.parameters())), set(model.state_dict())) == before  # held outside the model
            with torch.no_grad():
                tokens[source] = model.image_features(_pixels(model, proc, image)[None], None, [QUESTIONS[1]])[0]
        assert (model.config.mm_vision_tower == CLIP_ID) == (source == "cache")
    torch.testing.assert_close(tokens["cache"], tokens["folder"], rtol=0, atol=0)


def test_cdpruner_on_a_vision_only_tower_is_refused(loaded: dict, tmp_path: Path) -> None:
    _, model, _, path = loaded["v15"]
    vision_only = tmp_path / "clip-vision-only"
    model.get_vision_tower().vision_tower.save_pretrained(vision_only)
    shutil.copy(Path(model.config.mm_vision_tower) / "preprocessor_config.json", vision_only)
    config = json.loads((path / "config.json").read_text())
    copy = tmp_path / "llava"
    shutil.copytree(path, copy)
    (copy / "config.json").write_text(json.dumps({**config, "mm_vision_tower": str(vision_only)}))
    _, other, _, _ = load_pretrained_model(str(copy), device="cpu")
    with pytest.raises(ValueError, match=f"{vision_only} is a 'clip_vision_model' checkpoint, not a full CLIP"):
        other.set_selection(CDPrunerConfig(tokens=4))
    assert other.config.token_selection is None


def test_each_rows_instruction_reaches_each_of_its_images() -> None:
    """Rows of 2, 0 and 1 images (one placeholder hidden by the mask) -> one instruction per image, in order."""
    ids = torch.tensor(
        [[1, IMAGE_TOKEN_INDEX, 5, IMAGE_TOKEN_INDEX], [0, 1, 5, 6], [IMAGE_TOKEN_INDEX, 1, IMAGE_TOKEN_INDEX, 7]]
    )
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1]])
    assert image_instructions(ids, mask, ["a", "b", "c"]) == ["a", "a", "c"]
    assert image_instructions(ids, None, None) is None
    with pytest.raises(ValueError, match="one text per row of input_ids: expected 3, got one string"):
        image_instructions(ids, mask, "a")


@pytest.mark.parametrize("method", list(METHODS))
def test_one_encoder_and_one_projector_call_per_batch(loaded: dict, method: str) -> None:
    _, model, proc, _ = loaded["v16"]
    model.set_selection(METHODS[method](4))
    images = [_image((120, 60)), _image((64, 64), shift=45)]
    calls = {"tower": 0, "projector": 0}
    tower = model.get_vision_tower().vision_tower.get_input_embeddings()
    hooks = [
        tower.register_forward_pre_hook(lambda *_: calls.__setitem__("tower", calls["tower"] + 1)),
        model.get_model().mm_projector.register_forward_pre_hook(
            lambda *_: calls.__setitem__("projector", calls["projector"] + 1)
        ),
    ]
    try:
        with torch.no_grad():
            feats = model.image_features([_pixels(model, proc, i) for i in images], [i.size for i in images], QUESTIONS)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"tower": 1, "projector": 1}
    assert [f.shape[0] for f in feats] == [4 * _pixels(model, proc, i).shape[0] for i in images]
