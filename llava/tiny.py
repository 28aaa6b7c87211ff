"""Tiny random LLaVA-1.5 / LLaVA-1.6 checkpoints written in the on-disk layout of the released ones."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sentencepiece
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPConfig,
    CLIPModel,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from llava.model.tokenizer import FAST_FILE, SENTENCEPIECE_FILE, SPIECE_UNDERLINE

logger = logging.getLogger(__name__)

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

_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "gold")
_SHAPES = ("circle", "square", "triangle", "rectangle", "star", "heart", "oval", "diamond", "hexagon", "cube", "sphere")
_OBJECTS = (
    "cat", "dog", "cup", "car", "tree", "house", "person", "bird", "boat", "book", "chair", "table",
    "phone", "clock", "flower", "horse", "bus", "train", "plane", "pizza", "kite", "ball", "window", "bottle",
)  # fmt: skip
_SENTENCES = (
    "USER: <image>\nWhat is in the image? ASSISTANT: A cat.",
    "Describe the image in detail.",
    "What color is the cat? How many objects are there in the picture?",
    "Is there a person in this photo? Where is the cup placed? What is the man holding in his hand?",
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "The image shows a cat lying on a soft blanket next to a window, looking at the camera.",
    "A cup of coffee sits on a wooden table, with a saucer and a small spoon beside it.",
    "There are three apples, two bananas and one orange in the bowl.",
    "The sky is clear and blue; the sun is shining over the mountains and the lake.",
    "A dog is running across the green grass in the park while children play.",
    "Two people are riding bicycles along the street near the river at night.",
    'The text on the sign reads "STOP" in large white letters.',
    "It is a photograph taken outdoors during the day. Yes. No. Maybe, I am not sure.",
    "(A) left (B) right (C) top (D) bottom. The answer is B!",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 20 42 64 100 256 1000 2024 3.14 50% $5 #1",
    "Punctuation: . , ; : ! ? ' \" ( ) [ ] { } - _ / \\ @ & * + = < > ~ | ` ^",
    "one two three four five six seven eight nine ten first second third last big small large tiny",
    "above below under over behind front inside outside near far between on in at of with without",
    "The scene is a kitchen, a bedroom, a street, a beach, a forest, an office, a classroom or an airport.",
    "The weather looks sunny, cloudy, rainy, foggy or snowy; people wear jackets, hats and glasses.",
    "Please read the words, count the animals, and explain why the picture is funny or unusual.",
)


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


# ----------------------------------------------------------------------------------------------------------------------
# seeding


def derived_seed(seed: int, stream: str) -> int:
    """A seed for one named random stream, so that streams never share values whatever the order of calls."""
    digest = hashlib.sha256(f"{seed}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def _generator(seed: int, stream: str) -> torch.Generator:
    """A CPU generator seeded for `stream`."""
    return torch.Generator().manual_seed(derived_seed(seed, stream))


@contextmanager
def seeded(seed: int, stream: str) -> Iterator[None]:
    """Seed torch's global CPU RNG (which module initialisers use) and restore the caller's state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(seed, stream))
        yield


# ----------------------------------------------------------------------------------------------------------------------
# tokenizer


def tokenizer_corpus() -> list[str]:
    """The built-in English training text: the LLaVA system prompt, chat roles, questions, colours, shapes, digits."""
    lines = [SYSTEM_PROMPT, *_SENTENCES]
    for colour in _COLOURS:
        lines.extend(f"USER: Is the {shape} {colour}? ASSISTANT: Yes, the {shape} is {colour}." for shape in _SHAPES)
        lines.extend(f"There is a {colour} {obj} in the image. {obj.capitalize()}s are {colour}." for obj in _OBJECTS)
        lines.append(f"{colour.capitalize()} {colour.upper()}")
    return lines


