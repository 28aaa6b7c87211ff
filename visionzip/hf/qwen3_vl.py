"""VisionZip for transformers' Qwen3-VL, Qwen3-VL-MoE, Qwen3.5 and Qwen3.5-MoE (images and videos, batched).

What the transformers 5.23 model files fix, and how each is handled (the rest is :mod:`visionzip.hf.qwen2_vl`'s):

- **Scores.** The vision tower is a ViT with 2-D rotary embeddings and *no windowed attention*: every block attends
  within an image or one video frame group (``cu_seqlens`` from the grid), as Qwen2-VL's. The last block's
  attention scores the patches (the attention each patch receives, mean over heads, summed over its segment's
  queries, computed ``query_chunk`` queries at a time with the model's own rotary function, no T x T map, any
  attention implementation); the 2x2 groups are the PatchMerger's (``spatial_merge_size**2`` consecutive patches,
  laid out block-major by the tower), so the merged score and key are the group means. Qwen3.5's tower is the same
  without DeepStack.
- **DeepStack (Qwen3-VL).** The tower also returns one (M, C_llm) feature map per ``deepstack_visual_indexes``
  block, made by its own PatchMerger from the same 2x2 groups, and the LLM adds level i to the hidden states of its
  layer i at the visual positions. All levels are compressed with *one* selection: they are concatenated with the
  main features along the channels before :func:`visionzip.core.compress` (dominant tokens are gathered and
  contextual tokens merged channel by channel, so every level gets the same kept indices and the same groups) and
  split after; the output's ``deepstack_features`` then lines up with the compressed placeholders.
- **Positions.** Qwen3-VL's M-RoPE interleaves the t/h/w frequencies (inside the rotary module) and numbers an
  image from its start position, the text after it from ``start + max(h, w) / 2``. A video is written as one run
  per frame group, each behind a ``<t seconds>`` timestamp in text, and ``get_rope_index`` numbers every frame
  group as a one-frame image: here each frame group is its own placeholder run (grid (1, h, w)); the kept tokens
  take the positions the parent gives the vanilla sequence, contextual tokens their merge target's, the text and
  decoded tokens theirs (``rope_deltas`` counted from the shorter sequence).
- **Qwen3.5** (natively multimodal) has the same seam: ``get_image_features`` runs ``model.visual`` and splits its
  merged output per item. Its hybrid language model (Gated DeltaNet linear attention in three of every four layers,
  full attention in the fourth) changes nothing here: the linear layers take no positions and keep a fixed-size
  recurrent state, so VisionZip shortens their prefill but only the full-attention layers' KV cache shrinks with
  the visual tokens (the bench counts those).
- **MoE variants** share the vision tower and the position code: the same mixins on their parent classes.

    model = VisionZipQwen3VLForConditionalGeneration.from_pretrained(id, visionzip=QwenVisionZipConfig(0.65, 0.05))
    processor = VisionZipQwen3VLProcessor.from_pretrained(id, visionzip=model.visionzip_config)

With ``visionzip=None`` the classes are exactly their parents.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from transformers import (
    Qwen3_5ForConditionalGeneration,
    Qwen3_5Model,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3_5MoeModel,
    Qwen3VLForConditionalGeneration,
    Qwen3VLModel,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLMoeModel,
    Qwen3VLProcessor,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen3_5 import modeling_qwen3_5
from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe
from transformers.models.qwen3_vl import modeling_qwen3_vl
from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe

from visionzip.config import QwenVisionZipConfig
from visionzip.hf.common import VisionZipPretrainedMixin, share_weight_conversions
from visionzip.hf.qwen2_vl import (
    VIDEO,
    VisionZipQwenVisionOutput,
    _VisionZipQwenGeneration,
    _VisionZipQwenModel,
    _VisionZipQwenProcessor,
)


class _VisionZipQwen3Model(_VisionZipQwenModel):
    """What the Qwen3 families change in :class:`visionzip.hf.qwen2_vl._VisionZipQwenModel`: DeepStack levels
    compressed with the main features, and a video's frame groups as separate placeholder runs."""

    def _levels(self, out: BaseModelOutputWithPooling) -> list[torch.Tensor]:
        """The merger's (sum M, C_llm) output, then each DeepStack level's (Qwen3-VL; none on Qwen3.5)."""
        return [out.pooler_output, *(getattr(out, "deepstack_features", None) or [])]

    def _placeholder_runs(
        self, out: VisionZipQwenVisionOutput | None, kind: int
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Images: one run each. Videos: one run per frame group (the processor puts a timestamp between them), with
        grid (1, h, w) and the group's own token sources, as the parent's ``get_rope_index`` splits the grids."""
        runs = super()._placeholder_runs(out, kind)
        if kind != VIDEO:
            return runs
        return _frame_runs(runs, self.config.vision_config.spatial_merge_size**2)


def _frame_runs(
    runs: Iterator[tuple[int, torch.Tensor, torch.Tensor]], unit: int
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Each video's (number, (t, h, w) grid, sources) as t runs (number, (1, h, w), sources within the frame)."""
    for number, grid, sources in runs:
        t, h, w = (int(v) for v in grid)
        per_frame = h * w // unit
        if sources.numel() % t:
            raise ValueError(f"a video of {t} frame groups kept {sources.numel()} tokens, not a multiple of {t}")
        frame_grid = torch.tensor([1, h, w], dtype=grid.dtype, device=grid.device)
        for frame, part in enumerate(sources.split(sources.numel() // t)):
            yield number, frame_grid, part - frame * per_frame


class VisionZipQwen3VLModel(_VisionZipQwen3Model, Qwen3VLModel):
    """``Qwen3VLModel`` whose image and video features (main and DeepStack) are compressed when
    ``config.visionzip`` is set."""

    _rotary = staticmethod(modeling_qwen3_vl.apply_rotary_pos_emb_vision)


class VisionZipQwen3VLMoeModel(_VisionZipQwen3Model, Qwen3VLMoeModel):
    """``Qwen3VLMoeModel`` with VisionZip (the same vision tower as Qwen3-VL)."""

    _rotary = staticmethod(modeling_qwen3_vl_moe.apply_rotary_pos_emb_vision)


class VisionZipQwen3_5Model(_VisionZipQwen3Model, Qwen3_5Model):
    """``Qwen3_5Model`` with VisionZip (a Qwen3-VL tower without DeepStack; hybrid language model)."""

    _rotary = staticmethod(modeling_qwen3_5.apply_rotary_pos_emb_vision)


class VisionZipQwen3_5MoeModel(_VisionZipQwen3Model, Qwen3_5MoeModel):
    """``Qwen3_5MoeModel`` with VisionZip."""

    _rotary = staticmethod(modeling_qwen3_5_moe.apply_rotary_pos_emb_vision)


class VisionZipQwen3VLForConditionalGeneration(
    _VisionZipQwenGeneration, VisionZipPretrainedMixin, Qwen3VLForConditionalGeneration
):
    """``Qwen3VLForConditionalGeneration`` with VisionZip: ``from_pretrained(id, visionzip=QwenVisionZipConfig())``."""

    def __init__(self, config: Any) -> None:
        self._build_with_inner(config, modeling_qwen3_vl.Qwen3VLPreTrainedModel, VisionZipQwen3VLModel)


class VisionZipQwen3VLMoeForConditionalGeneration(
    _VisionZipQwenGeneration, VisionZipPretrainedMixin, Qwen3VLMoeForConditionalGeneration
):
    """``Qwen3VLMoeForConditionalGeneration`` with VisionZip."""

    def __init__(self, config: Any) -> None:
        self._build_with_inner(config, modeling_qwen3_vl_moe.Qwen3VLMoePreTrainedModel, VisionZipQwen3VLMoeModel)


class VisionZipQwen3_5ForConditionalGeneration(
    _VisionZipQwenGeneration, VisionZipPretrainedMixin, Qwen3_5ForConditionalGeneration
):
    """``Qwen3_5ForConditionalGeneration`` with VisionZip."""

    def __init__(self, config: Any) -> None:
        self._build_with_inner(config, modeling_qwen3_5.Qwen3_5PreTrainedModel, VisionZipQwen3_5Model)


class VisionZipQwen3_5MoeForConditionalGeneration(
    _VisionZipQwenGeneration, VisionZipPretrainedMixin, Qwen3_5MoeForConditionalGeneration
):
    """``Qwen3_5MoeForConditionalGeneration`` with VisionZip."""

    def __init__(self, config: Any) -> None:
        self._build_with_inner(config, modeling_qwen3_5_moe.Qwen3_5MoePreTrainedModel, VisionZipQwen3_5MoeModel)


class VisionZipQwen3VLProcessor(_VisionZipQwenProcessor, Qwen3VLProcessor):
    """``Qwen3VLProcessor`` (the processor of all four families) whose placeholder runs match VisionZip's
    compressed features: an image's run, and each frame group's run of a video (timestamps kept)."""

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs: Any) -> str:
        # the parent's text (timestamps, one <|vision_start|>run<|vision_end|> per frame group), runs shortened
        text = Qwen3VLProcessor.replace_video_token(self, video_inputs, video_idx, **kwargs)
        cfg = self.visionzip_config
        if cfg is None:
            return text
        _, h, w = (int(v) for v in video_inputs["video_grid_thw"][video_idx])
        merged = h * w // self.video_processor.merge_size**2
        vanilla = self.vision_start_token + self.video_token * merged + self.vision_end_token
        kept = self.vision_start_token + self.video_token * sum(cfg.counts(merged)) + self.vision_end_token
        return text.replace(vanilla, kept)


# Qwen3 checkpoints load into these classes with the parents' key renamings (and save in that layout)
for _ours, _parent in (
    (VisionZipQwen3VLModel, Qwen3VLModel),
    (VisionZipQwen3VLForConditionalGeneration, Qwen3VLForConditionalGeneration),
    (VisionZipQwen3VLMoeModel, Qwen3VLMoeModel),
    (VisionZipQwen3VLMoeForConditionalGeneration, Qwen3VLMoeForConditionalGeneration),
    (VisionZipQwen3_5Model, Qwen3_5Model),
    (VisionZipQwen3_5ForConditionalGeneration, Qwen3_5ForConditionalGeneration),
    (VisionZipQwen3_5MoeModel, Qwen3_5MoeModel),
    (VisionZipQwen3_5MoeForConditionalGeneration, Qwen3_5MoeForConditionalGeneration),
):
    share_weight_conversions(_ours, _parent)

__all__ = [
    "QwenVisionZipConfig",
    "VisionZipQwen3VLForConditionalGeneration",
    "VisionZipQwen3VLModel",
    "VisionZipQwen3VLMoeForConditionalGeneration",
    "VisionZipQwen3VLMoeModel",
    "VisionZipQwen3VLProcessor",
    "VisionZipQwen3_5ForConditionalGeneration",
    "VisionZipQwen3_5Model",
    "VisionZipQwen3_5MoeForConditionalGeneration",
    "VisionZipQwen3_5MoeModel",
]
