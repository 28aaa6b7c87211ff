"""VisionZip for transformers' ``LlavaForConditionalGeneration`` (llava-hf LLaVA-1.5) and its processor, by subclassing.

Each image's (image_size / patch_size)**2 + 1 encoder tokens at ``vision_feature_layer`` (-2 for LLaVA-1.5) become
``dominant + contextual`` tokens: dominant ones by the [CLS] row of that layer's attention, the rest merged into
contextual ones (:func:`visionzip.encode`), then the projector. [CLS] is always among the dominant tokens
(``dominant=54`` keeps [CLS] and 53 patches), whatever ``vision_feature_select_strategy`` says: ``"default"``
drops [CLS] only when VisionZip is off, as the released VisionZip code and our own LLaVA (``llava/model``) do.

    model = VisionZipLlavaForConditionalGeneration.from_pretrained(id, visionzip=VisionZipConfig(54, 10))
    processor = VisionZipLlavaProcessor.from_pretrained(id, visionzip=model.visionzip_config)
    out = model.generate(**processor(images=image, text=prompt, return_tensors="pt"), max_new_tokens=32)

With ``visionzip=None`` both classes are exactly their parents. DivPrune, VisPruner and CDPruner run in the same
classes, ``tokens`` patches per image (:mod:`visionzip.hf.selection`): ``from_pretrained(id, method=DivPruneConfig())``;
FastV, PDrop and SparseVLM inside the language model (:mod:`visionzip.hf.inllm`): ``method=FastVConfig(...)``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlavaForConditionalGeneration, LlavaModel, LlavaProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaPreTrainedModel
from transformers.processing_utils import MultiModalData
from transformers.utils.generic import can_return_tuple

from visionzip.encode import encode
from visionzip.hf.common import check_call_layer, image_output, saved_visionzip, share_weight_conversions
from visionzip.hf.inllm import PruningModelMixin, PruningPretrainedMixin
from visionzip.hf.selection import (
    SelectionModelMixin,
    SelectionPretrainedMixin,
    SelectionProcessorMixin,
    saved_selection,
)


class VisionZipLlavaModel(PruningModelMixin, SelectionModelMixin, LlavaModel):
    """``LlavaModel`` whose ``get_image_features`` compresses each image when ``config.visionzip`` is set, or keeps
    ``tokens`` patches of each when ``config.token_selection`` is (:mod:`visionzip.hf.selection`).

    That method is the one place image tokens are made: ``forward`` and ``generate`` (which pre-encodes images
    through it) both call it, and the placeholder check compares its output with the processor's count.
    """

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None, image_sizes: torch.Tensor | None = None,
        image_instructions: list[str] | None = None, **kwargs: Any,
    ) -> BaseModelOutputWithPooling:  # fmt: skip
        """(B, 3, H, W) pixels -> ``pooler_output``: B tensors (n, C_llm); n = dominant + contextual with VisionZip,
        ``tokens`` with a selection (``image_instructions``: one per image, CDPruner's).

        With VisionZip the select strategy is not read ([CLS] is kept, see the module docstring) and the encoder
        runs only up to the feature layer, with its own attention implementation; a selection keeps patches only.
        """
        selection = saved_selection(self.config)
        if selection is not None:
            self.check_selection_layer(vision_feature_layer)
            if image_sizes is not None:
                raise ValueError("a token selection takes square views of one size: image_sizes is not supported")
            kept = self.kept_patches(pixel_values, selection, image_instructions)
            return image_output(kept.encoder, list(kept.projected))
        cfg = saved_visionzip(self.config)
        if cfg is None:
            return super().get_image_features(
                pixel_values, vision_feature_layer=vision_feature_layer, image_sizes=image_sizes,
                vision_feature_select_strategy=vision_feature_select_strategy, **kwargs,
            )  # fmt: skip
        check_call_layer(self.config, cfg, vision_feature_layer)
        if image_sizes is not None:
            raise ValueError("VisionZip takes square views of one size: image_sizes (Pixtral towers) is not supported")
        out = encode(self.vision_tower, pixel_values, cfg)  # tokens: (B, K, C_vision)
        features = self.multi_modal_projector(out.tokens)  # (B, K, C_llm)
        return image_output(out.tokens, list(features))


class VisionZipLlavaForConditionalGeneration(
    PruningPretrainedMixin, SelectionPretrainedMixin, LlavaForConditionalGeneration
):
    """``LlavaForConditionalGeneration`` with VisionZip: ``from_pretrained(id, visionzip=VisionZipConfig(...))``, or
    any encoder-side method: ``from_pretrained(id, method=VisionZipConfig(...) | DivPruneConfig(...) | ...)``.

    The budget is per image and stored in ``config.visionzip`` (a selection in ``config.token_selection``);
    :meth:`set_visionzip`, :meth:`set_selection` and :meth:`set_method` change it (None: off).
    """

    def __init__(self, config: Any) -> None:
        self._build_with_inner(config, LlavaPreTrainedModel, VisionZipLlavaModel)

    def image_token_counts(self, pixel_values: torch.Tensor, image_sizes: Any) -> list[int]:
        """``tokens`` placeholders for each of the (B, 3, H, W) images under the method in use."""
        return [self.method_config.tokens] * pixel_values.shape[0]


class VisionZipLlavaProcessor(SelectionProcessorMixin, LlavaProcessor):
    """``LlavaProcessor`` that expands each ``<image>`` into ``dominant + contextual`` placeholders with VisionZip, or
    ``tokens`` with a selection (``visionzip=``/``token_selection=`` in ``__init__``, ``method=`` or ``visionzip=``
    in ``from_pretrained``, saved in ``processor_config.json``)."""

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        cfg = self.method_config
        if cfg is None:
            return super().replace_image_token(image_inputs, image_idx, **kwargs)
        return self.image_token * cfg.tokens

    def _get_num_multimodal_tokens(self, image_sizes: list | None = None, **kwargs: Any) -> MultiModalData:
        cfg = self.method_config
        if cfg is None or image_sizes is None:
            return super()._get_num_multimodal_tokens(image_sizes, **kwargs)
        count = len(image_sizes)
        return MultiModalData(num_image_tokens=[cfg.tokens] * count, num_image_patches=[1] * count)


# llava-hf checkpoints load into these classes with the parents' key renamings (and save in that layout)
share_weight_conversions(VisionZipLlavaModel, LlavaModel)
share_weight_conversions(VisionZipLlavaForConditionalGeneration, LlavaForConditionalGeneration)

__all__ = ["VisionZipLlavaForConditionalGeneration", "VisionZipLlavaModel", "VisionZipLlavaProcessor"]
