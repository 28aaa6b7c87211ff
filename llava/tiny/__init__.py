"""Tiny random LLaVA-1.5 / LLaVA-1.6 checkpoints written in the on-disk layout of the released ones.

Modules: ``config`` (:class:`TinyConfig`, the layout's names, seeded streams), ``tokenizer`` (byte-level BPE and
sentencepiece, trained on a built-in corpus), ``clip`` (the CLIP tower folder), ``weights`` (tensors and shards),
``checkpoint`` (:func:`write_tiny_llava`, :func:`write_projector_only`), ``cli`` (``python -m llava.tiny``).
"""

from llava.tiny.checkpoint import llama_config, write_projector_only, write_tiny_llava
from llava.tiny.cli import main
from llava.tiny.clip import clip_image_processor, write_tiny_clip
from llava.tiny.config import (
    BOS_TOKEN,
    CHECKPOINT_NAMES,
    CLIP_DIR_NAME,
    EOS_TOKEN,
    FORMATS,
    SERVABLE_HEAD_DIM,
    SPECIAL_TOKENS,
    SYSTEM_PROMPT,
    TOKENIZER_DIR_NAME,
    TOKENIZER_KINDS,
    UNK_TOKEN,
    TinyConfig,
    derived_seed,
    seeded,
)
from llava.tiny.tokenizer import (
    build_sentencepiece_tokenizer,
    build_tokenizer,
    llama_style_tokenizer,
    released_tokenizer_config,
    save_sentencepiece_tokenizer,
    save_tokenizer,
    tokenizer_corpus,
    train_bpe_backend,
    train_sentencepiece,
)

__all__ = [
    "BOS_TOKEN",
    "CHECKPOINT_NAMES",
    "CLIP_DIR_NAME",
    "EOS_TOKEN",
    "FORMATS",
    "SERVABLE_HEAD_DIM",
    "SPECIAL_TOKENS",
    "SYSTEM_PROMPT",
    "TOKENIZER_DIR_NAME",
    "TOKENIZER_KINDS",
    "UNK_TOKEN",
    "TinyConfig",
    "build_sentencepiece_tokenizer",
    "build_tokenizer",
    "clip_image_processor",
    "derived_seed",
    "llama_config",
    "llama_style_tokenizer",
    "main",
    "released_tokenizer_config",
    "save_sentencepiece_tokenizer",
    "save_tokenizer",
    "seeded",
    "tokenizer_corpus",
    "train_bpe_backend",
    "train_sentencepiece",
    "write_projector_only",
    "write_tiny_clip",
    "write_tiny_llava",
]
