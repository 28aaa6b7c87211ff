"""VisionZip on LLaVA-NeXT (AnyRes): the released layout against a loop restatement, and total budgets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from llava.mm_utils import get_anyres_image_grid_shape, process_images
from llava.model.anyres import visionzip_layout
from llava.model.builder import load_pretrained_model
from llava.tiny import TinyConfig, write_tiny_llava
from visionzip import VisionZipConfig, encode, select_dominant
from visionzip.anyres import Grid

SAMPLE = Path(__file__).resolve().parents[1] / "llava/serve/examples/chelsea.jpg"


def loop_layout(
    tokens: torch.Tensor, keep: torch.Tensor, grid: tuple[int, int], side: int, dominant: int, prefix: int
) -> torch.Tensor:
    """The README's order rebuilt token by token: base view; crops' dominant patches by (row, column) of the
    stitched grid; the crops' kept [CLS] tokens, crop by crop; all contextual tokens, crop by crop.

    ``grid``: (nw, nh) crops across and down, as LLaVA's ``get_anyres_image_grid_shape`` gives them."""
    nw, _ = grid
    patches, cls_rows, contextual = [], [], []
    for view in range(1, tokens.shape[0]):
        crop_row, crop_col = divmod(view - 1, nw)
        for j in range(dominant):
            position = int(keep[view, j])
            if position < prefix:
                cls_rows.append(tokens[view, j])
                continue
            row, col = divmod(position - prefix, side)
            patches.append((crop_row * side + row, crop_col * side + col, tokens[view, j]))
        contextual += [tokens[view, j] for j in range(dominant, tokens.shape[1])]
    ordered = [t for _, _, t in sorted(patches, key=lambda e: (e[0], e[1]))]
    return torch.cat([tokens[0], torch.stack(ordered + cls_rows + contextual)])


@pytest.mark.parametrize("grid", [(2, 1), (1, 3), (2, 2)])  # (nw, nh)
@pytest.mark.parametrize(("cls_token", "prefix"), [(True, 1), (False, 1), (False, 0)])
def test_layout_matches_loop_restatement(grid: tuple[int, int], cls_token: bool, prefix: int) -> None:
    side, dominant, contextual, channels = 3, 4, 2, 5
    views, num_tokens = 1 + grid[0] * grid[1], prefix + side * side
    gen = torch.Generator().manual_seed(grid[0] * 10 + grid[1])
    tokens = torch.randn(views, dominant + contextual, channels, generator=gen)
    scores = torch.rand(views, num_tokens, generator=gen)
    if prefix:  # [CLS] scores highest in odd views and lowest in even ones: some crops keep it, some do not
        scores[:, 0] = torch.arange(views).remainder(2).float() * 2 - 1
    keep = select_dominant(scores, dominant, cls_token)  # (V, D)
    out = visionzip_layout(tokens, keep, Grid(rows=grid[1], cols=grid[0]), side, dominant, prefix)
    assert out.shape == (views * (dominant + contextual), channels)
    assert torch.equal(out, loop_layout(tokens, keep, grid, side, dominant, prefix))
    kept_cls = (keep[1:] < prefix).any(dim=1)
    if prefix and not cls_token:
        assert kept_cls.any() and not kept_cls.all(), "the case where [CLS] is not at column 0 of every crop"


def test_layout_errors() -> None:
    tokens, keep = torch.zeros(3, 6, 2), torch.zeros(3, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="expected 1 \\+ 2x2 views, got 3"):
        visionzip_layout(tokens, keep, Grid(rows=2, cols=2), 3, 4, 1)
    with pytest.raises(ValueError, match="keep must be \\(views, dominant\\) = \\(3, 5\\), got \\(3, 4\\)"):
        visionzip_layout(tokens, keep, Grid(rows=1, cols=2), 3, 5, 1)
    with pytest.raises(ValueError, match=r"grid must be a visionzip\.anyres\.Grid\(rows, cols\), got \(2, 1\)"):
        visionzip_layout(tokens, keep, (2, 1), 3, 4, 1)  # (rows, cols) or (cols, rows)? A plain tuple is refused


# --- on a tiny LLaVA-NeXT -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llava(tmp_path_factory.mktemp("next"), next=True)


@pytest.fixture(scope="module")
def v16_paper_views(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny NeXT whose views have CLIP-L/336's 24 x 24 patches + [CLS] = 577 tokens, as the paper's."""
    cfg = TinyConfig(image_size=336, patch_size=14, vision_layers=2, num_layers=1)
    return write_tiny_llava(tmp_path_factory.mktemp("next577"), next=True, cfg=cfg)


def _image(size: tuple[int, int]) -> Image.Image:
    with Image.open(SAMPLE) as photo:
        return photo.convert("RGB").resize(size)


def _expected(model, pixels: torch.Tensor, size: tuple[int, int], cfg: VisionZipConfig) -> torch.Tensor:
    """One image's tokens rebuilt by hand: encode() each view with ``cfg``, project, then the loop layout."""
    tower = model.get_vision_tower()
    out = encode(tower.vision_tower, pixels, cfg)
    projected = model.get_model().mm_projector(out.tokens)
    grid = get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, tower.config.image_size)
    side = tower.num_patches_per_side
    prefix = out.num_input_tokens - side * side
    return loop_layout(projected, out.keep_indices, grid, side, cfg.dominant, prefix)


