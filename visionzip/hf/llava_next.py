"""VisionZip for transformers' ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT / 1.6) and its processor.

Budget: per view. An image of V = 1 + nh * nw views (the base view, then nh x nw crops of the AnyRes grid) keeps
``dominant + contextual`` tokens in every view, as the paper's LLaVA-NeXT numbers are: 640 / 320 / 160 tokens
for 5 views are ``VisionZipConfig(108, 20)`` / ``(54, 10)`` / ``(27, 5)``. Each view is compressed on its own
([CLS] attention at ``vision_feature_layer``, [CLS] always kept, as in :mod:`visionzip.hf.llava`).

Layout of one image's V * (dominant + contextual) tokens, the released VisionZip code's order (which our own
LLaVA-NeXT in ``llava/model`` follows too; :func:`visionzip.anyres.visionzip_layout`):

1. the base view's tokens: its dominant tokens in encoder order ([CLS] first), then its contextual tokens;
2. every crop's dominant patches, in the raster order of the stitched (nh * side) x (nw * side) patch grid;
3. the crops' [CLS] tokens, crop by crop (raster order of the crops);
4. all crops' contextual tokens, crop by crop.

No unpadding and no ``image_newline`` (the model keeps the parameter; VisionZip does not use it). The processor
counts V * (dominant + contextual) for each image from its size, so images of mixed sizes batch as usual.

    model = VisionZipLlavaNextForConditionalGeneration.from_pretrained(id, visionzip=VisionZipConfig(108, 20))
    processor = VisionZipLlavaNextProcessor.from_pretrained(id, visionzip=model.visionzip_config)
    out = model.generate(**processor(images=image, text=prompt, return_tensors="pt"), max_new_tokens=32)

DivPrune, VisPruner and CDPruner (``method=``, :mod:`visionzip.hf.selection`) keep ``tokens`` patches in every view,
laid out as above with only dominant tokens: the base view's kept patches, then all crops' in stitched raster order
(the references' "32 x 5 = 160", no unpadding, no ``image_newline``). FastV, PDrop and SparseVLM prune inside the
language model (:mod:`visionzip.hf.inllm`); all views of an image are one image to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import LlavaNextForConditionalGeneration, LlavaNextModel, LlavaNextProcessor
from transformers.image_processing_utils import select_best_resolution
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import LlavaNextPreTrainedModel
from transformers.processing_utils import MultiModalData
from transformers.utils.generic import can_return_tuple

from visionzip.anyres import Grid, SizeHW, compress_anyres, stack_views
from visionzip.hf.common import (
    check_call_layer,
    image_output,
    saved_visionzip,
    share_weight_conversions,
    view_encoder,
    view_prefix,
)
from visionzip.hf.inllm import PruningModelMixin, PruningPretrainedMixin
from visionzip.hf.selection import (
    SelectionModelMixin,
    SelectionPretrainedMixin,
    SelectionProcessorMixin,
    anyres_selection_layout,
    saved_selection,
)


def anyres_grid(image_size: SizeHW | torch.Tensor | Sequence[int], grid_pinpoints: list, view_size: int) -> Grid:
    """The crop grid of an image of ``image_size`` (height, width), as transformers' LLaVA-NeXT picks it."""
    size = image_size.tolist() if isinstance(image_size, torch.Tensor) else list(image_size)
    height, width = select_best_resolution(size, grid_pinpoints)  # both (height, width), as transformers orders them
    return Grid(rows=height // view_size, cols=width // view_size)


def num_views(image_size: SizeHW | torch.Tensor | Sequence[int], grid_pinpoints: list, view_size: int) -> int:
    """Views of one image: the base view and its crops."""
    return anyres_grid(image_size, grid_pinpoints, view_size).views


class VisionZipLlavaNextModel(PruningModelMixin, SelectionModelMixin, LlavaNextModel):
    """``LlavaNextModel`` whose ``get_image_features`` compresses every view when ``config.visionzip`` is set (or keeps
    ``tokens`` patches of every view when ``config.token_selection`` is) and lays the views out in the released
    code's order (module docstring) instead of ``pack_image_features``."""

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None, vision_feature_select_strategy: str | None = None,
        image_instructions: list[str] | None = None, **kwargs: Any,
    ) -> BaseModelOutputWithPooling:  # fmt: skip
        """(N, V_max, 3, S, S) or (sum V_i, 3, S, S) pixels and (N, 2) sizes (height, width) -> ``pooler_output``:
        N tensors (n_i, C_llm); with VisionZip n_i = V_i * (dominant + contextual), with a selection V_i * tokens
        (``image_instructions``: one per image, CDPruner's)."""
        if saved_selection(self.config) is not None:
            self.check_selection_layer(vision_feature_layer)
            return self._selected_features(pixel_values, image_sizes, image_instructions)
        cfg = saved_visionzip(self.config)
        if cfg is None:
            return super().get_image_features(
                pixel_values, image_sizes, vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy, **kwargs,
            )  # fmt: skip
        check_call_layer(self.config, cfg, vision_feature_layer)
        vision = self.config.vision_config
        grids = [anyres_grid(size, self.config.image_grid_pinpoints, vision.image_size) for size in image_sizes]
        out = compress_anyres(
            pixel_values, grids, view_encoder(self.vision_tower, cfg), self.multi_modal_projector,
            vision.image_size // vision.patch_size, cfg.dominant, view_prefix(self.vision_tower),
        )  # fmt: skip
        return image_output(out.encoder_tokens, out.features)

    def _selected_features(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor, instructions: list[str] | None
    ) -> BaseModelOutputWithPooling:
        """Every view keeps ``tokens`` patches, the views of an image laid out as VisionZip's (module docstring,
        with only dominant tokens); ``instructions``: one per image, repeated over its views."""
        vision = self.config.vision_config
        grids = [anyres_grid(size, self.config.image_grid_pinpoints, vision.image_size) for size in image_sizes]
        views = [grid.views for grid in grids]
        per_view = None
        if instructions is not None:
            if len(instructions) != len(grids):
                raise ValueError(f"{len(instructions)} image instructions for {len(grids)} images")
            per_view = [text for text, count in zip(instructions, views, strict=True) for _ in range(count)]
        kept = self.kept_patches(stack_views(pixel_values, views), saved_selection(self.config), per_view)
        features = anyres_selection_layout(kept, grids, vision.image_size // vision.patch_size)
        return image_output(kept.encoder, features)


class VisionZipLlavaNextForConditionalGeneration(
    PruningPretrainedMixin, SelectionPretrainedMixin, LlavaNextForConditionalGeneration
):
    """``LlavaNextForConditionalGeneration`` with VisionZip per view: ``from_pretrained(id, visionzip=...)``, or any
    encoder-side method per view: ``from_pretrained(id, method=VisionZipConfig(...) | DivPruneConfig(...) | ...)``."""

    def __init__(self, config: Any) -> None:
        self._build_with_inner(config, LlavaNextPreTrainedModel, VisionZipLlavaNextModel)

    def image_token_counts(self, pixel_values: Any, image_sizes: torch.Tensor) -> list[int]:
        """V_i * tokens placeholders for each image of (height, width) ``image_sizes``, under the method in use."""
        pinpoints, side = self.config.image_grid_pinpoints, self.config.vision_config.image_size
        return [num_views(size, pinpoints, side) * self.method_config.tokens for size in image_sizes]

    def largest_image_views(self) -> int:
        """The base view and the most crops a grid pinpoint gives (an in-LLM method's budget is checked on them)."""
        side = self.config.vision_config.image_size
        return 1 + max((height // side) * (width // side) for height, width in self.config.image_grid_pinpoints)


class VisionZipLlavaNextProcessor(SelectionProcessorMixin, LlavaNextProcessor):
    """``LlavaNextProcessor`` that expands each ``<image>`` into V * (dominant + contextual) placeholders with
    VisionZip, V * tokens with a selection."""

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        cfg = self.method_config
        if cfg is None:
            return super().replace_image_token(image_inputs, image_idx, **kwargs)
        view_size = image_inputs["pixel_values"][0][0].shape[-1]
        views = num_views(image_inputs["image_sizes"][image_idx], self.image_processor.image_grid_pinpoints, view_size)
        return self.image_token * (views * cfg.tokens)

    def _get_num_multimodal_tokens(self, image_sizes: list | None = None, **kwargs: Any) -> MultiModalData:
        cfg = self.method_config
        if cfg is None or image_sizes is None:
            return super()._get_num_multimodal_tokens(image_sizes, **kwargs)
        pinpoints, view_size = self.image_processor.image_grid_pinpoints, view_side(self.image_processor)
        counts = [num_views(size, pinpoints, view_size) * cfg.tokens for size in image_sizes]
        return MultiModalData(num_image_tokens=counts, num_image_patches=[1] * len(image_sizes))


def view_side(image_processor: Any) -> int:
    """Pixels per view side, chosen as LLaVA-NeXT's image processor chooses its crop size."""
    crop, size = image_processor.crop_size, image_processor.size
    if crop is not None and crop.height:
        return crop.height
    return size.height if size.height else size.shortest_edge


# llava-hf checkpoints load into these classes with the parents' key renamings (and save in that layout)
share_weight_conversions(VisionZipLlavaNextModel, LlavaNextModel)
share_weight_conversions(VisionZipLlavaNextForConditionalGeneration, LlavaNextForConditionalGeneration)

__all__ = [
    "VisionZipLlavaNextForConditionalGeneration",
    "VisionZipLlavaNextModel",
    "VisionZipLlavaNextProcessor",
    "anyres_grid",
    "num_views",
]
