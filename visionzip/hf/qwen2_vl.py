"""VisionZip for transformers' Qwen2-VL and Qwen2.5-VL (images and videos, batched) by subclassing.

The method as the released Qwen2.5-VL code defines it (paper Sec. 3 on a tower without [CLS]):

- Scores come from the last vision block: the attention each patch *receives*, averaged over heads and summed over
  the queries of its attention segment (``cu_seqlens``: an image, a video frame group, or a window when that block
  uses window attention), then averaged over each 2x2 PatchMerger group; keys are averaged over heads and over the
  same groups. Qwen2.5-VL runs its blocks in window order: scores and keys are put back in raster order as the
  merged features are.
- Selection and merging act after the PatchMerger, on the LLM-space tokens of every segment (an image, or one
  temporal patch of a video): :func:`visionzip.core.compress` with ``cls_token=False``.
- M-RoPE: a dominant token keeps its (t, h, w) position, a contextual token takes its merge target's, the text after
  an image keeps its vanilla positions, and decoding continues at the vanilla positions (the released code's unpruned
  ``rope_deltas``, here counted from the shorter sequence: ``rope_deltas = vanilla max position + 1 - pruned length``).

Scores are computed without a dense T x T map: forward hooks on the last block (removed when done) take the ``qkv``
projection and the block's ``cu_seqlens`` and rotary tables; the queries and keys are rotated with the model's own
function and the received attention is computed ``query_chunk`` queries at a time (O(H x chunk x T) memory), while
every block runs with the model's attention implementation (SDPA, FlashAttention, eager). The budget is
:class:`visionzip.config.QwenVisionZipConfig` and the scores :func:`visionzip.capture.merged_scores_and_keys`; this
file only connects them to transformers' classes.

    model = VisionZipQwen2_5_VLForConditionalGeneration.from_pretrained(id, visionzip=QwenVisionZipConfig(0.65, 0.05))
    processor = VisionZipQwen2_5_VLProcessor.from_pretrained(id, visionzip=model.visionzip_config)
    out = model.generate(**processor(images=image, text=prompt, return_tensors="pt"), max_new_tokens=32)

With ``visionzip=None`` the classes are exactly their parents.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2_5_VLProcessor,
    Qwen2VLForConditionalGeneration,
    Qwen2VLModel,
    Qwen2VLProcessor,
)
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
from transformers.models.qwen2_vl import modeling_qwen2_vl
from transformers.processing_utils import MultiModalData
from transformers.utils import is_torchvision_available
from transformers.utils.generic import can_return_tuple
from transformers.vision_utils import get_vision_window_index

from visionzip.capture import capture_outputs, merged_scores_and_keys
from visionzip.config import QwenVisionZipConfig
from visionzip.core import compress, token_positions
from visionzip.hf.common import (
    CONFIG_KEY,
    BudgetProcessorMixin,
    VisionZipPretrainedMixin,
    as_budget,
    share_weight_conversions,
)

TEXT, IMAGE, VIDEO = 0, 1, 2  # mm_token_type_ids values


def as_qwen_config(value: QwenVisionZipConfig | dict | None) -> QwenVisionZipConfig | None:
    """A budget from what users pass or configs store: a :class:`QwenVisionZipConfig`, its dict, or None (off)."""
    return as_budget(value, QwenVisionZipConfig)


def _hook_last_block(attn: nn.Module, store: dict[str, Any]) -> torch.utils.hooks.RemovableHandle:
    """Keep the ``cu_seqlens`` and rotary tables the last block's attention is called with (a forward pre-hook)."""

    def keep(_module: nn.Module, _args: tuple, kwargs: dict[str, Any]) -> None:
        store["cu_seqlens"], store["rotary"] = kwargs["cu_seqlens"], kwargs["position_embeddings"]

    return attn.register_forward_pre_hook(keep, with_kwargs=True)


