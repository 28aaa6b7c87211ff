"""See what VisionZip keeps: ``python -m llava.serve.show --model-path P --image-file F --out kept.png``.

Usage::

    python -m llava.serve.show --model-path liuhaotian/llava-v1.5-7b --image-file photo.jpg \
        [--dominant 54 --contextual 10] [--budget per_crop|total] --out kept.png

Draws the image as the vision tower sees it (padded/resized; for AnyRes one panel per view: the base view, then the
crops), the dominant patches outlined, the patches merged into each contextual token in that token's colour (a dot
on its merge target), and the [CLS] attention (or, with ``cls_token=False``, the attention received) as a heat map;
the counts are in the titles. Works on our LLaVA checkpoints and on llava-hf folders (transformers' ``Llava`` /
``LlavaNext`` classes through :mod:`visionzip.hf`). The budget: the flags, else the checkpoint's saved one, else
the paper's 64 of 576 in proportion to the tower's tokens (54+10 for CLIP-L/336).

The drawing is :mod:`visionzip.show` (pure: image + selection -> figure); this module only loads models, so that
``visionzip`` imports nothing from ``llava``. The selection is made by :func:`visionzip.core.select` from what the
model's own encoder seam gives (``CLIPVisionTower.capture_visionzip`` / :func:`visionzip.encode.capture`), the same
steps :func:`visionzip.core.compress` takes when the model answers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from llava.cli_options import add_flag
from llava.inference import prepare_images
from llava.mm_utils import get_anyres_image_grid_shape, load_image
from llava.model.builder import load_pretrained_model
from llava.model.config import BUDGET_MODES
from llava.model.hub import local_checkpoint
from llava.model.placement import load_placed
from visionzip import VisionZipConfig, select
from visionzip.encoders import get_adapter
from visionzip.hf.common import feature_layer_index
from visionzip.hf.llava import VisionZipLlavaForConditionalGeneration, VisionZipLlavaProcessor
from visionzip.hf.llava_next import (
    VisionZipLlavaNextForConditionalGeneration,
    VisionZipLlavaNextProcessor,
    anyres_grid,
    num_views,
)
from visionzip.show import KeptPicture, denormalize, draw_selection, show_vision_model

logger = logging.getLogger(__name__)

PAPER_TOKENS, PAPER_BUDGET = 576, 64  # LLaVA-1.5: 64 of 576 patches (54+10), the paper's smallest budget
HF_FAMILIES = {
    "llava": (VisionZipLlavaForConditionalGeneration, VisionZipLlavaProcessor),
    "llava_next": (VisionZipLlavaNextForConditionalGeneration, VisionZipLlavaNextProcessor),
}


def default_budget(patches: int) -> VisionZipConfig:
    """The paper's 64-of-576 proportion for an encoder of ``patches`` patches per view (54+10 at 576)."""
    return VisionZipConfig.from_budget(max(2, round(patches * PAPER_BUDGET / PAPER_TOKENS)))


def view_labels(views: int, grid: tuple[int, int] | None) -> list[str]:
    """Panel names: ``image`` for one view; ``base view`` then ``crop (row r, col c)`` for AnyRes (grid (nw, nh))."""
    if views == 1:
        return ["image"]
    nw = grid[0] if grid is not None else views - 1
    return ["base view"] + [f"crop (row {i // nw}, col {i % nw})" for i in range(views - 1)]


