"""VisionZip for transformers' ``LlavaOnevisionForConditionalGeneration`` (SigLIP, images and video) and its processor.

SigLIP has no [CLS]: every view's tokens are scored by the attention they receive at ``vision_feature_layer`` (-1 in
the OneVision checkpoints), averaged over heads and queries and computed chunk by chunk
(``VisionZipConfig(..., layer=-1, cls_token=False)``). The released VisionZip code has no OneVision; these are our
choices:

- **Budget**: ``dominant + contextual`` tokens for every view of an image and for every video frame, one budget for
  both (as per view for NeXT): ``VisionZipConfig(54, 10, layer=-1, cls_token=False)`` keeps 64 of a view's 729
  tokens (384 px, patch 14) and 64 of a frame's 729, where the parent keeps 196 per frame after pooling.
- **Single image** (``anyres_max_9``): the base view and its nh x nw crops, each compressed on its own, laid out as
  for NeXT (:func:`visionzip.anyres.visionzip_layout`, the released code's multi-crop order): the base view's tokens,
  then every crop's dominant tokens in the raster order of the stitched crop grid, then all crops' contextual
  tokens; then one ``image_newline``. The kept tokens are not a grid, so there is no unpadding, no newline per row
  and no bilinear downsampling of the crops (the count is already V * (dominant + contextual));
  ``vision_aspect_ratio`` is not read.
- **Multi-image** (a prompt with several ``<image>``): the base view only, as the parent: its tokens, then one
  ``image_newline``, as the parent ends every multi-image view.
- **Video**: every frame compressed on its own, *instead of* the parent's 2x2 bilinear pooling, and the frames'
  tokens concatenated, then one ``image_newline`` (as the parent ends a video). Instead, not before: pooled tokens
  were never attended to by the encoder, so they have no attention score, and after compression the kept tokens are
  no longer a grid to pool.
- Tokens per view and per frame: dominant ones in ascending patch order, then contextual ones.
  ``vision_feature_select_strategy`` is not read: every SigLIP token is a candidate (the checkpoints say ``"full"``).

The processor counts, per ``<image>``, V * (dominant + contextual) + 1 (V = 1 + nh * nw from the image's size, or
1 in a multi-image prompt) and, per ``<video>``, frames * (dominant + contextual) + 1, so mixed sizes, multi-image
prompts, videos, batches and left padding work as in transformers. With ``visionzip=None`` both classes are exactly
their parents.

    cfg = VisionZipConfig(54, 10, layer=-1, cls_token=False)
    model = VisionZipLlavaOnevisionForConditionalGeneration.from_pretrained(id, visionzip=cfg)
    processor = VisionZipLlavaOnevisionProcessor.from_pretrained(id, visionzip=model.visionzip_config)
    out = model.generate(**processor(images=image, text=prompt, return_tensors="pt"), max_new_tokens=32)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel, LlavaOnevisionProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionPreTrainedModel
from transformers.processing_utils import MultiModalData
from transformers.utils.generic import can_return_tuple

from visionzip.anyres import Grid, compress_anyres
from visionzip.config import VisionZipConfig
from visionzip.encode import encode
from visionzip.hf.common import (
    VisionZipPretrainedMixin,
    VisionZipProcessorMixin,
    check_call_layer,
    image_output,
    saved_visionzip,
    share_weight_conversions,
    view_encoder,
    view_prefix,
)
from visionzip.hf.llava_next import anyres_grid, num_views, view_side


def image_grids(
    image_sizes: Sequence[Any], batch_num_images: Sequence[Any] | None, grid_pinpoints: list, view_size: int
) -> list[Grid | None]:
    """The crop grid of each image (sizes (height, width)), or None for an image of a multi-image prompt (its base
    view only), as the parent decides: a prompt with one image is split into crops, a prompt with several is not;
    no counts: all split."""
    if batch_num_images is None:
        split = [True] * len(image_sizes)
    else:
        split = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
    if len(split) != len(image_sizes):
        raise ValueError(f"batch_num_images adds up to {len(split)} images, image_sizes has {len(image_sizes)}")
    pairs = zip(image_sizes, split, strict=True)
    return [anyres_grid(size, grid_pinpoints, view_size) if crops else None for size, crops in pairs]


def in_multi_image_prompt(batch_num_images: Sequence[Any], image_index: int) -> bool:
    """Whether image ``image_index`` (counted over the batch) belongs to a prompt with more than one image."""
    start = 0
    for count in batch_num_images:
        if image_index < start + int(count):
            return int(count) != 1
        start += int(count)
    raise ValueError(f"image {image_index} is beyond the {start} images of batch_num_images")


class VisionZipLlavaOnevisionModel(LlavaOnevisionModel):
    """``LlavaOnevisionModel`` whose ``get_image_features`` and ``get_video_features`` compress every view and every
    frame when ``config.visionzip`` is set, laid out as the module docstring says."""

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None, vision_feature_select_strategy: str | None = None,
        vision_aspect_ratio: str | None = None, batch_num_images: torch.LongTensor | None = None, **kwargs: Any,
    ) -> BaseModelOutputWithPooling:  # fmt: skip
        """(N, V_max, 3, S, S) or (sum V_i, 3, S, S) pixels, (N, 2) sizes (height, width) and the images per prompt
        -> ``pooler_output``: N tensors (n_i, C_llm); with VisionZip n_i = V_i * (dominant + contextual) + 1."""
        cfg = saved_visionzip(self.config)
        if cfg is None:
            return super().get_image_features(
                pixel_values, image_sizes, vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy, vision_aspect_ratio=vision_aspect_ratio,
                batch_num_images=batch_num_images, **kwargs,
            )  # fmt: skip
        check_call_layer(self.config, cfg, vision_feature_layer)
        vision = self.config.vision_config
        grids = image_grids(image_sizes, batch_num_images, self.config.image_grid_pinpoints, vision.image_size)
        # per image (V_i * K, C_llm); an image of a multi-image prompt: its base view's (K, C_llm)
        out = compress_anyres(
            pixel_values, grids, view_encoder(self.vision_tower, cfg), self.multi_modal_projector,
            vision.image_size // vision.patch_size, cfg.dominant, view_prefix(self.vision_tower),
        )  # fmt: skip
        return image_output(out.encoder_tokens, [self._end_with_newline(packed) for packed in out.features])

    @can_return_tuple
    def get_video_features(
        self, pixel_values_videos: torch.Tensor, vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None, **kwargs: Any,
    ) -> BaseModelOutputWithPooling:  # fmt: skip
        """(B, F, 3, S, S) frames -> ``pooler_output`` (B, L, C_llm); with VisionZip L = F * (dominant + contextual)
        + 1: each frame's tokens in frame order, then ``image_newline``."""
        cfg = saved_visionzip(self.config)
        if cfg is None:
            return super().get_video_features(
                pixel_values_videos, vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy, **kwargs,
            )  # fmt: skip
        check_call_layer(self.config, cfg, vision_feature_layer)
        if pixel_values_videos.dim() != 5:
            raise ValueError(f"pixel_values_videos must be (B, F, 3, S, S), got {tuple(pixel_values_videos.shape)}")
        batch, frames = pixel_values_videos.shape[:2]
        out = encode(self.vision_tower, pixel_values_videos.flatten(0, 1), cfg)  # tokens: (B * F, K, C_vision)
        projected = self.multi_modal_projector(out.tokens).reshape(batch, frames * cfg.tokens, -1)  # (B, F * K, C)
        newline = self.image_newline[None, None].expand(batch, 1, -1).to(projected)  # (B, 1, C_llm)
        features = torch.cat([projected, newline], dim=1)  # (B, F * K + 1, C_llm)
        return BaseModelOutputWithPooling(last_hidden_state=out.tokens, pooler_output=features)

    def _end_with_newline(self, tokens: torch.Tensor) -> torch.Tensor:
        """(L, C_llm) -> (L + 1, C_llm): ``image_newline`` appended."""
        return torch.cat([tokens, self.image_newline[None].to(tokens)])


