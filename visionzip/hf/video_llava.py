"""VisionZip for transformers' ``VideoLlavaForConditionalGeneration`` (Video-LLaVA) and its processor, by subclassing.

Video-LLaVA has two CLIP-shaped towers (LanguageBind): images go through ``image_tower`` and, when VisionZip is on
(``config.visionzip``, a :class:`VisionZipConfig` per image), keep ``dominant + contextual`` tokens as in LLaVA-1.5
([CLS] always among the dominant ones, whatever ``vision_feature_select_strategy`` says). Videos go through
``video_tower`` frame by frame (257 tokens each with [CLS]); with ``config.visionzip_video`` (a
:class:`visionzip.video.VideoBudget`) each frame is compressed with the same method: 14 + 3 = 17 tokens per frame by
default (the paper's 8 x 17 = 136), a total per video dealt out evenly, or (an extension) in proportion to each
frame's score mass. Frames are concatenated frame after frame, each with its dominant then contextual tokens.

    model = VisionZipVideoLlavaForConditionalGeneration.from_pretrained(
        "LanguageBind/Video-LLaVA-7B-hf", visionzip=VisionZipConfig(54, 10), visionzip_video=VideoBudget())
    processor = VisionZipVideoLlavaProcessor.from_pretrained("LanguageBind/Video-LLaVA-7B-hf",
        visionzip=model.visionzip_config, visionzip_video=model.visionzip_video_config)
    inputs = processor(text="USER: <video>\\nWhat happens? ASSISTANT:", videos=clip, return_tensors="pt")

With both budgets None the two classes are exactly their parents. FastV, PDrop and SparseVLM prune inside the
language model instead (:mod:`visionzip.hf.inllm`; the paper's Table 3 rows), each video (all its frames) and each
image one span: ``from_pretrained(id, method=FastVConfig(budget=135))`` (VisionZip off for both; the processor keeps
the parent's counts).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import VideoLlavaForConditionalGeneration, VideoLlavaModel, VideoLlavaProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.video_llava.modeling_video_llava import VideoLlavaPreTrainedModel
from transformers.processing_utils import ProcessorMixin
from transformers.utils import is_torchvision_available
from transformers.utils.generic import can_return_tuple
from transformers.video_utils import make_batched_videos

from visionzip.config import VisionZipConfig
from visionzip.encode import capture, encode
from visionzip.encoders import get_adapter, tokens_per_view
from visionzip.hf.common import (
    SAVED,
    VisionZipPretrainedMixin,
    as_budget,
    as_visionzip_config,
    check_call_layer,
    check_feature_layer,
    saved_visionzip,
    share_weight_conversions,
)
from visionzip.hf.inllm import PruningPretrainedMixin, VideoPruningModelMixin, is_pruning
from visionzip.video import VideoBudget, compress_video

VIDEO_CONFIG_KEY = "visionzip_video"  # model.config.visionzip_video / processor_config.json: VideoBudget.to_dict()


def as_video_budget(value: VideoBudget | dict | None) -> VideoBudget | None:
    """A video budget from what users pass or configs store: a :class:`VideoBudget`, its dict, or None (off)."""
    return as_budget(value, VideoBudget, VIDEO_CONFIG_KEY)


def saved_video_budget(config: Any) -> VideoBudget | None:
    """The video budget written in a transformers config (``config.visionzip_video``), or None when off."""
    return as_video_budget(getattr(config, VIDEO_CONFIG_KEY, None))


class VisionZipVideoLlavaModel(VideoPruningModelMixin, VideoLlavaModel):
    """``VideoLlavaModel`` whose ``get_image_features`` / ``get_video_features`` compress with VisionZip when the config
    holds a budget; these are the only places image and video tokens are made (``forward`` and ``generate`` call
    them), and the placeholder checks compare their output with the processor's counts."""

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor | None = None, pixel_values_images: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None, vision_feature_select_strategy: str | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:  # fmt: skip
        """(B, 3, H, W) -> ``pooler_output`` (B, n, C_llm); n = dominant + contextual with VisionZip.

        ``pixel_values_images`` is the parent's deprecated name for ``pixel_values``, which the processor still
        returns by default; ``generate`` hands it here by name.
        """
        pixel_values = pixel_values if pixel_values is not None else pixel_values_images
        cfg = saved_visionzip(self.config)
        if cfg is None:
            return super().get_image_features(
                pixel_values=pixel_values, vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy, **kwargs,
            )  # fmt: skip
        check_call_layer(self.config, cfg, vision_feature_layer)
        out = encode(self.image_tower, pixel_values, cfg)  # tokens: (B, K, C_vision)
        features = self.multi_modal_projector(out.tokens)  # (B, K, C_llm)
        return BaseModelOutputWithPooling(last_hidden_state=out.tokens, pooler_output=features)

    @can_return_tuple
    def get_video_features(
        self, pixel_values_videos: torch.Tensor, vision_feature_layer: int | list[int] | None = None, **kwargs: Any
    ) -> BaseModelOutputWithPooling:
        """(B, F, 3, H, W) -> ``pooler_output`` (B, T, C_llm) with VisionZip (T = ``budget.tokens(F)``); without it the
        parent's (B * F, N, C_llm)."""
        budget = saved_video_budget(self.config)
        if budget is None:
            return super().get_video_features(
                pixel_values_videos=pixel_values_videos, vision_feature_layer=vision_feature_layer, **kwargs
            )
        check_call_layer(self.config, budget.frame, vision_feature_layer)
        frames = pixel_values_videos.shape[1]
        pixels = pixel_values_videos.flatten(0, 1)  # (B * F, 3, H, W)
        seen = capture(self.video_tower, pixels, budget.frame)
        tokens = compress_video(seen.features, seen.scores, seen.keys, budget, frames, content=pixels)  # (B, T, C_v)
        return BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=self.multi_modal_projector(tokens))