def train_bpe_backend(corpus: Sequence[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on `corpus`; Llama's special tokens take ids 0, 1, 2 and BOS is prepended."""
    backend = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return backend


def _check_round_trip(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> None:
    """Raise ValueError unless every text encodes without <unk> and decodes back to itself."""
    for text in texts:
        ids = tokenizer(text).input_ids
        if tokenizer.unk_token_id in ids:
            raise ValueError(f"tokenizer produced {UNK_TOKEN} for {text!r}: {ids}")
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        if decoded != text:
            raise ValueError(f"tokenizer round trip: expected {text!r}, got {decoded!r}")


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> None:
    """Save with `save_pretrained` plus the special_tokens_map.json that released checkpoints carry.

    transformers 5 no longer writes that file (the special tokens live in tokenizer_config.json).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    special_map = {"unk_token": UNK_TOKEN, "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": UNK_TOKEN}
    _write_json(out_dir / "special_tokens_map.json", special_map)


def llama_style_tokenizer(corpus: Sequence[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """A BPE trained on `corpus` with Llama's conventions: <unk>=0 (also pad, as LLaVA sets it), <s>=1 prepended,
    </s>=2, right padding."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_bpe_backend(corpus, vocab_size),
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=UNK_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    expected = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    got = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    if got != expected:
        raise ValueError(f"special token ids: expected {expected}, got {got}")
    return tokenizer


def build_tokenizer(out_dir: str | Path, cfg: TinyConfig | None = None) -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE tokenizer with Llama's special tokens and save it to `out_dir`.

    Writes tokenizer.json, tokenizer_config.json (both via `save_pretrained`) and special_tokens_map.json, so that
    `AutoTokenizer.from_pretrained(out_dir)` gives the same tokenizer: <unk>=0 (also the pad token, as LLaVA sets it),
    <s>=1 prepended once by the post-processor, </s>=2, model_max_length and right padding as in LLaVA.
    """
    cfg = cfg or TinyConfig()
    out_dir = Path(out_dir)
    tokenizer = llama_style_tokenizer(tokenizer_corpus(), cfg.vocab_size, cfg.model_max_length)
    _check_round_trip(tokenizer, [*tokenizer_corpus(), " two  spaces ", "\tTabs\nand newlines\n", "Unicode: é 猫 🐱"])
    save_tokenizer(tokenizer, out_dir)
    logger.info("tokenizer with %d tokens written to %s", len(tokenizer), out_dir)
    return tokenizer


def train_sentencepiece(corpus: Sequence[str], vocab_size: int) -> bytes:
    """Train a sentencepiece BPE on `corpus` as Llama's tokenizer.model was trained; return the serialized model.

    Llama's settings: <unk>=0, <s>=1, </s>=2, no pad piece, byte fallback, the identity normalizer with a dummy
    prefix and whitespace kept as it is, digits split, whitespace-only pieces allowed. Every character of the
    corpus is kept (character_coverage 1.0), so `vocab_size` must hold the 3 special pieces, the 256 byte pieces
    and those characters. One thread: the same corpus gives the same bytes.
    """
    characters = set("".join(corpus).replace(" ", SPIECE_UNDERLINE)) | {SPIECE_UNDERLINE}
    required = len(SPECIAL_TOKENS) + BYTE_PIECES + len(characters)
    if vocab_size < required:
        raise ValueError(
            f"a sentencepiece vocabulary needs {len(SPECIAL_TOKENS)} special + {BYTE_PIECES} byte + "
            f"{len(characters)} character pieces: expected vocab_size >= {required}, got {vocab_size}"
        )
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, num_threads=1,
        minloglevel=1,  # warnings and errors only: the trainer logs every step at level 0
    )  # fmt: skip
    return model.getvalue()


def _check_sentencepiece(model: bytes, texts: Sequence[str]) -> sentencepiece.SentencePieceProcessor:
    """Raise ValueError unless the special pieces have Llama's ids and every text encodes without <unk> and decodes
    back to itself; return the processor."""
    processor = sentencepiece.SentencePieceProcessor(model_proto=model)
    got = [processor.id_to_piece(i) for i in range(len(SPECIAL_TOKENS))]
    if got != list(SPECIAL_TOKENS):
        raise ValueError(f"sentencepiece special pieces: expected {list(SPECIAL_TOKENS)} at ids 0.., got {got}")
    for text in texts:
        ids = processor.encode(text)
        if processor.unk_id() in ids:
            raise ValueError(f"sentencepiece produced {UNK_TOKEN} for {text!r}: {ids}")
        if processor.decode(ids) != text:
            raise ValueError(f"sentencepiece round trip: expected {text!r}, got {processor.decode(ids)!r}")
    return processor


def _released_added_token(content: str, with_type: bool) -> dict[str, Any]:
    """An AddedToken as transformers 4.31 serialised it (tokenizer_config.json adds `__type`)."""
    token = {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", **token} if with_type else token


def released_tokenizer_config(legacy: bool, model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json as the released LLaVA-1.5 checkpoints ship it (LLaVA's training saved Vicuna-v1.5's).

    `legacy` is false in those files; true is the older Llama/Vicuna behaviour (a "▁" after each special token).
    The pad token is null here and "<unk>" in special_tokens_map.json, as LLaVA left them.
    """
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _released_added_token(BOS_TOKEN, with_type=True),
        "clean_up_tokenization_spaces": False,
        "eos_token": _released_added_token(EOS_TOKEN, with_type=True),
        "legacy": legacy,
        "model_max_length": model_max_length,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": _released_added_token(UNK_TOKEN, with_type=True),
    }


def save_sentencepiece_tokenizer(model: bytes, out_dir: str | Path, legacy: bool, model_max_length: int) -> None:
    """Write tokenizer.model, the released tokenizer_config.json and special_tokens_map.json (no tokenizer.json:
    one left by an earlier write is removed, so that the folder is read from the sentencepiece file)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / FAST_FILE).unlink(missing_ok=True)
    (out_dir / SENTENCEPIECE_FILE).write_bytes(model)
    _write_json(out_dir / "tokenizer_config.json", released_tokenizer_config(legacy, model_max_length))
    special_map = {
        "bos_token": _released_added_token(BOS_TOKEN, with_type=False),
        "eos_token": _released_added_token(EOS_TOKEN, with_type=False),
        "pad_token": UNK_TOKEN,
        "unk_token": _released_added_token(UNK_TOKEN, with_type=False),
    }
    _write_json(out_dir / "special_tokens_map.json", special_map)


def build_sentencepiece_tokenizer(out_dir: str | Path, cfg: TinyConfig | None = None, *, legacy: bool = False) -> bytes:
    """Train the tiny sentencepiece tokenizer on the built-in corpus and save it to `out_dir` in the released layout.

    Writes tokenizer.model, tokenizer_config.json (LlamaTokenizer, add_bos_token, `legacy`, right padding) and
    special_tokens_map.json; no tokenizer.json. Returns the serialized sentencepiece model.
    """
    cfg = cfg or TinyConfig()
    model = train_sentencepiece(tokenizer_corpus(), cfg.vocab_size)
    extra = [" two  spaces ", "\tTabs\nand newlines\n", "Unicode: é 猫 🐱", "digits 2024 and 3.14"]
    processor = _check_sentencepiece(model, [*tokenizer_corpus(), *extra])
    save_sentencepiece_tokenizer(model, out_dir, legacy, cfg.model_max_length)
    logger.info("sentencepiece tokenizer with %d pieces written to %s", processor.get_piece_size(), out_dir)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# CLIP tower


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


def _check_existing_clip(clip_dir: Path, cfg: TinyConfig) -> None:
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
    `vision_model.*` / `text_model.*` keys, and preprocessor_config.json (resize the shortest edge to image_size,
    centre crop image_size x image_size, OpenAI CLIP mean/std). Seeded by `cfg.clip_seed`. Returns `out_dir`.
    """
    cfg = cfg or TinyConfig()
    out_dir = Path(out_dir)
    with seeded(cfg.clip_seed, "clip"):
        model = CLIPModel(_clip_config(cfg))
    model.save_pretrained(out_dir)
    processor = clip_image_processor(cfg.image_size)
    processor.save_pretrained(out_dir)
    logger.info("tiny CLIP written to %s", out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------------------------------
# config.json


def llama_config(cfg: Any, vocab_size: int) -> LlamaConfig:
    """A small Llama from `cfg`'s sizes (hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads,
    max_position_embeddings, rms_norm_eps, rope_theta); token ids follow the tokenizer (pad 0, bos 1, eos 2)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=False,
        pad_token_id=SPECIAL_TOKENS.index(UNK_TOKEN),
        bos_token_id=SPECIAL_TOKENS.index(BOS_TOKEN),
        eos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN),
        dtype="float32",
    )


def _legacy_llama_keys(llama: LlamaConfig) -> dict:
    """LlamaConfig keys as transformers 4.x wrote them: `torch_dtype`, `rope_theta` and `rope_scaling`."""
    keys = llama.to_diff_dict()
    keys.pop("transformers_version", None)
    keys["torch_dtype"] = keys.pop("dtype", "float32")
    rope = dict(keys.pop("rope_parameters", None) or {})
    keys["rope_theta"] = rope.pop("rope_theta", None)
    rope_type = rope.pop("rope_type", "default")
    keys["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
    return keys


def _llava_keys(cfg: TinyConfig, clip_dir: Path, next: bool) -> dict:
    """The multimodal keys LLaVA's training writes into config.json (v1.5 or, with `next`, v1.6)."""
    keys = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama" if next else "llava",
        "transformers_version": RELEASED_TRANSFORMERS_VERSION[next],
        "mm_vision_tower": str(clip_dir.resolve()),
        "mm_hidden_size": cfg.vision_hidden_size,
        "mm_vision_select_layer": cfg.select_layer,
        "mm_vision_select_feature": "patch",
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": cfg.model_max_length,
        "use_mm_proj": True,
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False,
        "tune_mm_vision_resampler": False,
        "freeze_mm_vision_resampler": False,
        "image_aspect_ratio": "anyres" if next else "pad",
        "mm_patch_merge_type": "spatial_unpad" if next else "flat",
    }
    if next:
        keys.update(
            image_grid_pinpoints=cfg.grid_pinpoints,
            unfreeze_mm_vision_tower=True,
            mm_vision_tower_lr=cfg.vision_tower_lr,
            mm_projector_lr=None,
            mm_resampler_type=None,
            image_crop_resolution=None,
            image_split_resolution=None,
        )
    return keys


def _write_json(path: Path, data: dict) -> None:
    """Write `data` as sorted, indented JSON as `save_pretrained` does."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------------------------------
# weights


def _fresh(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy that owns its storage, so that saving it writes only its own bytes."""
    return tensor.detach().clone().contiguous()


def _llama_weights(llama: LlamaConfig, seed: int) -> dict[str, torch.Tensor]:
    """Randomly initialised `LlamaForCausalLM` weights under their own (released) names."""
    with seeded(seed, "llama"):
        model = LlamaForCausalLM(llama)
    return {key: _fresh(value) for key, value in model.state_dict().items()}


def _linear(in_features: int, out_features: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (out, in) and bias (out,) drawn uniformly in +-1/sqrt(in), as torch.nn.Linear initialises them."""
    bound = 1.0 / math.sqrt(in_features)
    weight = (torch.rand(out_features, in_features, generator=generator) * 2 - 1) * bound
    bias = (torch.rand(out_features, generator=generator) * 2 - 1) * bound
    return weight, bias


def _projector_weights(mm_hidden_size: int, hidden_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """`mlp2x_gelu` projector: Sequential(Linear(mm_hidden, hidden), GELU, Linear(hidden, hidden))."""
    w0, b0 = _linear(mm_hidden_size, hidden_size, generator)
    w2, b2 = _linear(hidden_size, hidden_size, generator)
    names = ("0.weight", "0.bias", "2.weight", "2.bias")
    return {PROJECTOR_PREFIX + name: value for name, value in zip(names, (w0, b0, w2, b2), strict=True)}


def _tuned_tower_weights(clip_dir: Path, noise: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The vision half of clip/ plus seeded noise, named as LLaVA-1.6 saved its tuned tower.

    clip/model.safetensors names vision weights `vision_model.<...>` (a full CLIPModel), which is exactly the
    transformers 4.x `CLIPVisionModel` naming, so the prefix `model.vision_tower.vision_tower.` completes them.
    """
    clip = load_file(clip_dir / "model.safetensors")
    return {
        TUNED_TOWER_PREFIX + key: value + noise * torch.randn(value.shape, generator=generator)
        for key, value in clip.items()
        if key.startswith(CLIP_VISION_PREFIX)
    }


def _rotary_inv_freq(cfg: TinyConfig) -> dict[str, torch.Tensor]:
    """The per-layer `rotary_emb.inv_freq` buffers that transformers 4.31 still saved in the LLaVA-1.5 .bin shards."""
    exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
    return {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq.clone() for i in range(cfg.num_layers)}


def _nbytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor's data."""
    return tensor.numel() * tensor.element_size()


def _split_even(tensors: dict[str, torch.Tensor], num_shards: int) -> list[dict[str, torch.Tensor]]:
    """Cut the ordered tensors into exactly `num_shards` non-empty shards of about equal byte size."""
    if not 1 <= num_shards <= len(tensors):
        raise ValueError(f"expected 1 <= num_shards <= {len(tensors)} (the number of tensors), got {num_shards}")
    total = sum(_nbytes(t) for t in tensors.values())
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    done = 0
    for key, value in tensors.items():
        middle = done + _nbytes(value) / 2  # a tensor goes to the shard its byte midpoint falls in
        shards[min(int(middle * num_shards / total), num_shards - 1)][key] = value
        done += _nbytes(value)
    if all(shards):
        return shards
    # a few huge tensors left a shard empty: split by tensor count instead, which never does
    shards = [{} for _ in range(num_shards)]
    for i, (key, value) in enumerate(tensors.items()):
        shards[i * num_shards // len(tensors)][key] = value
    return shards


def _split_by_size(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Cut the ordered tensors greedily into shards of at most `max_bytes` (a bigger tensor gets its own shard)."""
    if max_bytes <= 0:
        raise ValueError(f"expected a positive shard size in bytes, got {max_bytes}")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in tensors.items():
        if shards[-1] and size + _nbytes(value) > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += _nbytes(value)
    return shards


def _save_shards(shards: list[dict[str, torch.Tensor]], ckpt_dir: Path, fmt: str) -> list[str]:
    """Write each shard with the file names transformers uses; return the file names, and the index if sharded."""
    if fmt not in FORMATS:
        raise ValueError(f"expected fmt in {FORMATS}, got {fmt!r}")
    stem, suffix = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    count = len(shards)
    names = (
        [f"{stem}.{suffix}"] if count == 1 else [f"{stem}-{i:05d}-of-{count:05d}.{suffix}" for i in range(1, count + 1)]
    )
    for name, shard in zip(names, shards, strict=True):
        if fmt == "safetensors":
            save_file(shard, ckpt_dir / name, metadata={"format": "pt"})
        else:
            torch.save(shard, ckpt_dir / name)
    if count > 1:
        weight_map = {key: name for name, shard in zip(names, shards, strict=True) for key in shard}
        total = sum(_nbytes(t) for shard in shards for t in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_json(ckpt_dir / f"{stem}.{suffix}.index.json", index)
    return names


def _save_weights(
    tensors: dict[str, torch.Tensor], ckpt_dir: Path, fmt: str, cfg: TinyConfig, shard_size: int | None
) -> list[str]:
    """Save as one model.safetensors, or size-capped safetensors shards, or `cfg.bin_shards` .bin shards."""
    if shard_size is not None:
        shards = _split_by_size(tensors, shard_size)
    elif fmt == "bin":
        shards = _split_even(tensors, cfg.bin_shards)
    else:
        shards = [tensors]
    return _save_shards(shards, ckpt_dir, fmt)


# ----------------------------------------------------------------------------------------------------------------------
# public writers


def _write_tokenizers(kind: str, folders: Sequence[Path], cfg: TinyConfig) -> int:
    """Build the `kind` tokenizer into the first folder, copy its files into the others; return its vocabulary size.

    The files of the other kind are removed, so that a folder rewritten with another kind reads as that one.
    """
    if kind == "sentencepiece":
        model = build_sentencepiece_tokenizer(folders[0], cfg)
        for folder in folders[1:]:
            save_sentencepiece_tokenizer(model, folder, legacy=False, model_max_length=cfg.model_max_length)
        return sentencepiece.SentencePieceProcessor(model_proto=model).get_piece_size()
    built = build_tokenizer(folders[0], cfg)
    for folder in folders:
        save_tokenizer(built, folder)
        (folder / SENTENCEPIECE_FILE).unlink(missing_ok=True)
    return len(built)


def write_tiny_llava(
    out_dir: str | Path,
    *,
    next: bool = False,
    fmt: str = "safetensors",
    seed: int = 0,
    cfg: TinyConfig | None = None,
    shard_size: int | None = None,
    tokenizer: str = "bpe",
) -> Path:
    """Write a tiny random LLaVA-1.5 (or, with `next`, LLaVA-1.6) checkpoint in the released layout.

    Into `out_dir`: `clip/` (the vision tower, kept if already there), `tokenizer/`, and the checkpoint folder
    `llava-v1.5-tiny` / `llava-v1.6-tiny` with config.json (`mm_vision_tower` = absolute path of clip/), the
    tokenizer files, generation_config.json and the weights (`fmt` "safetensors" or "bin"; see `_save_weights`).
    `tokenizer`: "bpe" (tokenizer.json, the default) or "sentencepiece" (tokenizer.model and the released
    LlamaTokenizer config, legacy false, no tokenizer.json: the files liuhaotian/llava-v1.5-7b ships).
    Weights: Llama keys, `model.mm_projector.{0,2}.{weight,bias}`; v1.6 adds `model.image_newline` (hidden,) and
    the tuned tower `model.vision_tower.vision_tower.vision_model.*`; .bin adds `rotary_emb.inv_freq` buffers.
    Returns the checkpoint folder.
    """
    cfg = cfg or TinyConfig()
    if fmt not in FORMATS:
        raise ValueError(f"expected fmt in {FORMATS}, got {fmt!r}")
    if tokenizer not in TOKENIZER_KINDS:
        raise ValueError(f"expected tokenizer in {TOKENIZER_KINDS}, got {tokenizer!r}")
    out_dir = Path(out_dir)
    clip_dir = out_dir / CLIP_DIR_NAME
    if (clip_dir / "model.safetensors").is_file():
        _check_existing_clip(clip_dir, cfg)
        logger.info("reusing the CLIP tower in %s", clip_dir)
    else:
        write_tiny_clip(clip_dir, cfg)
    ckpt_dir = out_dir / CHECKPOINT_NAMES[next]
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*ckpt_dir.glob("model*.safetensors*"), *ckpt_dir.glob("pytorch_model*.bin*")]:
        stale.unlink()  # a rewrite in the other format must not leave the first one's weights behind
    vocab_size = _write_tokenizers(tokenizer, [out_dir / TOKENIZER_DIR_NAME, ckpt_dir], cfg)
    llama = llama_config(cfg, vocab_size)
    _write_json(ckpt_dir / "config.json", {**_legacy_llama_keys(llama), **_llava_keys(cfg, clip_dir, next)})
    GenerationConfig(
        bos_token_id=llama.bos_token_id, eos_token_id=llama.eos_token_id, pad_token_id=llama.pad_token_id
    ).save_pretrained(ckpt_dir)

    tensors = _llama_weights(llama, seed)
    tensors.update(_projector_weights(cfg.vision_hidden_size, cfg.hidden_size, _generator(seed, "projector")))
    if next:
        newline = torch.randn(cfg.hidden_size, generator=_generator(seed, "image_newline")) / math.sqrt(cfg.hidden_size)
        tensors["model.image_newline"] = newline
        tensors.update(_tuned_tower_weights(clip_dir, cfg.tuned_tower_noise, _generator(seed, "tuned_tower")))
    if fmt == "bin":
        tensors.update(_rotary_inv_freq(cfg))
    files = _save_weights(tensors, ckpt_dir, fmt, cfg, shard_size)
    logger.info("tiny %s written to %s (%d tensors in %s)", CHECKPOINT_NAMES[next], ckpt_dir, len(tensors), files)
    return ckpt_dir


def write_projector_only(out_dir: str | Path, base_checkpoint_dir: str | Path, seed: int) -> Path:
    """Write a folder as LLaVA's pretraining stage saves it: config.json and mm_projector.bin.

    config.json is the base checkpoint's with `tune_mm_mlp_adapter: true`; mm_projector.bin is a `torch.save`d
    dict holding only `model.mm_projector.*` keys, drawn from a random stream no full checkpoint uses.
    Returns `out_dir`.
    """
    out_dir = Path(out_dir)
    config = json.loads((Path(base_checkpoint_dir) / "config.json").read_text())
    config["tune_mm_mlp_adapter"] = True
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "config.json", config)
    generator = _generator(seed, "projector_only")
    torch.save(
        _projector_weights(config["mm_hidden_size"], config["hidden_size"], generator), out_dir / "mm_projector.bin"
    )
    logger.info("projector-only checkpoint written to %s", out_dir)
    return out_dir


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: write a tiny checkpoint and print its folder."""
    parser = argparse.ArgumentParser(prog="python -m llava.tiny", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for clip/, tokenizer/ and the checkpoint")
    parser.add_argument("--next", action="store_true", help="LLaVA-1.6 (AnyRes, tuned tower) instead of LLaVA-1.5")
    parser.add_argument("--format", choices=FORMATS, default="safetensors", dest="fmt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=None, help="largest shard in bytes (default: no cap)")
    parser.add_argument(
        "--tokenizer", choices=TOKENIZER_KINDS, default="bpe",
        help="bpe: tokenizer.json; sentencepiece: tokenizer.model and the released LlamaTokenizer config",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = write_tiny_llava(
        args.out, next=args.next, fmt=args.fmt, seed=args.seed, shard_size=args.shard_size, tokenizer=args.tokenizer
    )
    print(path)


if __name__ == "__main__":
    main()
