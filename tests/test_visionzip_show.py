"""The kept-token picture: outlines are the model's keep indices, colours its merge groups (CLIP 336/14, AnyRes, hf)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llava.inference import prepare_images
from llava.model import hf_export
from llava.model.builder import load_pretrained_model
from llava.serve import kept
from llava.serve import show as show_cli
from llava.serve.kept import Loaded, choose_budget, show, show_llava
from llava.tiny import TinyConfig, write_tiny_llava
from visionzip import VisionZipConfig, encode
from visionzip.show import CONTEXTUAL_GID, DOMINANT_GID, KeptPicture

PHOTO = Path(__file__).resolve().parents[1] / "llava" / "serve" / "examples" / "chelsea.jpg"


# --- reading the figure back -----------------------------------------------------------------------------------------
def drawn(picture: KeptPicture, view: int) -> tuple[set[int], set[frozenset[int]]]:
    """From the artists of view ``view``'s top panel: outlined patch indices, and the patches grouped by fill colour."""
    ax = picture.figure.axes[view]  # subplots(2, V): the top row's axes come first
    side = round(ax.get_xlim()[1])
    outlined = {int(p.get_y()) * side + int(p.get_x()) for p in ax.patches if p.get_gid() == DOMINANT_GID}
    by_colour: dict[tuple, set[int]] = {}
    for p in ax.patches:
        if p.get_gid() == CONTEXTUAL_GID:
            colour = tuple(np.round(p.get_facecolor()[:3], 4))
            by_colour.setdefault(colour, set()).add(int(p.get_y()) * side + int(p.get_x()))
    return outlined, {frozenset(g) for g in by_colour.values()}