def _image_views(pixels: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """``prepare_images``' output for one image -> its views (V, 3, H, W)."""
    first = pixels[0]
    return first.unsqueeze(0) if first.dim() == 3 else first


def show_llava(
    model: Any, image_processor: Any, image: Image.Image, cfg: VisionZipConfig, budget: str = "per_crop"
) -> KeptPicture:
    """The picture of VisionZip on our LLaVA for one image; ``budget``: per_crop or total (AnyRes).

    Sets the model's VisionZip stage to ``cfg`` (checked as for answering); the views are encoded once.
    """
    model.set_visionzip(cfg, budget)
    pixels, sizes = prepare_images([image], image_processor, model)
    views = _image_views(pixels)  # (V, 3, H, W)
    tower = model.get_vision_tower()
    view_cfg = model._view_config(cfg, views.shape[0])  # a total budget split per view, as the model splits it
    content = views.to(tower.dtype)  # what forward_visionzip_images hands compress (random selection's draw)
    with torch.no_grad():
        seen = tower.capture_visionzip(content, view_cfg)
    selection = select(seen.scores, seen.keys, view_cfg, content=content)
    side = tower.num_patches_per_side
    grid = None
    if views.shape[0] > 1:
        grid = get_anyres_image_grid_shape(sizes[0], model.config.image_grid_pinpoints, tower.config.image_size)
    images = denormalize(views, image_processor.image_mean, image_processor.image_std)
    labels = view_labels(views.shape[0], grid)
    return draw_selection(images, selection, seen.scores, view_cfg, tower.num_tokens - side * side, labels)


def show_llava_hf(model: Any, processor: Any, image: Image.Image, cfg: VisionZipConfig) -> KeptPicture:
    """The picture for transformers' ``Llava``/``LlavaNext`` classes (our subclasses), the budget per view."""
    model.set_visionzip(cfg)
    image_processor = processor.image_processor
    inputs = image_processor(images=image, return_tensors="pt")
    pixels = inputs["pixel_values"].to(model.device, model.dtype)
    grid = None
    if pixels.dim() == 5:  # LLaVA-NeXT: (1, V_max, 3, S, S), the image's V real views first
        size, view_side = inputs["image_sizes"][0], pixels.shape[-1]
        pixels = pixels[0, : num_views(size, image_processor.image_grid_pinpoints, view_side)]
        nh, nw = anyres_grid(size, image_processor.image_grid_pinpoints, view_side)
        grid = (nw, nh)
    mean, std = image_processor.image_mean, image_processor.image_std
    labels = view_labels(pixels.shape[0], grid)
    return show_vision_model(model.model.vision_tower, pixels, cfg, mean, std, labels)


@dataclass
class Loaded:
    """A model ready for :func:`show`: ours (``kind="llava"``) or transformers' (``"hf"``)."""

    kind: str
    model: Any
    processor: Any  # our LLaVA: the tower's image processor; hf: the whole processor


def is_hf_checkpoint(model_path: str | Path) -> bool:
    """Whether ``config.json`` is transformers' LLaVA layout (``text_config``) rather than the original LLaVA's."""
    config = json.loads((Path(local_checkpoint(model_path, weights=False)) / "config.json").read_text())
    return "text_config" in config


def load(model_path: str, model_base: str | None = None, device: str = "cpu") -> Loaded:
    """Load ``model_path``: an original LLaVA checkpoint with our builder, a llava-hf folder with our subclasses."""
    if not is_hf_checkpoint(model_path):
        _, model, image_processor, _ = load_pretrained_model(model_path, model_base, device=device)
        return Loaded("llava", model, image_processor)
    if model_base is not None:
        raise ValueError("--model-base is for original LLaVA checkpoints; a llava-hf folder is complete")
    path = local_checkpoint(model_path)
    model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    if model_type not in HF_FAMILIES:
        raise ValueError(f"unsupported llava-hf model_type {model_type!r}; expected one of {sorted(HF_FAMILIES)}")
    model_cls, processor_cls = HF_FAMILIES[model_type]
    model = load_placed(model_cls, path, device)  # as our builder places ours: one placement helper
    return Loaded("hf", model, processor_cls.from_pretrained(path))


def choose_budget(loaded: Loaded, dominant: int | None, contextual: int | None) -> VisionZipConfig:
    """The flags' budget, else the checkpoint's saved one, else :func:`default_budget`, at the layer the model reads."""
    if loaded.kind == "llava":
        tower = loaded.model.get_vision_tower()
        saved = loaded.model.config.visionzip_config()
        base = saved or VisionZipConfig(layer=tower.select_layer)
        patches = tower.num_patches_per_side**2
    else:
        config, tower = loaded.model.config, loaded.model.model.vision_tower
        saved = loaded.model.visionzip_config
        layers = config.vision_config.num_hidden_layers
        layer = feature_layer_index(config.vision_feature_layer, layers) - layers
        base = saved or VisionZipConfig(layer=layer, cls_token=get_adapter(tower).has_cls)
        patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    if dominant is not None:
        return dataclasses.replace(base, dominant=dominant, contextual=contextual)
    if saved is not None:
        return saved
    split = default_budget(patches)
    return dataclasses.replace(base, dominant=split.dominant, contextual=split.contextual)


def show(loaded: Loaded, image: Image.Image, cfg: VisionZipConfig, budget: str | None = None) -> KeptPicture:
    """:func:`show_llava` or :func:`show_llava_hf`, as ``loaded`` is; ``budget`` (per_crop | total) is ours only."""
    if loaded.kind == "llava":
        mode = budget or getattr(loaded.model.config, "visionzip_budget", None) or "per_crop"
        return show_llava(loaded.model, loaded.processor, image, cfg, mode)
    if budget not in (None, "per_crop"):
        raise ValueError(f"transformers' classes take a budget per view: expected no --budget {budget}")
    return show_llava_hf(loaded.model, loaded.processor, image, cfg)


def build_parser() -> argparse.ArgumentParser:
    """The command's flags."""
    parser = argparse.ArgumentParser(
        prog="python -m llava.serve.show", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_flag(parser, "--model-path", required=True)
    add_flag(parser, "--model-base", default=None)
    add_flag(parser, "--image-file", required=True)
    parser.add_argument("--dominant", type=int, default=None, help="dominant tokens per view ([CLS] included)")
    parser.add_argument("--contextual", type=int, default=None, help="contextual (merged) tokens per view")
    parser.add_argument("--budget", choices=BUDGET_MODES, default=None, help="AnyRes: per crop or over all views")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dpi", type=int, default=120)
    parser.add_argument("--out", type=Path, default=Path("kept.png"), help="the picture (png, svg, pdf...)")
    return parser


def main(argv: Sequence[str] | None = None) -> KeptPicture:
    """Draw the picture for ``--image-file`` and write it to ``--out``; returns it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.dominant is None) != (args.contextual is None):
        parser.error("--dominant and --contextual must be given together")
    loaded = load(args.model_path, args.model_base, args.device)
    try:
        cfg = choose_budget(loaded, args.dominant, args.contextual)
        picture = show(loaded, load_image(args.image_file), cfg, args.budget)
    except ValueError as err:
        parser.error(str(err))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(str(args.out), dpi=args.dpi)
    kept = sum(int(v.dominant.sum()) + v.prefix_kept for v in picture.views)
    logger.info("%s: %d views, %d dominant tokens kept, %d contextual; wrote %s", args.image_file,
                len(picture.views), kept, picture.selection.targets.numel(), args.out)  # fmt: skip
    return picture


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
