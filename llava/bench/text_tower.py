"""CLIP's text tower for the bench's CDPruner rows: its shape (CLIP-L's, scaled as the vision tower is) and a full CLIP
checkpoint folder (both towers' config, text weights, visual projection, tokenizer) that CDPruner's relevance loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig

from llava.tiny.clip import clip_tokenizer
from llava.tiny.config import TinyConfig
from visionzip.bench import CLIP_L_336, EncoderShape


@dataclass(frozen=True)
class TextShape:
    """A CLIP text tower's shape (random weights: its time does not depend on values)."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    positions: int
    projection: int


# openai/clip-vit-large-patch14-336's text tower (the checkpoint LLaVA names as mm_vision_tower), 768-wide projection
CLIP_L_TEXT = TextShape(hidden=768, layers=12, heads=12, intermediate=3072, vocab=49408, positions=77, projection=768)


def text_shape(vision: EncoderShape) -> TextShape:
    """CLIP-L's text tower shrunk as ``vision`` was shrunk from CLIP-L/14-336 (heads and depth in proportion, head
    width and token counts kept), so a scaled bench's text tower costs what the real one would at that scale."""
    width, depth = vision.heads / CLIP_L_336.heads, vision.layers / CLIP_L_336.layers
    heads = max(1, round(CLIP_L_TEXT.heads * width))
    hidden = heads * (CLIP_L_TEXT.hidden // CLIP_L_TEXT.heads)
    return TextShape(
        hidden=hidden, layers=max(1, round(CLIP_L_TEXT.layers * depth)), heads=heads,
        intermediate=hidden * CLIP_L_TEXT.intermediate // CLIP_L_TEXT.hidden, vocab=CLIP_L_TEXT.vocab,
        positions=CLIP_L_TEXT.positions, projection=max(1, round(CLIP_L_TEXT.projection * width)),
    )  # fmt: skip


def write_text_tower(folder: Path, vision: EncoderShape) -> None:
    """Make ``folder`` (holding the vision config) a full CLIP checkpoint for CDPruner: a ``CLIPConfig`` with both
    towers, random text-tower and projection weights (the vision weights stay the bench model's own), and a
    character-level CLIP tokenizer (:func:`llava.tiny.clip.clip_tokenizer`)."""
    shape = text_shape(vision)
    text = CLIPTextConfig(
        hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        intermediate_size=shape.intermediate, vocab_size=shape.vocab, max_position_embeddings=shape.positions,
        projection_dim=shape.projection, bos_token_id=shape.vocab - 2, eos_token_id=shape.vocab - 1,
    )  # fmt: skip
    vision_config = CLIPVisionConfig.from_pretrained(folder).to_dict()  # what the folder holds so far
    both = CLIPConfig(text_config=text.to_dict(), vision_config=vision_config, projection_dim=shape.projection)
    both.save_pretrained(folder)
    tensors = CLIPTextModelWithProjection(text).state_dict()
    tensors["visual_projection.weight"] = torch.randn(shape.projection, vision.hidden) * vision.hidden**-0.5
    save_file({key: value.contiguous() for key, value in tensors.items()}, folder / "model.safetensors")
    tokens = TinyConfig(text_vocab_size=shape.vocab, text_max_positions=shape.positions)
    clip_tokenizer(tokens).save_pretrained(folder)