class VisionZipLlavaOnevisionForConditionalGeneration(VisionZipPretrainedMixin, LlavaOnevisionForConditionalGeneration):
    """``LlavaOnevisionForConditionalGeneration`` with VisionZip per view and per frame:
    ``from_pretrained(id, visionzip=VisionZipConfig(54, 10, layer=-1, cls_token=False))``."""

    def __init__(self, config: Any) -> None:
        self._build_with_inner(config, LlavaOnevisionPreTrainedModel, VisionZipLlavaOnevisionModel)


class VisionZipLlavaOnevisionProcessor(VisionZipProcessorMixin, LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` that expands ``<image>`` and ``<video>`` into the compressed counts (module
    docstring); ``visionzip=`` in ``__init__``/``from_pretrained``, saved in ``processor_config.json``."""

    def __init__(
        self, image_processor: Any = None, tokenizer: Any = None, video_processor: Any = None,
        num_image_tokens: int | None = None, vision_feature_select_strategy: str | None = None,
        chat_template: str | None = None, image_token: str = "<image>", video_token: str = "<video>",
        vision_aspect_ratio: str = "anyres_max_9", visionzip: VisionZipConfig | dict | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        # The mixin's __init__ takes LlavaProcessor's arguments; OneVision's differ, so its parent is called directly.
        self._store_budget(visionzip)
        LlavaOnevisionProcessor.__init__(
            self, image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
            num_image_tokens=num_image_tokens, vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template, image_token=image_token, video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio, **kwargs,
        )  # fmt: skip

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        cfg = self.visionzip_config
        if cfg is None:
            return super().replace_image_token(image_inputs, image_idx, **kwargs)
        views = 1
        if not in_multi_image_prompt(image_inputs["batch_num_images"], image_idx):
            view_size = image_inputs["pixel_values"][0][0].shape[-1]
            pinpoints = self.image_processor.image_grid_pinpoints
            views = num_views(image_inputs["image_sizes"][image_idx], pinpoints, view_size)
        return self.image_token * (views * cfg.tokens + 1)

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs: Any) -> str:
        cfg = self.visionzip_config
        if cfg is None:
            return super().replace_video_token(video_inputs, video_idx, **kwargs)
        frames = len(video_inputs["pixel_values_videos"][video_idx])
        return self.video_token * (frames * cfg.tokens + 1)

    def _get_num_multimodal_tokens(
        self, image_sizes: list | None = None, video_sizes: list | None = None, **kwargs: Any
    ) -> MultiModalData:
        """Placeholders per image (each alone in its prompt, as the parent assumes) and per (frames, height, width)
        video."""
        cfg = self.visionzip_config
        if cfg is None:
            return super()._get_num_multimodal_tokens(image_sizes=image_sizes, video_sizes=video_sizes, **kwargs)
        data = {}
        if image_sizes is not None:
            pinpoints, view_size = self.image_processor.image_grid_pinpoints, view_side(self.image_processor)
            data["num_image_tokens"] = [num_views(size, pinpoints, view_size) * cfg.tokens + 1 for size in image_sizes]
            data["num_image_patches"] = [1] * len(image_sizes)
        if video_sizes is not None:
            data["num_video_tokens"] = [frames * cfg.tokens + 1 for frames, _, _ in video_sizes]
        return MultiModalData(**data)


# llava-hf checkpoints load into these classes with the parents' key renamings (and save in that layout)
share_weight_conversions(VisionZipLlavaOnevisionModel, LlavaOnevisionModel)
share_weight_conversions(VisionZipLlavaOnevisionForConditionalGeneration, LlavaOnevisionForConditionalGeneration)

__all__ = [
    "VisionZipLlavaOnevisionForConditionalGeneration",
    "VisionZipLlavaOnevisionModel",
    "VisionZipLlavaOnevisionProcessor",
    "image_grids",
    "in_multi_image_prompt",
]