@dataclass
class VisionZipQwenVisionOutput(BaseModelOutputWithPooling):
    """``get_image_features`` / ``get_video_features`` with VisionZip.

    Attributes:
        last_hidden_state: (S, C_vision) the last block's output, as the parent returns it.
        pooler_output: one (K_i, C_llm) tensor per image / video: per segment its dominant tokens in raster order,
            then its contextual tokens; segments (video frame groups) in temporal order.
        token_sources: one (K_i,) int64 tensor per item: the index, among the item's t * h * w / 4 merged tokens in
            raster order, each output token stands at (a contextual token: its merge target).
        merged_scores: one (t * h * w / 4,) fp32 tensor per item: the score of every merged token, raster order.
        grid_thw: (num_items, 3) the grids these were made from.
        deepstack_features: Qwen3-VL only (None otherwise): per DeepStack level, one (K_i, C_llm) tensor per item,
            selected and merged with the same indices and groups as ``pooler_output``.
    """

    token_sources: tuple[torch.Tensor, ...] | None = None
    merged_scores: tuple[torch.Tensor, ...] | None = None
    grid_thw: torch.Tensor | None = None
    deepstack_features: list[tuple[torch.Tensor, ...]] | None = None


# --- the model ---------------------------------------------------------------------------------------------------


