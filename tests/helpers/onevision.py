"""Tiny random llava-hf OneVision pieces: sizes, tokenizer, config, processors with a stand-in video processor."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import (
    BatchFeature,
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)

from llava.tiny import llama_style_tokenizer, tokenizer_corpus
from visionzip.hf.llava_onevision import VisionZipLlavaOnevisionProcessor

VIEW, PATCH, LAYERS = 48, 8, 2  # 6 x 6 patches per view, no [CLS]; the parent pools a frame to 3 x 3
SIDE = VIEW // PATCH
# (height, width); 192 x 192 is 4 x 4 crops, which the parent downsamples (anyres_max_9)
PINPOINTS = [[48, 96], [96, 48], [96, 96], [48, 144], [144, 48], [192, 192]]


class FrameProcessor:
    """Stand-in for ``LlavaOnevisionVideoProcessor`` (torchvision only): each frame resized to VIEW x VIEW with PIL,
    rescaled and normalised with the image processor's mean and std -> ``pixel_values_videos`` (B, F, 3, S, S)."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def _frame(self, frame: np.ndarray) -> torch.Tensor:
        resized = np.asarray(Image.fromarray(frame).resize((VIEW, VIEW), Image.BICUBIC), dtype=np.float32)
        return (torch.from_numpy(resized).permute(2, 0, 1) / 255 - self.mean) / self.std  # (3, S, S)

    def __call__(self, videos: list[np.ndarray], **kwargs: Any) -> BatchFeature:
        stacked = torch.stack([torch.stack([self._frame(f) for f in video]) for video in videos])  # (B, F, 3, S, S)
        return BatchFeature({"pixel_values_videos": stacked})


class _AcceptsFrameProcessor:
    """transformers checks a processor's video_processor against a class it registers only with torchvision."""

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> type:
        if argument_name == "video_processor" and isinstance(argument, FrameProcessor):
            return FrameProcessor
        return super().check_argument_for_proper_class(argument_name, argument)


class PlainProcessor(_AcceptsFrameProcessor, LlavaOnevisionProcessor):
    """transformers' OneVision processor that takes the frame stand-in."""


class VisionZipProcessor(_AcceptsFrameProcessor, VisionZipLlavaOnevisionProcessor):
    """The VisionZip OneVision processor that takes the frame stand-in."""


def _tokenizer():
    tokenizer = llama_style_tokenizer(tokenizer_corpus(), vocab_size=320, model_max_length=2048)
    tokenizer.add_tokens(["<image>", "<video>"], special_tokens=True)
    tokenizer.padding_side = "left"
    return tokenizer


TOKENIZER = _tokenizer()
IMAGE_ID, VIDEO_ID = TOKENIZER.convert_tokens_to_ids(["<image>", "<video>"])


def tiny_config() -> LlavaOnevisionConfig:
    """The tiny OneVision config: SigLIP 48 px / patch 8, 2 layers, no [CLS]; Qwen2 2 layers; features at layer -1."""
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, image_size=VIEW,
        patch_size=PATCH, vision_use_head=False,
    )  # fmt: skip
    text = Qwen2Config(
        vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return LlavaOnevisionConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=IMAGE_ID,
        video_token_index=VIDEO_ID, image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )  # fmt: skip


def tiny_processor(cls: type, **kwargs: Any):
    """A ``cls`` processor (plain or VisionZip) for the tiny checkpoint, with the frame stand-in for videos."""
    image = LlavaOnevisionImageProcessorPil(size={"height": VIEW, "width": VIEW}, image_grid_pinpoints=PINPOINTS)
    video = FrameProcessor(image.image_mean, image.image_std)
    return cls(
        image_processor=image, tokenizer=TOKENIZER, video_processor=video, num_image_tokens=SIDE * SIDE,
        vision_feature_select_strategy="full", **kwargs,
    )  # fmt: skip
