"""The kept-token picture of a LLaVA checkpoint (ours or a llava-hf folder): load, choose the budget, draw.

The drawing is :mod:`visionzip.show` (pure: image + selection -> figure); this module only loads models, so that
``visionzip`` imports nothing from ``llava``. The selection is made by :func:`visionzip.core.select` from what the
model's own encoder seam gives (``CLIPVisionTower.capture_visionzip`` / :func:`visionzip.encode.capture`), the same
steps :func:`visionzip.core.compress` takes when the model answers. The command is ``python -m llava.serve.show``.
:func:`show_methods` draws the patches DivPrune, VisPruner and CDPruner keep (and VisionZip's dominant ones), several
methods side by side, each chosen by the model's own selection path (:func:`llava.model.selection.select_images`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from llava.inference import prepare_images
from llava.model.anyres import image_grid
from llava.model.builder import load_pretrained_model
from llava.model.hub import local_checkpoint
from llava.model.placement import load_placed
from llava.model.selection import select_images
from visionzip import VisionZipConfig, select
from visionzip.anyres import Grid
from visionzip.baselines.select import SelectionConfig
from visionzip.core import DOMINANT_GROUP
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
from visionzip.show_kept import KeptPatches, KeptPatchesPicture, draw_kept_patches, kept_mask

logger = logging.getLogger(__name__)

PAPER_TOKENS, PAPER_BUDGET = 576, 64  # LLaVA-1.5: 64 of 576 patches (54+10), the paper's smallest budget
HF_FAMILIES = {
    "llava": (VisionZipLlavaForConditionalGeneration, VisionZipLlavaProcessor),
    "llava_next": (VisionZipLlavaNextForConditionalGeneration, VisionZipLlavaNextProcessor),
}


def default_budget(patches: int) -> VisionZipConfig:
    """The paper's 64-of-576 proportion for an encoder of ``patches`` patches per view (54+10 at 576)."""
    return VisionZipConfig.from_budget(max(2, round(patches * PAPER_BUDGET / PAPER_TOKENS)))


def view_labels(views: int, grid: Grid | None) -> list[str]:
    """Panel names: ``image`` for one view; ``base view`` then ``crop (row r, col c)`` for AnyRes."""
    if views == 1:
        return ["image"]
    cols = grid.cols if grid is not None else views - 1
    return ["base view"] + [f"crop (row {i // cols}, col {i % cols})" for i in range(views - 1)]


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
        grid = image_grid(sizes[0], model.config.image_grid_pinpoints, tower.config.image_size)
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
        grid = anyres_grid(size, image_processor.image_grid_pinpoints, view_side)
    mean, std = image_processor.image_mean, image_processor.image_std
    labels = view_labels(pixels.shape[0], grid)
    return show_vision_model(model.model.vision_tower, pixels, cfg, mean, std, labels)


def _visionzip_row(model: Any, views: torch.Tensor, cfg: VisionZipConfig) -> KeptPatches:
    """VisionZip's dominant patches per view (its [CLS] and merged contextual tokens are not patches it keeps)."""
    tower = model.get_vision_tower()
    model.set_visionzip(cfg)  # checked as for answering
    content = views.to(tower.dtype)
    with torch.no_grad():
        seen = tower.capture_visionzip(content, cfg)
    groups = select(seen.scores, seen.keys, cfg, content=content).groups  # (V, N_tokens)
    side = tower.num_patches_per_side
    mask = (groups[:, tower.num_tokens - side * side :] == DOMINANT_GROUP).view(-1, side, side).cpu().numpy()
    note = f"+ {cfg.contextual} merged contextual tokens per view (not drawn)" if cfg.contextual else ""
    return KeptPatches(f"VisionZip {cfg.dominant}+{cfg.contextual}", mask, note)


def _selection_row(model: Any, views: torch.Tensor, cfg: SelectionConfig, instruction: str | None) -> KeptPatches:
    """A selection's kept patches per view, chosen as the model chooses them when it answers."""
    tower = model.get_vision_tower()
    model.set_selection(cfg)
    with torch.no_grad():
        _, keep, _ = select_images(model, [views], cfg, None if instruction is None else [instruction])[0]
    side = tower.num_patches_per_side
    note = f"instruction: {instruction!r}" if instruction is not None and cfg.name == "cdpruner" else ""
    return KeptPatches(cfg.describe(), kept_mask(keep - (tower.num_tokens - side * side), side), note)


def show_methods(
    model: Any, image_processor: Any, image: Image.Image, cfgs: Sequence[VisionZipConfig | SelectionConfig],
    instruction: str | None = None,
) -> KeptPatchesPicture:  # fmt: skip
    """The patches each of ``cfgs`` keeps on one image (our LLaVA), one row per method, one column per view (AnyRes:
    the base view, then the crops; a budget per view). ``instruction``: the question CDPruner selects for.

    Each method is set on the model in turn (VisionZip, in-LLM methods and selections off around it, as one method
    runs at a time); the model is left with none of them set.
    """
    pixels, sizes = prepare_images([image], image_processor, model)
    views = _image_views(pixels)  # (V, 3, H, W)
    tower = model.get_vision_tower()
    model.set_pruning(None)
    rows = []
    try:
        for cfg in cfgs:
            model.set_visionzip(None)
            model.set_selection(None)
            if isinstance(cfg, VisionZipConfig):
                rows.append(_visionzip_row(model, views, cfg))
            else:
                rows.append(_selection_row(model, views, cfg, instruction))
    finally:
        model.set_visionzip(None)
        model.set_selection(None)
    grid = None
    if views.shape[0] > 1:
        grid = image_grid(sizes[0], model.config.image_grid_pinpoints, tower.config.image_size)
    images = denormalize(views, image_processor.image_mean, image_processor.image_std)
    return draw_kept_patches(images, rows, view_labels(views.shape[0], grid))


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
