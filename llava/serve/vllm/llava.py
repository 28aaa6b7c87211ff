"""VisionZip variant of vLLM's ``LlavaForConditionalGeneration`` (LLaVA-1.5), its processing info and processor.

The budget is the hf config's ``visionzip`` (as ``python -m llava.convert --to-hf`` writes it), per image: each
image's CLIP tokens at ``vision_feature_layer`` become ``dominant + contextual`` tokens ([CLS] always among the
dominant ones, as in :mod:`visionzip.hf.llava`), then the projector. The count is set in one place,
:meth:`VisionZipLlavaProcessingInfo.get_num_image_tokens`, which vLLM's prompt replacement, its memory profiling
(``get_max_image_tokens``) and the HF processor inside (:class:`~visionzip.hf.llava.VisionZipLlavaProcessor`,
whose expansion of ``<image>`` vLLM checks) all read. Without ``visionzip`` every method is the parent's.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY

from llava.serve.vllm.compress import checked_budget, encode_views
from visionzip.config import VisionZipConfig
from visionzip.hf.llava import VisionZipLlavaProcessor

# transformers 5 saves a llava-hf tower as ``vision_tower.{embeddings,encoder,...}``; vLLM's CLIP keeps HF's older
# ``vision_model.`` level. Both layouts load (the hub's checkpoints have ``vision_tower.vision_model.*``).
_TOWER_KEY = re.compile(r"^((?:model\.)?vision_tower\.)(embeddings|pre_layrnorm|encoder|post_layernorm)\.")
TOWER_LAYOUT = WeightsMapper(orig_to_new_regex={_TOWER_KEY: r"\1vision_model.\2."})


class BudgetInfoMixin:
    """What vLLM's processing info of a LLaVA family needs for VisionZip; placed before that info class in the bases.

    ``budget_processor``: our transformers processor of the family, which expands ``<image>`` to the budget's count.
    """

    budget_processor: type

    @property
    def budget(self) -> VisionZipConfig | None:
        """The checked budget of the model's hf config, None when it has none."""
        return checked_budget(self.get_hf_config())

    def get_hf_processor(self, **kwargs: object) -> Any:
        """The HF processor, expanding each ``<image>`` to the budget's count when VisionZip is on."""
        cfg = self.budget
        if cfg is None:
            return super().get_hf_processor(**kwargs)
        processor = self.ctx.get_hf_processor(self.budget_processor, visionzip=cfg, **kwargs)
        if processor.patch_size is None:
            processor.patch_size = self.get_vision_encoder_info().get_patch_size()
        return processor


class StartupCheckMixin:
    """A vLLM multimodal processor that checks the budget when vLLM builds it at startup (a clear error, not one
    mid-request); placed before that processor class in the bases."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        checked_budget(self.info.get_hf_config())


def check_attention_backends(model: nn.Module) -> None:
    """Raise ValueError, while the engine starts, for an attention layer its backend cannot run.

    vLLM picks each layer's backend when it builds the model but some kernels reject the shape only on the first
    request (the CPU backend takes head sizes 32, 64, 80, ...: a head of 16 fails then, and the server exits); this
    asks each backend, with its own list, before any request.
    """
    for name, layer in model.named_modules():
        if not isinstance(layer, Attention):
            continue
        backend = layer.attn_backend
        if not backend.supports_head_size(layer.head_size):
            raise ValueError(
                f"vLLM's {backend.get_name()} attention backend cannot run {name}: head size {layer.head_size}, "
                f"expected one of {backend.get_supported_head_sizes()} (python -m llava.tiny --servable writes a "
                "tiny model it runs)"
            )


class BackendCheckMixin:
    """A vLLM model that checks, once built, that every attention layer's backend runs its shape (a clear error at
    startup, not a crash on the first request); placed before the model class in the bases."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        check_attention_backends(self)


class VisionZipLlavaProcessingInfo(BudgetInfoMixin, LlavaProcessingInfo):
    """``LlavaProcessingInfo`` whose image token count is the budget's (``dominant + contextual`` per image)."""

    budget_processor = VisionZipLlavaProcessor

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        """Tokens of one image in the prompt and from the model: the budget's, or the parent's without one."""
        cfg = self.budget
        if cfg is None:
            return super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return cfg.tokens


class VisionZipLlavaMultiModalProcessor(StartupCheckMixin, LlavaMultiModalProcessor):
    """vLLM's LLaVA processor; checks the budget when vLLM builds it at startup."""


@MULTIMODAL_REGISTRY.register_processor(
    VisionZipLlavaMultiModalProcessor, info=VisionZipLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class VisionZipLlavaForConditionalGeneration(BackendCheckMixin, LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5 whose image features are VisionZip's tokens when the hf config saves a budget."""

    hf_to_vllm_mapper = LlavaForConditionalGeneration.hf_to_vllm_mapper | TOWER_LAYOUT

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.visionzip = checked_budget(self.config)

    def _process_image_input(self, image_input: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """(B, 3, S, S) pixels -> (B, dominant + contextual, C_llm) with VisionZip; else the parent's features."""
        if self.visionzip is None or isinstance(image_input, LlavaImageEmbeddingInputs):
            return super()._process_image_input(image_input)
        pixel_values = image_input["pixel_values"]
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.stack(list(pixel_values))
        tokens, _ = encode_views(self.vision_tower, pixel_values, self.visionzip)  # (B, K, C_vision)
        return self.multi_modal_projector(tokens)
