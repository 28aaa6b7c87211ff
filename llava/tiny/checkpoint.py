"""Tiny random LLaVA-1.5 / LLaVA-1.6 checkpoints written in the on-disk layout of the released ones."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sentencepiece
import torch
from transformers import GenerationConfig, LlamaConfig

from llava.model.tokenizer import SENTENCEPIECE_FILE
from llava.tiny.clip import check_existing_clip, write_tiny_clip
from llava.tiny.config import (
    BOS_TOKEN,
    CHECKPOINT_NAMES,
    CLIP_DIR_NAME,
    EOS_TOKEN,
    FORMATS,
    RELEASED_TRANSFORMERS_VERSION,
    SPECIAL_TOKENS,
    TOKENIZER_DIR_NAME,
    TOKENIZER_KINDS,
    UNK_TOKEN,
    TinyConfig,
    stream_generator,
    write_json,
)
from llava.tiny.tokenizer import (
    build_sentencepiece_tokenizer,
    build_tokenizer,
    save_sentencepiece_tokenizer,
    save_tokenizer,
)
from llava.tiny.weights import llama_weights, projector_weights, rotary_inv_freq, save_weights, tuned_tower_weights

logger = logging.getLogger(__name__)


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


def _clip_folder(clip_dir: Path, cfg: TinyConfig) -> Path:
    """Write the CLIP tower into `clip_dir`, or keep the one already there after checking its sizes."""
    if (clip_dir / "model.safetensors").is_file():
        check_existing_clip(clip_dir, cfg)
        logger.info("reusing the CLIP tower in %s", clip_dir)
    else:
        write_tiny_clip(clip_dir, cfg)
    return clip_dir


def _checkpoint_tensors(
    llama: LlamaConfig, cfg: TinyConfig, clip_dir: Path, seed: int, *, next: bool, fmt: str
) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint under its released name, each drawn from its own seeded stream."""
    tensors = llama_weights(llama, seed)
    tensors.update(projector_weights(cfg.vision_hidden_size, cfg.hidden_size, stream_generator(seed, "projector")))
    if next:
        newline = torch.randn(cfg.hidden_size, generator=stream_generator(seed, "image_newline"))  # (hidden,)
        tensors["model.image_newline"] = newline / math.sqrt(cfg.hidden_size)
        tensors.update(tuned_tower_weights(clip_dir, cfg.tuned_tower_noise, stream_generator(seed, "tuned_tower")))
    if fmt == "bin":
        tensors.update(rotary_inv_freq(cfg))
    return tensors


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
    tokenizer files, generation_config.json and the weights (`fmt` "safetensors" or "bin"; see `save_weights`).
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
    clip_dir = _clip_folder(out_dir / CLIP_DIR_NAME, cfg)
    ckpt_dir = out_dir / CHECKPOINT_NAMES[next]
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*ckpt_dir.glob("model*.safetensors*"), *ckpt_dir.glob("pytorch_model*.bin*")]:
        stale.unlink()  # a rewrite in the other format must not leave the first one's weights behind
    vocab_size = _write_tokenizers(tokenizer, [out_dir / TOKENIZER_DIR_NAME, ckpt_dir], cfg)
    llama = llama_config(cfg, vocab_size)
    write_json(ckpt_dir / "config.json", {**_legacy_llama_keys(llama), **_llava_keys(cfg, clip_dir, next)})
    GenerationConfig(
        bos_token_id=llama.bos_token_id, eos_token_id=llama.eos_token_id, pad_token_id=llama.pad_token_id
    ).save_pretrained(ckpt_dir)
    tensors = _checkpoint_tensors(llama, cfg, clip_dir, seed, next=next, fmt=fmt)
    files = save_weights(tensors, ckpt_dir, fmt, cfg, shard_size)
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
    write_json(out_dir / "config.json", config)
    projector_generator = stream_generator(seed, "projector_only")
    torch.save(
        projector_weights(config["mm_hidden_size"], config["hidden_size"], projector_generator),
        out_dir / "mm_projector.bin",
    )
    logger.info("projector-only checkpoint written to %s", out_dir)
    return out_dir
