"""Tiny random llava-hf LLaVA-1.5 / NeXT pieces: sizes, budget, prompts, config, processor and sample images."""

from __future__ import annotations

from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
)

from helpers.sample import SAMPLE
from llava.tiny import llama_style_tokenizer, tokenizer_corpus
from visionzip import VisionZipConfig
from visionzip.hf.llava import VisionZipLlavaForConditionalGeneration, VisionZipLlavaProcessor
from visionzip.hf.llava_next import VisionZipLlavaNextForConditionalGeneration, VisionZipLlavaNextProcessor

VIEW, PATCH, LAYERS = 32, 8, 3  # 4 x 4 patches + [CLS] per view
SIDE = VIEW // PATCH
PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]  # (height, width), as transformers reads them
CFG = VisionZipConfig(dominant=6, contextual=3)  # layer -2: vision_feature_layer of LLaVA-1.5
PROMPTS = [
    "USER: <image>\nColour? ASSISTANT:",
    "USER: <image>\nWhat is the shape in the middle of it, and why? ASSISTANT:",
]
SIZES = [(40, 90), (100, 30), (64, 64), (30, 70)]  # (height, width): NeXT views 1 + 1x3, 1 + 3x1, 1 + 2x2, 1 + 1x2
FAMILIES = {
    "llava": (LlavaForConditionalGeneration, VisionZipLlavaForConditionalGeneration, VisionZipLlavaProcessor),
    "next": (
        LlavaNextForConditionalGeneration,
        VisionZipLlavaNextForConditionalGeneration,
        VisionZipLlavaNextProcessor,
    ),
}


def tiny_tokenizer():
    """The tiny checkpoints' Llama-style tokenizer with an ``<image>`` token, padding on the left."""
    tokenizer = llama_style_tokenizer(tokenizer_corpus(), vocab_size=320, model_max_length=1024)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_config(family: str, vocab: int, image_id: int):
    """The tiny ``family`` ("llava" or "next") config: CLIP 32 px / patch 8, 3 layers; Llama 2 layers."""
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, image_size=VIEW,
        patch_size=PATCH,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    common = dict(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=image_id)
    if family == "llava":
        return LlavaConfig(**common, image_seq_length=SIDE * SIDE)
    return LlavaNextConfig(**common, image_grid_pinpoints=PINPOINTS, image_seq_length=SIDE * SIDE)


def tiny_processor(family: str, tokenizer):
    """The plain transformers processor of ``family`` for the tiny checkpoint (one extra [CLS] token)."""
    common = dict(tokenizer=tokenizer, patch_size=PATCH, vision_feature_select_strategy="default")
    if family == "llava":
        image = CLIPImageProcessorPil(size={"shortest_edge": VIEW}, crop_size={"height": VIEW, "width": VIEW})
        return LlavaProcessor(image_processor=image, num_additional_image_tokens=1, **common)
    image = LlavaNextImageProcessorPil(
        size={"shortest_edge": VIEW}, crop_size={"height": VIEW, "width": VIEW}, image_grid_pinpoints=PINPOINTS
    )
    return LlavaNextProcessor(image_processor=image, num_additional_image_tokens=1, **common)


def sample_images(sizes: list[tuple[int, int]]) -> list[Image.Image]:
    """The sample photo resized to each (height, width) of ``sizes``."""
    with Image.open(SAMPLE) as photo:
        return [photo.convert("RGB").resize((w, h)) for h, w in sizes]  # PIL sizes are (width, height)