# --- an independent reference: eager attention maps and loops, as the released code computes them --------------------
@torch.no_grad()
def reference_choice(vision_model: torch.nn.Module, pixels: torch.Tensor, cfg: VisionZipConfig) -> list[tuple]:
    """Per view: (kept positions, groups as sets of positions) from the eager [CLS] attention row and cosine loops."""
    eager = copy.deepcopy(vision_model)
    eager.set_attn_implementation("eager")
    out = eager(pixels.float(), output_attentions=True, output_hidden_states=True)
    layers = eager.vision_model.encoder.layers if hasattr(eager, "vision_model") else eager.encoder.layers
    index = cfg.resolve_layer(len(layers))
    scores = out.attentions[index][:, :, 0, :].sum(dim=1)  # (V, N) [CLS] row, summed over heads
    layer = layers[index]
    normed = layer.layer_norm1(out.hidden_states[index])
    v, n, _ = normed.shape
    keys = layer.self_attn.k_proj(normed).view(v, n, layer.self_attn.num_heads, -1).mean(dim=2)
    results = []
    for row, key in zip(scores.tolist(), keys, strict=True):
        keep = sorted([0, *sorted(range(1, n), key=lambda i: -row[i])[: cfg.dominant - 1]])
        rest = [i for i in range(n) if i not in keep]
        targets = rest[:: max(1, len(rest) // cfg.contextual)][: cfg.contextual]
        groups = {t: {t} for t in targets}
        for i in rest:
            if i not in groups:
                sims = [float(torch.cosine_similarity(key[i], key[t], dim=0)) for t in targets]
                groups[targets[sims.index(max(sims))]].add(i)
        results.append((keep, groups))
    return results


def check_picture(picture: KeptPicture, model_keep: torch.Tensor, reference: list[tuple], prefix: int) -> None:
    """The drawn outlines equal the model's keep and the reference's; the colours are the reference's groups."""
    assert len(picture.views) == model_keep.shape[0] == len(reference)
    for view, (ref_keep, ref_groups) in enumerate(reference):
        outlined, coloured = drawn(picture, view)
        model_patches = {int(i) - prefix for i in model_keep[view] if i >= prefix}
        assert outlined == model_patches == {i - prefix for i in ref_keep if i >= prefix}
        assert np.array_equal(np.flatnonzero(picture.views[view].dominant), sorted(outlined))  # the returned mask
        ref_patch_groups = {frozenset(i - prefix for i in g if i >= prefix) for g in ref_groups.values()}
        assert coloured == ref_patch_groups - {frozenset()}
        assert picture.views[view].prefix_kept == sum(i < prefix for i in ref_keep)


def merged_from_groups(features: torch.Tensor, groups: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(V, N, C) features, (V, N) groups, (V, T) targets -> (V, T, C): target + mean of its group's other members."""
    out = torch.zeros(features.shape[0], targets.shape[1], features.shape[2])
    for v in range(features.shape[0]):
        for t, target in enumerate(targets[v].tolist()):
            others = [i for i in (groups[v] == t).nonzero().squeeze(1).tolist() if i != target]
            out[v, t] = features[v, target] + (features[v, others].mean(0) if others else 0)
    return out


# --- fixtures --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip336(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA-1.5 whose CLIP tower has LLaVA-1.5's geometry: 336 px, patch 14, 24 x 24 = 576 patches + [CLS]."""
    return write_tiny_llava(tmp_path_factory.mktemp("clip336"), cfg=TinyConfig(image_size=336, patch_size=14))


def _load(path: Path):
    _, model, image_processor, _ = load_pretrained_model(str(path), device="cpu")
    return model, image_processor


# --- tests -----------------------------------------------------------------------------------------------------------
def test_clip336_outlines_are_keep_indices_and_colours_the_merge_groups(clip336: Path) -> None:
    model, image_processor = _load(clip336)
    tower = model.get_vision_tower()
    assert tower.num_tokens == 577
    cfg = VisionZipConfig(54, 10)
    picture = show_llava(model, image_processor, Image.open(PHOTO).convert("RGB"), cfg)
    pixels = picture_pixels(model, image_processor)
    tokens, keep = tower.forward_visionzip(pixels, cfg)  # the model's own path: what the LLM receives
    check_picture(picture, keep, reference_choice(tower.vision_tower, pixels, cfg), prefix=1)
    assert picture.figure.axes[0].get_title().endswith("54 dominant ([CLS] + 53) + 10 contextual = 64 of 577 tokens")
    # the groups drawn are the ones the model merged: its contextual tokens are target + mean of the rest
    with torch.no_grad():
        seen = tower.capture_visionzip(pixels, cfg)
    expected = merged_from_groups(seen.features, picture.selection.groups, picture.selection.targets)
    torch.testing.assert_close(tokens[:, cfg.dominant :], expected, rtol=1e-5, atol=1e-5)


def picture_pixels(model, image_processor) -> torch.Tensor:
    """The views of the shipped photo as the model takes them: (V, 3, H, W)."""
    pixels, _ = prepare_images([Image.open(PHOTO).convert("RGB")], image_processor, model)
    first = pixels[0]
    return first.unsqueeze(0) if first.dim() == 3 else first


@pytest.mark.parametrize("budget", ["per_crop", "total"])
def test_anyres_one_panel_per_view(tiny_pair: dict[str, Path], budget: str) -> None:
    model, image_processor = _load(tiny_pair["v16"])
    tower = model.get_vision_tower()
    cfg = VisionZipConfig(6, 2) if budget == "per_crop" else VisionZipConfig.from_budget(30)
    picture = show_llava(model, image_processor, Image.open(PHOTO).convert("RGB"), cfg, budget)
    pixels = picture_pixels(model, image_processor)
    views = pixels.shape[0]
    assert views > 1 and len(picture.views) == views and len(picture.figure.axes) == 3 * views  # + colour bars
    view_cfg = cfg if budget == "per_crop" else VisionZipConfig.from_budget(30 // views)
    ((_, keep),) = tower.forward_visionzip_images(pixels, [views], [view_cfg])
    check_picture(picture, keep, reference_choice(tower.vision_tower, pixels, view_cfg), prefix=1)
    assert picture.figure.axes[0].get_title().startswith("base view")


def test_transformers_classes(tiny_pair: dict[str, Path], tmp_path: Path) -> None:
    """llava-hf folders (our export) load into transformers' classes; the picture is what their encoder keeps."""
    for name, count in (("v15", 1), ("v16", 5)):
        out = hf_export.export_to_hf(tiny_pair[name], tmp_path / name)
        loaded = kept.load(str(out))
        assert loaded.kind == "hf"
        cfg = choose_budget(loaded, 5, 2)
        picture = show(loaded, Image.open(PHOTO).convert("RGB"), cfg)
        inputs = loaded.processor.image_processor(images=Image.open(PHOTO).convert("RGB"), return_tensors="pt")
        pixels = inputs["pixel_values"][0] if inputs["pixel_values"].dim() == 5 else inputs["pixel_values"]
        pixels = pixels[: len(picture.views)]
        assert len(picture.views) == count
        keep = encode(loaded.model.model.vision_tower, pixels, cfg).keep_indices  # get_image_features' call
        check_picture(picture, keep, reference_choice(loaded.model.model.vision_tower, pixels, cfg), prefix=1)


def test_command_writes_the_picture(tiny_pair: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "kept.png"
    picture = show_cli.main(["--model-path", str(tiny_pair["v15"]), "--image-file", str(PHOTO), "--dominant", "9",
                             "--contextual", "3", "--out", str(out)])  # fmt: skip
    assert out.stat().st_size > 0 and Image.open(out).size[0] > 100
    assert int(picture.views[0].dominant.sum()) + picture.views[0].prefix_kept == 9
    assert len(set(picture.views[0].groups[picture.views[0].groups >= 0].tolist())) == 3
    with pytest.raises(SystemExit):
        show_cli.main(["--model-path", str(tiny_pair["v15"]), "--image-file", str(PHOTO), "--dominant", "60",
                       "--contextual", "10", "--out", str(out)])  # fmt: skip


def test_default_budget_is_the_papers_proportion(tiny_pair: dict[str, Path]) -> None:
    model, image_processor = _load(tiny_pair["v15"])
    loaded = Loaded("llava", model, image_processor)
    assert (choose_budget(loaded, None, None).dominant, choose_budget(loaded, None, None).contextual) == (6, 1)
    assert kept.default_budget(576) == VisionZipConfig(54, 10)


@pytest.mark.parametrize("views", [1, 2])
def test_titles_fit_the_figure_as_drawn(views: int) -> None:
    """Every title lies inside the figure when its canvas is drawn as is (the web demo's way, no tight box); the
    one-view figure is the narrowest, whose two-line title used to be cut off on both sides."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from visionzip.core import select
    from visionzip.show import draw_selection

    side, cfg = 8, VisionZipConfig(45, 10)
    scores, keys = torch.rand(views, 1 + side * side), torch.randn(views, 1 + side * side, 4)
    images = [np.zeros((side, side, 3)) for _ in range(views)]
    picture = draw_selection(images, select(scores, keys, cfg), scores, cfg, prefix=1)
    canvas = FigureCanvasAgg(picture.figure)
    canvas.draw()
    width = picture.figure.bbox.width
    titles = [picture.figure._suptitle, *(ax.title for ax in picture.figure.axes if ax.get_title())]
    assert len(titles) >= 1 + 2 * views
    for text in titles:
        box = text.get_window_extent(canvas.get_renderer())
        assert box.x0 >= 0 and box.x1 <= width, (text.get_text(), box.x0, box.x1, width)
    assert "dot: its target" in picture.figure._suptitle.get_text().replace("\n", " ")