class _VisionZipQwenModel:
    """What the VisionZip ``Qwen2VLModel`` / ``Qwen2_5_VLModel`` add: compressed image and video features and the
    M-RoPE positions of the kept tokens. Placed before the parent in the bases."""

    _rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # the modeling module's apply_rotary_pos_emb_vision

    @property
    def visionzip_config(self) -> QwenVisionZipConfig | None:
        """The budget in use (``config.visionzip``, shared with the outer model), or None when VisionZip is off."""
        return as_qwen_config(getattr(self.config, CONFIG_KEY, None))

    def _raster_order(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Indices that put merged tokens from the blocks' order back in raster order; None: already raster."""
        return None

    def _levels(self, out: BaseModelOutputWithPooling) -> list[torch.Tensor]:
        """The (sum M, C_llm) feature maps compressed with one selection, raster order: here the merger's output
        (Qwen3-VL adds its DeepStack levels)."""
        return [out.pooler_output]

    def _placeholder_runs(
        self, out: VisionZipQwenVisionOutput | None, kind: int
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(item number, grid (3,), token sources (K,)) of each placeholder run of ``kind`` in the prompt, in order:
        one run per image or video (Qwen3-VL splits videos into one run per frame group)."""
        return _items(out)

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor | None = None, **kwargs: Any
    ) -> BaseModelOutputWithPooling:
        """Flattened patches (S, C * t * p * p) and (num_images, 3) grids -> one (K_i, C_llm) tensor per image."""
        cfg = self.visionzip_config
        if cfg is None:
            return super().get_image_features(pixel_values, image_grid_thw, **kwargs)
        return self._visionzip_features(pixel_values, image_grid_thw, cfg, **kwargs)

    @can_return_tuple
    def get_video_features(
        self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.LongTensor | None = None, **kwargs: Any
    ) -> BaseModelOutputWithPooling:
        """As :meth:`get_image_features`, for videos: every temporal patch keeps its own budget."""
        cfg = self.visionzip_config
        if cfg is None:
            return super().get_video_features(pixel_values_videos, video_grid_thw, **kwargs)
        return self._visionzip_features(pixel_values_videos, video_grid_thw, cfg, **kwargs)

    def _visionzip_features(
        self, pixels: torch.Tensor, grid_thw: torch.Tensor, cfg: QwenVisionZipConfig, **kwargs: Any
    ) -> VisionZipQwenVisionOutput:
        """Run the tower once (hooks on its last block), score its merged tokens, compress every segment."""
        visual = self.visual
        attn, seen = visual.blocks[-1].attn, {}
        handle = _hook_last_block(attn, seen)
        try:
            with capture_outputs(qkv=attn.qkv) as projected:
                out = visual(pixels.type(visual.dtype), grid_thw=grid_thw, **kwargs)
        finally:
            handle.remove()
        s = projected["qkv"].shape[0]
        queries, keys, _ = projected["qkv"].reshape(s, 3, attn.num_heads, -1).unbind(1)  # (S, H, Dh) each
        queries, keys = type(self)._rotary(queries, keys, *seen["rotary"])
        scores, keys = merged_scores_and_keys(
            queries, keys, seen["cu_seqlens"], attn.scaling, cfg.query_chunk, visual.spatial_merge_size**2
        )  # (S / 4,), (S / 4, Dh)
        order = self._raster_order(grid_thw)
        if order is not None:
            order = order.to(scores.device)
            scores, keys = scores[order], keys[order]
        return self._compress_segments(out, scores, keys, grid_thw, cfg)

    def _compress_segments(
        self, out: BaseModelOutputWithPooling, scores: torch.Tensor, keys: torch.Tensor, grid_thw: torch.Tensor,
        cfg: QwenVisionZipConfig,
    ) -> VisionZipQwenVisionOutput:  # fmt: skip
        """Compress each segment (image / frame group) of the merged tokens; segments of one size in one call."""
        unit = self.visual.spatial_merge_size**2
        grids = [tuple(int(v) for v in g) for g in grid_thw.tolist()]
        sizes = [h * w // unit for t, h, w in grids for _ in range(t)]  # merged tokens per segment
        levels = self._levels(out)  # each (sum M, C_llm), raster order
        merged = torch.cat(levels, dim=-1)  # (sum M, L * C_llm): merging acts per channel, so one selection for all
        parts = [p.split(sizes) for p in (merged, scores, keys)]
        tokens: list[torch.Tensor | None] = [None] * len(sizes)
        sources: list[torch.Tensor | None] = [None] * len(sizes)
        for size, group in itertools.groupby(sorted(range(len(sizes)), key=sizes.__getitem__), key=sizes.__getitem__):
            members = list(group)
            seg_cfg = cfg.segment_config(size)
            hidden, score, key = (torch.stack([p[i] for i in members]) for p in parts)  # (G, M, ...)
            content = hidden[..., : levels[0].shape[-1]]  # selection="random" draws from the main features
            kept, keep = compress(hidden, score, key, seg_cfg, content=content)  # (G, K, L * C_llm), (G, D)
            where = token_positions(keep, size, seg_cfg.contextual)  # (G, K)
            for row, index in enumerate(members):
                tokens[index], sources[index] = kept[row], where[row]
        widths = [level.shape[-1] for level in levels]
        return _item_output(out, tokens, sources, scores, grids, sizes, grid_thw, widths)

    def visionzip_rope_index(
        self, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor, attention_mask: torch.Tensor | None,
        images: VisionZipQwenVisionOutput | None, videos: VisionZipQwenVisionOutput | None,
        second_per_grid_ts: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """3-D M-RoPE positions of a compressed sequence: every token the position it has in the vanilla sequence.

        Each row is expanded back to its vanilla length (every vision run to t * h * w / 4 tokens), the parent's
        ``get_rope_index`` numbers it, and each kept token takes the position of the token it stands at.

        Args:
            input_ids, mm_token_type_ids: (B, L) with the compressed placeholder runs; attention_mask: (B, L) or None.
            images, videos: what :meth:`get_image_features` / :meth:`get_video_features` returned with VisionZip.

        Returns:
            positions: (3, B, L) (0 at padding, as the parent); rope_deltas: (B, 1), so that decoding continues at
            the vanilla positions: vanilla max position + 1 - compressed length of the row.
        """
        b, length = input_ids.shape
        positions = torch.zeros(3, b, length, dtype=input_ids.dtype, device=input_ids.device)
        items = {IMAGE: self._placeholder_runs(images, IMAGE), VIDEO: self._placeholder_runs(videos, VIDEO)}
        unit, deltas = self.config.vision_config.spatial_merge_size**2, []
        for row in range(b):
            real = torch.ones_like(input_ids[row], dtype=torch.bool) if attention_mask is None else attention_mask[row]
            real = real.bool()
            types, index, grids, video_ids = _expand_row(mm_token_type_ids[row][real].tolist(), items, unit)
            timing = None if second_per_grid_ts is None or not video_ids else [second_per_grid_ts[i] for i in video_ids]
            full, delta = self.get_rope_index(
                torch.zeros(1, len(types), dtype=input_ids.dtype, device=input_ids.device),
                mm_token_type_ids=torch.tensor([types], device=input_ids.device),
                image_grid_thw=_stack(grids[IMAGE], input_ids.device),
                video_grid_thw=_stack(grids[VIDEO], input_ids.device),
                second_per_grid_ts=timing,
                attention_mask=None,
            )  # (3, 1, L_vanilla), (1, 1)
            positions[:, row, real] = full[:, 0, index.to(input_ids.device)]
            deltas.append(delta.reshape(()) + len(types) - int(real.sum()))
        return positions, torch.stack(deltas).unsqueeze(1)

    def forward(
        self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None, past_key_values: Any = None, *,
        pixel_values: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None, video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None, mm_encoder_outputs: dict | None = None, **kwargs: Any,
    ) -> Any:  # fmt: skip
        """The parent's ``forward``; with VisionZip, images and videos are encoded first so that the positions of
        the kept tokens (:meth:`visionzip_rope_index`) can be given to it."""
        past = 0 if past_key_values is None else past_key_values.get_seq_length()
        has_pixels = pixel_values is not None or pixel_values_videos is not None
        if self.visionzip_config is not None and has_pixels and position_ids is None and past == 0:
            if input_ids is None or mm_token_type_ids is None:
                raise ValueError("VisionZip needs input_ids and mm_token_type_ids (the processor returns both)")
            mm_encoder_outputs = dict(mm_encoder_outputs or {})
            if pixel_values is not None:
                mm_encoder_outputs["image"] = self.get_image_features(pixel_values, image_grid_thw, return_dict=True)
            if pixel_values_videos is not None:
                mm_encoder_outputs["video"] = self.get_video_features(
                    pixel_values_videos, video_grid_thw, return_dict=True
                )
            pixel_values = pixel_values_videos = None
            position_ids, self.rope_deltas = self.visionzip_rope_index(
                input_ids, mm_token_type_ids, attention_mask, mm_encoder_outputs.get("image"),
                mm_encoder_outputs.get("video"), kwargs.get("second_per_grid_ts"),
            )  # fmt: skip
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, pixel_values=pixel_values, pixel_values_videos=pixel_values_videos,
            image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw, mm_token_type_ids=mm_token_type_ids,
            mm_encoder_outputs=mm_encoder_outputs, **kwargs,
        )  # fmt: skip


def _item_output(
    out: BaseModelOutputWithPooling, tokens: list, sources: list, scores: torch.Tensor, grids: list, sizes: list,
    grid_thw: torch.Tensor, widths: list[int],
) -> VisionZipQwenVisionOutput:  # fmt: skip
    """Segments back into items (an image: one segment; a video: t), sources offset by frame; the channels of
    the compressed levels (``widths``) split back into the main features and the DeepStack levels."""
    item_tokens, item_sources, item_sizes, first = [], [], [], 0
    for t, _, _ in grids:
        segs = range(first, first + t)
        item_tokens.append(torch.cat([tokens[i] for i in segs]))
        item_sources.append(torch.cat([sources[i] + frame * sizes[i] for frame, i in enumerate(segs)]))
        item_sizes.append(sum(sizes[i] for i in segs))
        first += t
    levels = [item.split(widths, dim=-1) for item in item_tokens]  # per item: L tensors (K_i, C_llm)
    deepstack = [tuple(item[level] for item in levels) for level in range(1, len(widths))]
    return VisionZipQwenVisionOutput(
        last_hidden_state=out.last_hidden_state, pooler_output=tuple(item[0] for item in levels),
        token_sources=tuple(item_sources), merged_scores=tuple(scores.split(item_sizes)), grid_thw=grid_thw,
        deepstack_features=deepstack or None,
    )  # fmt: skip


def _items(out: VisionZipQwenVisionOutput | None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(item number, grid (3,), token sources (K,)) of each image or video, in order."""
    if out is None:
        return iter(())
    if getattr(out, "token_sources", None) is None:
        raise ValueError("VisionZip positions need the features of VisionZip's get_image_features/get_video_features")
    return iter(zip(itertools.count(), out.grid_thw, out.token_sources))


def _expand_row(
    types: list[int], items: dict[int, Iterator], unit: int
) -> tuple[list[int], torch.Tensor, dict, list[int]]:
    """One row's token types expanded to the vanilla layout, and where each compressed token sits in it.

    Returns:
        vanilla token types (L_vanilla), index (L,) into them, the row's grids per modality, its video numbers.
    """
    expanded: list[int] = []
    index: list[torch.Tensor] = []
    grids: dict[int, list[torch.Tensor]] = {IMAGE: [], VIDEO: []}
    video_ids: list[int] = []
    for kind, run in itertools.groupby(types):
        count = len(list(run))
        if kind == TEXT:
            index.append(torch.arange(count) + len(expanded))
            expanded += [TEXT] * count
            continue
        number, grid, source = next(items[kind], (None, None, None))
        if grid is None or source.numel() != count:
            kept = None if source is None else source.numel()
            raise ValueError(
                f"a run of {count} {'image' if kind == IMAGE else 'video'} placeholders does not match the "
                f"{kept} tokens VisionZip kept for that item: use the VisionZip processor with the model's budget"
            )
        index.append(source.cpu() + len(expanded))
        expanded += [kind] * (int(grid.prod()) // unit)  # the vanilla run: every merged token
        grids[kind].append(grid)
        if kind == VIDEO:
            video_ids.append(number)
    return expanded, torch.cat(index), grids, video_ids


def _stack(grids: list[torch.Tensor], device: torch.device) -> torch.Tensor | None:
    """(n, 3) grids, or None when the row has none of that modality."""
    return torch.stack(grids).to(device) if grids else None


class VisionZipQwen2VLModel(_VisionZipQwenModel, Qwen2VLModel):
    """``Qwen2VLModel`` whose image and video features are compressed when ``config.visionzip`` is set."""

    _rotary = staticmethod(modeling_qwen2_vl.apply_rotary_pos_emb_vision)


class VisionZipQwen2_5_VLModel(_VisionZipQwenModel, Qwen2_5_VLModel):
    """``Qwen2_5_VLModel`` with VisionZip: as :class:`VisionZipQwen2VLModel`, scores taken in window order (the
    order its blocks run in) and put back in raster order."""

    _rotary = staticmethod(modeling_qwen2_5_vl.apply_rotary_pos_emb_vision)

    def _raster_order(self, grid_thw: torch.Tensor) -> torch.Tensor:
        visual = self.visual
        window_index, _ = get_vision_window_index(
            grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
            patch_size=visual.patch_size,
        )  # fmt: skip
        return torch.argsort(window_index)  # as the tower orders its merged output


class _VisionZipQwenGeneration:
    """``from_pretrained(..., visionzip=QwenVisionZipConfig(...))``, :meth:`set_visionzip` and generation positions
    for the Qwen classes; placed before :class:`VisionZipPretrainedMixin` and the parent in the bases."""

    budget_class = QwenVisionZipConfig

    def _check_visionzip(self, cfg: QwenVisionZipConfig) -> None:
        """Nothing to check against the encoder: a Qwen budget is fractions (or counts) of each item's merged
        tokens, validated by :class:`QwenVisionZipConfig` itself."""

    def _prepare_position_ids_for_generation(self, inputs_tensor: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
        """The parent's positions; with VisionZip and new pixels, the images and videos are encoded here (generate
        would encode them next) because the kept tokens decide the positions. The features go to
        ``model_kwargs["mm_encoder_outputs"]`` and the pixels leave ``model_kwargs``, so nothing is encoded twice."""
        has_pixels = any(model_kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos"))
        if self.visionzip_config is None or not has_pixels:
            return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)
        if model_kwargs.get("mm_token_type_ids") is None or inputs_tensor.dim() != 2:
            raise ValueError("VisionZip generation needs input_ids and mm_token_type_ids (the processor returns both)")
        text_positions = GenerationMixin._prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs)
        self._prepare_multimodal_encoder_kwargs_for_generation(model_kwargs)  # in place
        encoded = model_kwargs["mm_encoder_outputs"]
        vision_positions, self.model.rope_deltas = self.model.visionzip_rope_index(
            inputs_tensor, model_kwargs["mm_token_type_ids"], model_kwargs.get("attention_mask"), encoded.get("image"),
            encoded.get("video"), model_kwargs.get("second_per_grid_ts"),
        )  # fmt: skip
        return torch.cat([text_positions[None], vision_positions], dim=0)  # (4, B, L) as the parent's


class VisionZipQwen2VLForConditionalGeneration(
    _VisionZipQwenGeneration, VisionZipPretrainedMixin, Qwen2VLForConditionalGeneration
):
    """``Qwen2VLForConditionalGeneration`` with VisionZip: ``from_pretrained(id, visionzip=QwenVisionZipConfig())``."""

    def __init__(self, config: Any) -> None:
        self._build_with_inner(config, modeling_qwen2_vl.Qwen2VLPreTrainedModel, VisionZipQwen2VLModel)


class VisionZipQwen2_5_VLForConditionalGeneration(
    _VisionZipQwenGeneration, VisionZipPretrainedMixin, Qwen2_5_VLForConditionalGeneration
):
    """``Qwen2_5_VLForConditionalGeneration`` with VisionZip (window-attention tower)."""

    def __init__(self, config: Any) -> None:
        self._build_with_inner(config, modeling_qwen2_5_vl.Qwen2_5_VLPreTrainedModel, VisionZipQwen2_5_VLModel)


# --- processors --------------------------------------------------------------------------------------------------


class _VisionZipQwenProcessor(BudgetProcessorMixin):
    """``visionzip`` for a Qwen2-VL / Qwen2.5-VL processor: each image / video placeholder run is as long as the
    compressed features (:meth:`QwenVisionZipConfig.item_tokens`). Saved in ``processor_config.json``; None: the
    parent's count.

    transformers' video processors need torchvision; where it is not installed these processors have no
    ``video_processor`` (images only), as :class:`visionzip.hf.video_llava.VisionZipVideoLlavaProcessor`.
    """

    budget_class = QwenVisionZipConfig

    @classmethod
    def get_attributes(cls) -> list[str]:
        names = super().get_attributes()
        return names if is_torchvision_available() else [n for n in names if n != "video_processor"]

    def __init__(
        self, image_processor: Any = None, tokenizer: Any = None, video_processor: Any = None,
        chat_template: str | None = None, visionzip: QwenVisionZipConfig | dict | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        self._store_budget(visionzip)
        if video_processor is not None and not is_torchvision_available():
            raise ValueError("a video_processor needs torchvision (transformers' video processors require it)")
        super().__init__(image_processor, tokenizer, video_processor, chat_template=chat_template, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        cfg = self.visionzip_config
        if cfg is None:
            return super().replace_image_token(image_inputs, image_idx, **kwargs)
        grid = image_inputs["image_grid_thw"][image_idx]
        return self.image_token * cfg.item_tokens(grid, self.image_processor.merge_size)

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs: Any) -> str:
        cfg = self.visionzip_config
        if cfg is None:
            return super().replace_video_token(video_inputs, video_idx, **kwargs)
        grid = video_inputs["video_grid_thw"][video_idx]
        return self.video_token * cfg.item_tokens(grid, self.video_processor.merge_size)

    def _get_num_multimodal_tokens(self, image_sizes: list | None = None, **kwargs: Any) -> MultiModalData:
        """The parent's counts for images, compressed; videos (which need their frame grid) are not counted here."""
        cfg = self.visionzip_config
        data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, **kwargs)
        if cfg is None:
            return data
        if kwargs.get("video_sizes") is not None:
            raise ValueError("VisionZip: count video tokens with QwenVisionZipConfig.item_tokens(video_grid_thw, 2)")
        if image_sizes is not None:
            unit = self.image_processor.merge_size**2
            data.num_image_tokens = [sum(cfg.counts(n // unit)) for n in data.num_image_patches]
        return data


class VisionZipQwen2VLProcessor(_VisionZipQwenProcessor, Qwen2VLProcessor):
    """``Qwen2VLProcessor`` whose placeholder runs match VisionZip's compressed features."""


class VisionZipQwen2_5_VLProcessor(_VisionZipQwenProcessor, Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` whose placeholder runs match VisionZip's compressed features."""


# Qwen checkpoints load into these classes with the parents' key renamings (and save in that layout)
for _ours, _parent in (
    (VisionZipQwen2VLModel, Qwen2VLModel),
    (VisionZipQwen2VLForConditionalGeneration, Qwen2VLForConditionalGeneration),
    (VisionZipQwen2_5_VLModel, Qwen2_5_VLModel),
    (VisionZipQwen2_5_VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration),
):
    share_weight_conversions(_ours, _parent)

__all__ = [
    "QwenVisionZipConfig",
    "VisionZipQwen2VLForConditionalGeneration",
    "VisionZipQwen2VLModel",
    "VisionZipQwen2VLProcessor",
    "VisionZipQwen2_5_VLForConditionalGeneration",
    "VisionZipQwen2_5_VLModel",
    "VisionZipQwen2_5_VLProcessor",
    "VisionZipQwenVisionOutput",
    "as_qwen_config",
]
