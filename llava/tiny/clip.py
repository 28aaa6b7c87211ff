"""The tiny CLIP tower: a random full CLIPModel and OpenAI CLIP's preprocessing, as openai/clip-vit-large-patch14-336
ships them."""

from __future__ import annotations

import json
import logging
import string
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from llava.tiny.config import TinyConfig, seeded

logger = logging.getLogger(__name__)


def _clip_config(cfg: TinyConfig) -> CLIPConfig:
    """A tiny CLIPConfig; the text tower's BOS/EOS sit at the end of its vocabulary as in OpenAI's CLIP."""
    text = {
        "hidden_size": cfg.text_hidden_size,
        "num_hidden_layers": cfg.text_layers,
        "num_attention_heads": cfg.text_heads,
        "intermediate_size": cfg.text_intermediate_size,
        "vocab_size": cfg.text_vocab_size,
        "max_position_embeddings": cfg.text_max_positions,
        "projection_dim": cfg.projection_dim,
        "pad_token_id": 1,  # OpenAI CLIP's pad id; the text tower is never run by LLaVA
        "bos_token_id": cfg.text_vocab_size - 2,
        "eos_token_id": cfg.text_vocab_size - 1,
    }
    vision = {
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "hidden_size": cfg.vision_hidden_size,
        "num_hidden_layers": cfg.vision_layers,
        "num_attention_heads": cfg.vision_heads,
        "intermediate_size": cfg.vision_intermediate_size,
        "projection_dim": cfg.projection_dim,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim)


def clip_tokenizer(cfg: TinyConfig) -> PreTrainedTokenizerFast:
    """A tiny CLIP-style tokenizer for the text tower: lower-cased characters as BPE tokens with CLIP's ``</w>`` word
    ends, BOS and EOS at the ids the text config names (the last two of its vocabulary), unknowns as EOS (OpenAI's
    ``<|endoftext|>`` is its unk). What CDPruner's relevance tokenizes instructions with."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = {token: i for i, token in enumerate([*chars, *(c + "</w>" for c in chars)])}
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    vocab[bos], vocab[eos] = cfg.text_vocab_size - 2, cfg.text_vocab_size - 1
    if len(vocab) > cfg.text_vocab_size:
        raise ValueError(
            f"the tiny CLIP tokenizer needs {len(vocab)} ids; the text vocabulary has {cfg.text_vocab_size}"
        )
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=eos, end_of_word_suffix="</w>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=eos, pad_token=eos,
        model_max_length=cfg.text_max_positions,
    )  # fmt: skip


def check_existing_clip(clip_dir: Path, cfg: TinyConfig) -> None:
    """Raise ValueError if the CLIP directory already there was written with other vision sizes than `cfg`."""
    vision = json.loads((clip_dir / "config.json").read_text())["vision_config"]
    expected = {
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "hidden_size": cfg.vision_hidden_size,
        "num_hidden_layers": cfg.vision_layers,
    }
    got = {key: vision.get(key) for key in expected}
    if got != expected:
        raise ValueError(f"{clip_dir} holds a CLIP with vision sizes {got}, expected {expected}; remove it first")


def clip_image_processor(image_size: int) -> Any:
    """OpenAI CLIP's preprocessing at `image_size`: shortest edge resized, centre crop, CLIP mean/std."""
    # The PIL backend, named directly: transformers' CLIPImageProcessor is the torchvision one and warns on its
    # fallback without torchvision. The JSON it writes ("image_processor_type": "CLIPImageProcessor") is the same.
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
    )


def write_tiny_clip(out_dir: str | Path, cfg: TinyConfig | None = None) -> Path:
    """Write a random full `CLIPModel` (text + vision) and its `CLIPImageProcessor` config into `out_dir`.

    Mirrors the directory of openai/clip-vit-large-patch14-336: config.json, model.safetensors with
    `vision_model.*` / `text_model.*` keys, the text tokenizer (:func:`clip_tokenizer`) and preprocessor_config.json
    (resize the shortest edge to image_size, centre crop image_size x image_size, OpenAI CLIP mean/std). Seeded by
    `cfg.clip_seed`. Returns `out_dir`.
    """
    cfg = cfg or TinyConfig()
    out_dir = Path(out_dir)
    with seeded(cfg.clip_seed, "clip"):
        model = CLIPModel(_clip_config(cfg))
    model.save_pretrained(out_dir)
    processor = clip_image_processor(cfg.image_size)
    processor.save_pretrained(out_dir)
    clip_tokenizer(cfg).save_pretrained(out_dir)
    logger.info("tiny CLIP written to %s", out_dir)
    return out_dir