def _features(model, proc, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = process_images([image], proc, model.config)[0]  # (V, 3, S, S)
    with torch.no_grad():
        return model.image_features(pixels[None], [image.size])[0], pixels


def test_paper_640_total_over_577_token_views(v16_paper_views: Path) -> None:
    _, model, proc, _ = load_pretrained_model(str(v16_paper_views), device="cpu")
    n = model.get_vision_tower().num_tokens
    assert n == 577
    model.set_visionzip(VisionZipConfig.from_budget(640), budget="total")  # 540+100 > one view: still accepted
    for size, views, per_view in (((700, 700), 5, (108, 20)), ((700, 350), 3, (180, 33))):
        feats, pixels = _features(model, proc, _image(size))
        assert pixels.shape[0] == views
        expected_cfg = VisionZipConfig(*per_view)  # 640 // 5 = 128 = 108+20; 640 // 3 = 213 = 180+33
        with torch.no_grad():
            expected = _expected(model, pixels, size, expected_cfg)
        assert feats.shape[0] == views * expected_cfg.tokens == views * (640 // views)
        torch.testing.assert_close(feats, expected)


def test_total_budget_above_one_view_and_cls_token_false(v16: Path) -> None:
    _, model, proc, _ = load_pretrained_model(str(v16), device="cpu")
    n = model.get_vision_tower().num_tokens
    image = _image((120, 60))
    pixels = process_images([image], proc, model.config)[0]
    views = pixels.shape[0]
    total = views * 40 + views - 1  # more than one view's tokens; 40 per view, the remainder unused
    assert views > 2 and total > n
    for cls_token in (True, False):
        model.set_visionzip(VisionZipConfig.from_budget(total, cls_token=cls_token), budget="total")
        feats, _ = _features(model, proc, image)
        per_view = VisionZipConfig.from_budget(40, cls_token=cls_token)
        with torch.no_grad():
            expected = _expected(model, pixels, image.size, per_view)
        assert feats.shape[0] == views * 40
        torch.testing.assert_close(feats, expected)
    # per crop: the tiny tower's received attention keeps [CLS] in every view, so draw the tokens at random with
    # the first seed whose crops differ: some keep [CLS], some do not (a layout that assumes it at column 0 fails)
    tower = model.get_vision_tower().vision_tower
    for seed in range(50):
        cfg = VisionZipConfig(dominant=30, contextual=5, cls_token=False, selection="random", seed=seed)
        with torch.no_grad():
            kept_cls = (encode(tower, pixels, cfg).keep_indices[1:, 0] == 0).tolist()
        if any(kept_cls) and not all(kept_cls):
            break
    else:
        pytest.fail("no seed below 50 keeps [CLS] in some crops only")
    for per_crop in (cfg, VisionZipConfig(dominant=7, contextual=2, cls_token=False)):
        model.set_visionzip(per_crop)
        feats, _ = _features(model, proc, image)
        with torch.no_grad():
            torch.testing.assert_close(feats, _expected(model, pixels, image.size, per_crop))


def test_total_budget_that_cannot_fit_the_views_names_them(v16: Path) -> None:
    _, model, proc, _ = load_pretrained_model(str(v16), device="cpu")
    n = model.get_vision_tower().num_tokens
    image = _image((120, 60))
    views = process_images([image], proc, model.config)[0].shape[0]
    model.set_visionzip(VisionZipConfig.from_budget(views - 1), budget="total")
    with pytest.raises(ValueError, match=f"budget {views - 1} is smaller than this image's {views} views"):
        _features(model, proc, image)
    too_many = (n + 1) * views
    model.set_visionzip(VisionZipConfig.from_budget(too_many), budget="total")
    with pytest.raises(
        ValueError, match=f"over this image's {views} views is {n + 1} per view, more than a view's {n}"
    ):
        _features(model, proc, image)
    with pytest.raises(ValueError, match=f"larger than a crop's {n} tokens"):  # per crop: checked when set
        model.set_visionzip(VisionZipConfig.from_budget(n + 1))


def test_mixed_batch_under_a_total_budget_runs_each_module_once(v16: Path) -> None:
    """Images with different view counts get different per-view budgets, yet the encoder's embeddings and the
    projector run once per batch (under ZeRO-3 every rank must call the same modules, as often, each step); each
    image's tokens still equal its own reference built view by view with ``encode``."""
    _, model, proc, _ = load_pretrained_model(str(v16), device="cpu")
    images = [_image((120, 60)), _image((60, 60)), _image((60, 150))]
    pixels = [process_images([im], proc, model.config)[0] for im in images]
    views = [p.shape[0] for p in pixels]
    assert len(set(views)) > 1
    total = 3 * max(views)
    model.set_visionzip(VisionZipConfig.from_budget(total), budget="total")
    calls = {"embeddings": 0, "projector": 0}

    def count(name: str):
        return lambda *_: calls.__setitem__(name, calls[name] + 1)

    tower = model.get_vision_tower().vision_tower
    hooks = [
        tower.get_input_embeddings().register_forward_hook(count("embeddings")),
        model.get_model().mm_projector.register_forward_hook(count("projector")),
    ]
    try:
        with torch.no_grad():
            feats = model.image_features(pixels, [im.size for im in images])
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"embeddings": 1, "projector": 1}
    for feat, pix, image, v in zip(feats, pixels, images, views, strict=True):
        per_view = VisionZipConfig.from_budget(total // v)
        with torch.no_grad():
            torch.testing.assert_close(feat, _expected(model, pix, image.size, per_view))
