"""VisionZip variant of vLLM's ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT / 1.6), per view.

An image of V = 1 + nh * nw views keeps ``dominant + contextual`` tokens in every view, laid out in our NeXT order
(:func:`visionzip.anyres.visionzip_layout`: base view, crops' dominant patches in stitched raster order, crops'
[CLS], crops' contextual tokens; no unpadding, no ``image_newline``), as
:mod:`visionzip.hf.llava_next` does. The count V * (dominant + contextual) comes from the same grid choice
as the HF processor's (:func:`visionzip.hf.llava_next.anyres_grid`), and the views go through the same
:func:`visionzip.anyres.compress_anyres`. Without ``visionzip``: the parent.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextImageEmbeddingInputs,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from llava.serve.vllm.compress import checked_budget, encode_views
from llava.serve.vllm.llava import TOWER_LAYOUT, BackendCheckMixin, BudgetInfoMixin, StartupCheckMixin
from visionzip.anyres import SizeHW, compress_anyres
from visionzip.hf.llava_next import VisionZipLlavaNextProcessor, anyres_grid


class VisionZipLlavaNextProcessingInfo(BudgetInfoMixin, LlavaNextProcessingInfo):
    """``LlavaNextProcessingInfo`` whose count is V * (dominant + contextual) per image with VisionZip."""

    budget_processor = VisionZipLlavaNextProcessor

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        """Tokens of one image: V * (dominant + contextual) with VisionZip (V: its AnyRes views), else the parent's."""
        cfg = self.budget
        if cfg is None:
            return super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        config = self.get_hf_config()
        size = SizeHW(height=image_height, width=image_width)
        return anyres_grid(size, config.image_grid_pinpoints, config.vision_config.image_size).views * cfg.tokens


class VisionZipLlavaNextMultiModalProcessor(StartupCheckMixin, LlavaNextMultiModalProcessor):
    """vLLM's LLaVA-NeXT processor; checks the budget when vLLM builds it at startup."""


@MULTIMODAL_REGISTRY.register_processor(
    VisionZipLlavaNextMultiModalProcessor, info=VisionZipLlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class VisionZipLlavaNextForConditionalGeneration(BackendCheckMixin, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT whose image features are VisionZip's tokens per view when the hf config saves a budget."""

    hf_to_vllm_mapper = LlavaNextForConditionalGeneration.hf_to_vllm_mapper | TOWER_LAYOUT

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.visionzip = checked_budget(self.config)

    def _process_image_input(self, image_input: Any) -> torch.Tensor | list[torch.Tensor]:
        """Views (B, V_max, 3, S, S) or B tensors (V_i, 3, S, S), sizes (B, 2) -> B tensors (V_i * K, C_llm)."""
        if self.visionzip is None or isinstance(image_input, LlavaNextImageEmbeddingInputs):
            return super()._process_image_input(image_input)
        cfg, vision = self.visionzip, self.config.vision_config
        sizes = image_input["image_sizes"]  # (B, 2): height, width
        grids = [anyres_grid(size, self.config.image_grid_pinpoints, vision.image_size) for size in sizes]
        out = compress_anyres(
            image_input["pixel_values"], grids, lambda views: encode_views(self.vision_tower, views, cfg),
            self.multi_modal_projector, vision.image_size // vision.patch_size, cfg.dominant, prefix=1,
        )  # fmt: skip
        return out.features  # B tensors (V_i * K, C_llm); prefix 1: CLIP's [CLS]