def _check_tower(cfg: VisionZipConfig, tower: torch.nn.Module, config: Any) -> None:
    """ValueError unless ``cfg`` can run on ``tower`` at the projector's layer."""
    if cfg.positions != "packed":
        raise ValueError(f"VisionZip positions={cfg.positions!r} is not supported by transformers' classes: 'packed'")
    check_feature_layer(cfg, config.vision_feature_layer, config.vision_config.num_hidden_layers)
    if cfg.cls_token and not get_adapter(tower).has_cls:
        raise ValueError(f"{type(tower).__name__} has no [CLS] token: use VisionZipConfig(cls_token=False)")


class VisionZipVideoLlavaForConditionalGeneration(
    PruningPretrainedMixin, VisionZipPretrainedMixin, VideoLlavaForConditionalGeneration
):
    """``VideoLlavaForConditionalGeneration`` with VisionZip, ``from_pretrained(id, visionzip=, visionzip_video=)``.

    ``visionzip`` is the budget per image (``config.visionzip``, :meth:`set_visionzip`), ``visionzip_video`` the
    budget of video frames (``config.visionzip_video``, :meth:`set_visionzip_video`); None turns either off.
    ``method=`` (or :meth:`set_method`) takes an in-LLM method (FastV, PDrop, SparseVLM) instead of both budgets.
    """

    def __init__(self, config: Any) -> None:
        self._build_with_inner(config, VideoLlavaPreTrainedModel, VisionZipVideoLlavaModel)

    @classmethod
    def from_pretrained(cls, *args: Any, visionzip_video: VideoBudget | dict | None = SAVED, **kwargs: Any) -> Any:
        """transformers' ``from_pretrained`` with ``visionzip`` (see the mixin) and ``visionzip_video``: the video
        budget (None: off); not given: the one the checkpoint's config saves, if any."""
        method = kwargs.pop("method", SAVED)
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.set_visionzip_video(model.visionzip_video_config if visionzip_video is SAVED else visionzip_video)
        if method is not SAVED:
            model.set_method(method)
        return loaded

    @property
    def method_config(self) -> Any:
        """The in-LLM method in use, else the image budget (None: neither)."""
        return self.pruning_config or self.visionzip_config

    def encoder_methods(self) -> list[Any]:
        """The budgets in use (images, videos), refused beside an in-LLM method."""
        return [cfg for cfg in (self.visionzip_config, self.visionzip_video_config) if cfg is not None]

    def largest_image_tokens(self) -> int:
        """Vanilla tokens of the longest visual span: a video's frames (``video_seq_length``) or an image's."""
        return max(self.config.video_seq_length, self.config.image_seq_length)

    def set_method(self, cfg: Any) -> None:
        """An in-LLM method (both budgets off), a :class:`VisionZipConfig` for images (no in-LLM method), or None
        (everything off)."""
        self.config.token_pruning = None
        if cfg is None or is_pruning(cfg):
            self.set_visionzip(None)
            self.set_visionzip_video(None)
            self.set_pruning(cfg)
        else:
            self.set_visionzip(cfg)

    @property
    def visionzip_video_config(self) -> VideoBudget | None:
        """The video budget in use (``config.visionzip_video``), or None when off."""
        return saved_video_budget(self.config)

    def set_visionzip_video(self, budget: VideoBudget | dict | None) -> None:
        """Turn VisionZip on video frames on with ``budget`` or off (None); checked against the video tower first."""
        budget = as_video_budget(budget)
        if budget is not None:
            self._refuse_beside_pruning(budget, "VisionZip on video frames")
            tower = self.model.video_tower
            _check_tower(budget.frame, tower, self.config)
            if budget.split == "per_frame":
                budget.frame.check_fits(tokens_per_view(self.config.vision_config, get_adapter(tower).has_cls))
        setattr(self.config, VIDEO_CONFIG_KEY, None if budget is None else budget.to_dict())

    def _check_visionzip(self, cfg: VisionZipConfig) -> None:
        """The image budget against the image tower (Video-LLaVA has no ``vision_tower``)."""
        tower = self.model.image_tower
        _check_tower(cfg, tower, self.config)
        cfg.check_fits(tokens_per_view(self.config.vision_config, get_adapter(tower).has_cls))


