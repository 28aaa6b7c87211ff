"""Batched answers from transformers' Video-LLaVA with VisionZip on images and video frames; no lmms-eval import.

The lmms-eval model ``video_llava_visionzip`` (``eval.video_llava_visionzip``) is a thin adapter around
:class:`VideoLlavaRunner`: a request's visuals are video files (read with PyAV, ``num_frames`` frames sampled
uniformly as lmms-eval's own ``video_llava`` does) and/or PIL images; prompts follow Video-LLaVA's format
``USER: <video>\\n{question} ASSISTANT:``; batches are left-padded and decoded greedily unless asked otherwise.
``method=fastv|pdrop|sparsevlm`` prunes inside the language model instead of VisionZip (:mod:`visionzip.hf.inllm`;
each video, all its frames, one span; Table 3's FastV and SparseVLM rows).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from eval.hf_runner import on_model
from eval.options import ModelOptions, _as_int
from eval.runner import cut_at_stops, generation_settings
from llava.model.placement import load_placed
from visionzip import VisionZipConfig
from visionzip.hf.video_llava import VisionZipVideoLlavaForConditionalGeneration, VisionZipVideoLlavaProcessor
from visionzip.video import PAPER_FRAME_SPLIT, VIDEO_SPLITS, VideoBudget

logger = logging.getLogger(__name__)

DEFAULT_FRAMES = 8  # Video-LLaVA's training and evaluation setting
PROMPT = "USER: {visuals}\n{question} ASSISTANT:"  # Video-LLaVA's (LLaVA v1) one-turn format


@dataclass(frozen=True)
class VideoOptions:
    """The ``--model_args`` of ``video_llava_visionzip`` beside :class:`eval.options.ModelOptions`'.

    Attributes:
        num_frames: frames sampled uniformly from each video (8: Video-LLaVA's setting).
        video_dominant, video_contextual: VisionZip counts per frame (``video_split=per_frame``, the paper's setting)
            or their ratio in ``video_total``; one given without the other is an error. Giving any ``video_*``
            option turns VisionZip on for video frames (defaults: the paper's 17 per frame as 14 + 3, see
            ``visionzip.video.PAPER_FRAME_SPLIT``); with none, videos run as the checkpoint saves (else without).
        video_split: ``per_frame``, ``uniform`` or ``proportional`` (:class:`visionzip.video.VideoBudget`).
        video_total: tokens per video for ``uniform`` / ``proportional``.

    The method options of :class:`ModelOptions` (merge, cls_token, selection, layer, score_layer) apply to frames
    as to images; ``visionzip=off`` turns both off.
    """

    num_frames: int = DEFAULT_FRAMES
    video_dominant: int | None = None
    video_contextual: int | None = None
    video_split: str | None = None
    video_total: int | None = None

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"model_args num_frames must be >= 1, got {self.num_frames}")
        if (self.video_dominant is None) != (self.video_contextual is None):
            raise ValueError("model_args video_dominant and video_contextual must be given together")
        if self.video_split not in (None, *VIDEO_SPLITS):
            raise ValueError(f"model_args video_split must be one of {VIDEO_SPLITS}, got {self.video_split!r}")

    @classmethod
    def split_kwargs(cls, kwargs: dict[str, Any]) -> tuple[VideoOptions, dict[str, Any]]:
        """(these options, the remaining model args for :class:`ModelOptions`) from lmms-eval's parsed args."""
        names = {f.name for f in dataclasses.fields(cls)}
        ours = {k: v for k, v in kwargs.items() if k in names}
        values: dict[str, Any] = {}
        for name, value in ours.items():
            values[name] = str(value) if name == "video_split" else _as_int(name, value)
        values = {k: v for k, v in values.items() if v is not None}
        return cls(**values), {k: v for k, v in kwargs.items() if k not in names}

    @property
    def given(self) -> bool:
        """Whether any VisionZip video option was given."""
        return any(v is not None for v in (self.video_dominant, self.video_split, self.video_total))

    def budget(self, options: ModelOptions, layer: int) -> VideoBudget | None:
        """The video budget asked for (None: none asked, or ``visionzip=off``), with ``options``' method options."""
        if options.visionzip == "off" or not self.given:
            return None
        dominant, contextual = (self.video_dominant, self.video_contextual)
        if dominant is None or contextual is None:
            dominant, contextual = PAPER_FRAME_SPLIT
        counts = options.replace(budget=None, dominant=dominant, contextual=contextual)
        frame = counts.requested_visionzip(layer)
        assert isinstance(frame, VisionZipConfig)
        return VideoBudget(frame, split=self.video_split or "per_frame", total=self.video_total)  # type: ignore[arg-type]


def read_frames(path: str | Path, num_frames: int) -> np.ndarray:
    """``num_frames`` RGB frames (F, H, W, 3) uint8 at the indices ``linspace(0, n - 1, F)`` rounded down, as lmms-eval
    samples them, of the video's n decoded frames (repeated when n < F: every clip of a batch has F frames)."""
    try:
        import av
    except ImportError as err:
        raise ImportError("reading videos needs PyAV: pip install 'llava-visionzip[eval]' (or av)") from err
    with av.open(str(path)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path}: no video frames decoded")
    indices = np.linspace(0, len(frames) - 1, num_frames, dtype=int)  # as lmms-eval samples
    return np.stack([frames[i] for i in indices])


def _split_visuals(visuals: Sequence[Any]) -> tuple[list[str], list[Image.Image]]:
    """A request's visuals -> (video paths, PIL images)."""
    videos, images = [], []
    for visual in visuals:
        if isinstance(visual, (str, Path)):
            videos.append(str(visual))
        elif isinstance(visual, Image.Image):
            images.append(visual.convert("RGB"))
        else:
            raise ValueError(f"video_llava_visionzip takes video paths and PIL images; got {type(visual).__name__}")
    return videos, images


class VideoLlavaRunner:
    """A loaded Video-LLaVA (VisionZip on or off for images and for videos) answering batches of requests."""

    def __init__(self, model: Any, processor: Any, num_frames: int, greedy: bool = True, max_new_tokens: int = 1024):
        self.model, self.processor, self.tokenizer = model, processor, processor.tokenizer
        self.num_frames, self.greedy, self.max_new_tokens = num_frames, greedy, max_new_tokens
        self.tokenizer.padding_side = "left"
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id

    @classmethod
    def load(cls, options: ModelOptions, video: VideoOptions, device: str) -> VideoLlavaRunner:
        """The checkpoint in the VisionZip classes with the asked budgets (else the ones it saves; ``visionzip=off``:
        none), on ``device`` in ``options``' dtype (default: float16 on accelerators, float32 on the CPU)."""
        for name in ("model_base", "conv_template", "visionzip_budget"):
            if getattr(options, name) is not None:
                raise ValueError(f"model_args {name} applies to llava_visionzip, not video_llava_visionzip")
        model = load_placed(
            VisionZipVideoLlavaForConditionalGeneration, options.pretrained, device, options.torch_dtype,
            attn_implementation=options.attn_implementation,
        )  # fmt: skip
        if options.llm_method is not None:
            return cls._with_pruning(model, options, video)
        layer = model.config.vision_feature_layer
        image = options.requested_visionzip(layer, model.visionzip_config)
        model.set_visionzip(None if options.visionzip == "off" else image or model.visionzip_config)
        budget = video.budget(options, layer)
        model.set_visionzip_video(None if options.visionzip == "off" else budget or model.visionzip_video_config)
        processor = VisionZipVideoLlavaProcessor.from_pretrained(
            options.pretrained, visionzip=model.visionzip_config, visionzip_video=model.visionzip_video_config
        )
        logger.info("video_llava_visionzip: %s on %s, images %s, videos %s", options.pretrained, device,
                    model.visionzip_config, model.visionzip_video_config)  # fmt: skip
        return cls(model, processor, video.num_frames, options.greedy, options.max_new_tokens)

    @classmethod
    def _with_pruning(cls, model: Any, options: ModelOptions, video: VideoOptions) -> VideoLlavaRunner:
        """The runner with the in-LLM method ``options`` name (both VisionZip budgets off; the parent's counts)."""
        if video.given:
            raise ValueError(
                f"model_args video_* set VisionZip's video budget, but method={options.method} prunes inside the "
                "language model: expected one or the other"
            )
        options.requested_visionzip(model.config.vision_feature_layer, model.visionzip_config)  # VisionZip‡: refused
        try:
            model.set_method(options.requested_pruning())
        except ValueError as err:
            raise ValueError(f"model_args method={options.method} on {options.pretrained}: {err}") from err
        processor = VisionZipVideoLlavaProcessor.from_pretrained(
            options.pretrained, visionzip=None, visionzip_video=None
        )
        logger.info("video_llava_visionzip: %s, %s", options.pretrained, model.pruning_config.describe())
        return cls(model, processor, video.num_frames, options.greedy, options.max_new_tokens)

    def prompt(self, context: str, num_videos: int, num_images: int) -> str:
        """Video-LLaVA's prompt: the placeholders (images, then videos) unless the context holds them."""
        tokens = [self.processor.image_token] * num_images + [self.processor.video_token] * num_videos
        if self.processor.video_token in context or self.processor.image_token in context:
            tokens = []
        return PROMPT.format(visuals="".join(tokens), question=context)

    def _inputs(self, contexts: Sequence[str], visuals: Sequence[Sequence[Any]]) -> dict[str, torch.Tensor]:
        """The processor's left-padded batch on the model's device (floating tensors in the model's dtype)."""
        split = [_split_visuals(v) for v in visuals]
        prompts = [self.prompt(c, len(v), len(i)) for c, (v, i) in zip(contexts, split, strict=True)]
        clips = [read_frames(path, self.num_frames) for videos, _ in split for path in videos]
        images = [image for _, imgs in split for image in imgs]
        batch = self.processor(
            text=prompts, videos=clips or None, images=images or None, padding=True, return_tensors="pt"
        )
        return on_model(batch, self.model)

    @torch.inference_mode()
    def generate(self, contexts: Sequence[str], visuals: Sequence[Sequence[Any]], task_kwargs: dict) -> list[str]:
        """One answer per (context, visuals), decoded together as one left-padded batch with the task's kwargs."""
        settings = generation_settings(task_kwargs, self.greedy, self.max_new_tokens)
        inputs = self._inputs(contexts, visuals)
        stops = {"stop_strings": settings.stops, "tokenizer": self.tokenizer} if settings.stops else {}
        output = self.model.generate(**inputs, pad_token_id=self.pad_id, **stops, **settings.kwargs)
        texts = self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [cut_at_stops(text, settings.stops) for text in texts]
