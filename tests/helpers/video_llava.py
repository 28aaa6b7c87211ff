"""A tiny random Video-LLaVA (two CLIP towers of 32 px / patch 8, 3 layers; Llama 2 layers) and its processor."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
    VideoLlavaImageProcessor,
)

from llava.tiny import llama_style_tokenizer, tokenizer_corpus
from visionzip.hf.video_llava import VisionZipVideoLlavaProcessor

VIEW, PATCH, LAYERS, FRAMES = 32, 8, 3, 4
TOKENS = (VIEW // PATCH) ** 2 + 1  # 17 per view, with [CLS]


def _tokenizer():
    tokenizer = llama_style_tokenizer(tokenizer_corpus(), vocab_size=320, model_max_length=4096)
    tokenizer.add_tokens(["<image>", "<video>"], special_tokens=True)
    tokenizer.padding_side = "left"
    return tokenizer


def write_tiny_video_llava(path: Path) -> Path:
    """A tiny random Video-LLaVA and its (VisionZip off) processor, saved by save_pretrained into ``path``."""
    tokenizer = _tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, image_size=VIEW,
        patch_size=PATCH,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    config = VideoLlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_seq_length=TOKENS - 1,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), video_seq_length=TOKENS * FRAMES,
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
    )  # fmt: skip
    torch.manual_seed(0)
    VideoLlavaForConditionalGeneration(config).save_pretrained(path)
    images = VideoLlavaImageProcessor(size={"shortest_edge": VIEW}, crop_size={"height": VIEW, "width": VIEW})
    VisionZipVideoLlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH).save_pretrained(path)
    return path