class VisionZipVideoLlavaProcessor(VideoLlavaProcessor):
    """``VideoLlavaProcessor`` that expands ``<image>`` into ``dominant + contextual`` placeholders and ``<video>`` into
    ``visionzip_video.tokens(F)`` when the budgets are set (``__init__``/``from_pretrained``, saved in
    ``processor_config.json``); None: the parent's counts.

    transformers' video processors need torchvision. Where it is not installed this class has no ``video_processor``:
    each video's frames go through the image processor (the same CLIP resize, centre crop and normalisation as
    ``VideoLlavaVideoProcessor``, with PIL's resampling), and a checkpoint's video processor config is not read.
    """

    @classmethod
    def get_attributes(cls) -> list[str]:
        names = super().get_attributes()
        return names if is_torchvision_available() else [n for n in names if n != "video_processor"]

    def __init__(
        self, image_processor: Any = None, tokenizer: Any = None, video_processor: Any = None, patch_size: int = 14,
        vision_feature_select_strategy: str = "default", image_token: str = "<image>", video_token: str = "<video>",
        chat_template: str | None = None, num_additional_image_tokens: int = 1,
        visionzip: VisionZipConfig | dict | None = None, visionzip_video: VideoBudget | dict | None = None,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        """The parent's arguments (pass them by name: ``video_processor`` comes after ``tokenizer`` here, so that the
        processor attributes keep one order with and without torchvision) and the two budgets."""
        self._set_budgets(visionzip, visionzip_video)
        # The parent's __init__ hands ProcessorMixin its three processors by position; we set what it sets and hand
        # over the ones this environment has, by name.
        self.patch_size, self.num_additional_image_tokens = patch_size, num_additional_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = getattr(tokenizer, "image_token", image_token)
        self.video_token = getattr(tokenizer, "video_token", video_token)
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        processors = {"image_processor": image_processor, "tokenizer": tokenizer}
        if "video_processor" in self.get_attributes():
            processors["video_processor"] = video_processor
        elif video_processor is not None:
            raise ValueError("a video_processor needs torchvision (transformers' video processors require it)")
        ProcessorMixin.__init__(self, chat_template=chat_template, **processors)
        if "video_processor" not in processors:
            self.video_processor = None  # ProcessorMixin sends videos to _process_videos only when this exists

    def to_dict(self) -> dict[str, Any]:
        """The parent's, without the empty ``video_processor`` of an environment without torchvision."""
        out = super().to_dict()
        if out.get("video_processor", False) is None:
            del out["video_processor"]
        return out

    def _set_budgets(self, visionzip: Any, visionzip_video: Any) -> None:
        cfg, budget = as_visionzip_config(visionzip), as_video_budget(visionzip_video)
        self.visionzip = None if cfg is None else cfg.to_dict()  # JSON, as processor_config.json stores it
        self.visionzip_video = None if budget is None else budget.to_dict()

    @classmethod
    def from_pretrained(
        cls, *args: Any, visionzip: VisionZipConfig | dict | None = SAVED,
        visionzip_video: VideoBudget | dict | None = SAVED, **kwargs: Any,
    ) -> Any:  # fmt: skip
        """transformers' ``from_pretrained``; ``visionzip`` / ``visionzip_video``: the budgets (None: the parent's
        counts); not given: the ones ``processor_config.json`` saves. Set after loading, as
        :class:`visionzip.hf.common.VisionZipProcessorMixin` does (the tokenizer would save them too)."""
        processor = super().from_pretrained(*args, **kwargs)
        saved = processor.visionzip_config, processor.visionzip_video_config
        processor._set_budgets(
            saved[0] if visionzip is SAVED else visionzip, saved[1] if visionzip_video is SAVED else visionzip_video
        )
        return processor

    @property
    def visionzip_config(self) -> VisionZipConfig | None:
        """The image budget the placeholders are counted with, or None (the parent's count)."""
        return as_visionzip_config(self.visionzip)

    @property
    def visionzip_video_config(self) -> VideoBudget | None:
        """The video budget the placeholders are counted with, or None (the parent's count)."""
        return as_video_budget(self.visionzip_video)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        cfg = self.visionzip_config
        if cfg is None:
            return super().replace_image_token(image_inputs, image_idx, **kwargs)
        return self.image_token * cfg.tokens

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs: Any) -> str:
        budget = self.visionzip_video_config
        if budget is None:
            return super().replace_video_token(video_inputs, video_idx, **kwargs)
        return self.video_token * budget.tokens(len(video_inputs["pixel_values_videos"][video_idx]))

    def _frame_pixels(self, clip: Any) -> torch.Tensor:
        """One video's frames (F, H, W, 3) through the image processor -> (F, 3, h, w)."""
        out = self.image_processor(list(clip), return_tensors="pt", return_legacy_image_output=False)
        return out["pixel_values"]

    def _process_videos(self, videos: Any, **kwargs: Any) -> tuple[dict, list[str]]:
        """The parent's with a video processor; without one, each video's frames through the image processor:
        ``pixel_values_videos`` (B, F, 3, H, W) (every video of a call needs the same F)."""
        if getattr(self, "video_processor", None) is not None:
            return super()._process_videos(videos, **kwargs)
        clips = make_batched_videos(videos)
        pixels = [self._frame_pixels(clip) for clip in clips]
        frames = {p.shape[0] for p in pixels}
        if len(frames) > 1:
            raise ValueError(f"videos of one call must have the same number of frames, got {sorted(frames)}")
        processed = {"pixel_values_videos": torch.stack(pixels)}  # (B, F, 3, H, W)
        return processed, [self.replace_video_token(processed, i) for i in range(len(clips))]


# Video-LLaVA checkpoints load into these classes with the parents' key renamings (and save in that layout)
share_weight_conversions(VisionZipVideoLlavaModel, VideoLlavaModel)
share_weight_conversions(VisionZipVideoLlavaForConditionalGeneration, VideoLlavaForConditionalGeneration)

__all__ = [
    "VisionZipVideoLlavaForConditionalGeneration",
    "VisionZipVideoLlavaModel",
    "VisionZipVideoLlavaProcessor",
    "as_video_budget",
    "saved_video_budget",
]
