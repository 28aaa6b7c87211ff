"""Our LLaVA as transformers' LLaVA / LLaVA-NeXT classes (llava-hf layout): config, weights and the whole export.

Weights: ours ``model.{embed_tokens,layers,norm}`` -> ``model.language_model.*``; ``model.vision_tower.vision_tower.*``
(LLaVA-1.5's tower is read from ``mm_vision_tower``) -> ``model.vision_tower.*``; ``model.mm_projector.{0,2}`` ->
``model.multi_modal_projector.linear_{1,2}``; ``model.image_newline`` stays; ``lm_head`` stays (transformers'
``save_pretrained`` writes its own on-disk names). The weights keep the checkpoint's dtype (``--dtype`` to change).

Image token: ours is the placeholder id -200, outside the vocabulary; transformers' is a real token. ``<image>`` is
added to the tokenizer as a special token, with one embedding row and one ``lm_head`` row, both the mean of the
existing rows (the embedding row is always replaced by image features; a mean ``lm_head`` row gives the mean logit,
never above the largest, so greedy decoding never picks it), and ``generation_config.suppress_tokens`` keeps
sampling off it too. The exported logits have that one extra column; the others equal ours.

VisionZip: a checkpoint that saves a budget (``config.visionzip``, as VisionZip‡ training writes it) keeps it as
``visionzip`` (``VisionZipConfig.to_dict()``) in config.json, where the VisionZip subclasses of transformers'
classes (``visionzip.hf.llava``, ``visionzip.hf.llava_next``) read it; transformers' own classes ignore the key and
run without VisionZip. Those subclasses take one budget per view with packed positions: a ``total`` budget over a
NeXT image's views or ``positions="original"`` cannot be expressed there and raises.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    LlamaConfig,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    MistralConfig,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import LlavaConfig as HFLlavaConfig
from transformers import LlavaNextConfig as HFLlavaNextConfig

from llava.conversation import get_conv_template
from llava.inference import default_conv_mode
from llava.model.builder import load_pretrained_model, read_config
from llava.model.config import LlavaConfig, LlavaConfigMixin, LlavaMistralConfig
from llava.model.hf_processor import SELECT_STRATEGIES, build_processor, declare_backend, export_tokenizer, hf_pinpoints
from llava.model.hub import local_checkpoint
from llava.model.placement import parse_dtype

logger = logging.getLogger(__name__)

HF_CLASSES: dict[str, tuple[type[PreTrainedConfig], type[PreTrainedModel]]] = {
    "llava": (HFLlavaConfig, LlavaForConditionalGeneration),
    "llava_next": (HFLlavaNextConfig, LlavaNextForConditionalGeneration),
}
TEXT_CONFIGS: dict[type[PreTrainedConfig], type[PreTrainedConfig]] = {
    LlavaConfig: LlamaConfig,
    LlavaMistralConfig: MistralConfig,
}
# our parameter names (prefix) -> those of transformers' Llava*ForConditionalGeneration, first match wins
KEY_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.vision_tower.", "model.vision_tower."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.image_newline", "model.image_newline"),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)
EMBEDDING_KEYS = ("model.language_model.embed_tokens.weight", "lm_head.weight")
PROJECTOR_TYPE = "mlp2x_gelu"  # transformers' projector: Linear, GELU, Linear


def _listed(keys: Sequence[str], limit: int = 20) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


# --- what can be exported --------------------------------------------------------------------------------------------
def hf_family(config: PreTrainedConfig) -> str:
    """``"llava"`` or ``"llava_next"``: the transformers family of our config; ValueError naming what does not fit."""
    problems = []
    if type(config) not in TEXT_CONFIGS:
        problems.append(f"config class {type(config).__name__} (expected one of {[c.__name__ for c in TEXT_CONFIGS]})")
    if config.mm_projector_type != PROJECTOR_TYPE:
        problems.append(f"mm_projector_type {config.mm_projector_type!r} (transformers' projector is {PROJECTOR_TYPE})")
    if config.mm_use_im_start_end or config.mm_use_im_patch_token:
        problems.append("mm_use_im_start_end / mm_use_im_patch_token (transformers adds no image start/end tokens)")
    if config.mm_vision_select_feature not in SELECT_STRATEGIES:
        problems.append(f"mm_vision_select_feature {config.mm_vision_select_feature!r}")
    aspect, merge = config.image_aspect_ratio or "square", config.mm_patch_merge_type or "flat"
    family = "llava_next" if aspect == "anyres" else "llava"
    if aspect not in ("square", "pad", "anyres"):
        problems.append(f"image_aspect_ratio {aspect!r} (expected square, pad or anyres)")
    elif family == "llava" and merge != "flat":
        problems.append(f"mm_patch_merge_type {merge!r} with image_aspect_ratio {aspect!r} (expected flat)")
    elif family == "llava_next" and merge != "spatial_unpad":
        problems.append(f"mm_patch_merge_type {merge!r} with anyres (transformers' LLaVA-NeXT is spatial_unpad)")
    if problems:
        raise ValueError("cannot export to transformers' LLaVA classes: " + "; ".join(problems))
    return family


def visionzip_entry(config: PreTrainedConfig, family: str) -> dict | None:
    """The exported ``visionzip`` value (``VisionZipConfig.to_dict()``), or None when the checkpoint saves none."""
    cfg = config.visionzip_config()
    if cfg is None:
        return None
    if cfg.positions != "packed":
        raise ValueError(
            f"the checkpoint saves VisionZip positions={cfg.positions!r}; transformers' classes place visual tokens "
            "packed only: expected positions='packed'"
        )
    if family == "llava_next" and getattr(config, "visionzip_budget", "per_crop") != "per_crop":
        raise ValueError(
            f"the checkpoint saves a VisionZip budget of {cfg.tokens} in total over each image's views; the "
            "transformers classes take one budget per view: expected visionzip_budget='per_crop'"
        )
    return cfg.to_dict()


# --- config ----------------------------------------------------------------------------------------------------------
def text_config(config: PreTrainedConfig, vocab_size: int) -> PreTrainedConfig:
    """The language model's config alone (Llama or Mistral): our config without LLaVA's keys, ``vocab_size`` set."""
    text_cls = TEXT_CONFIGS[type(config)]
    fields = {f.name for f in dataclasses.fields(text_cls)} - {f.name for f in dataclasses.fields(LlavaConfigMixin)}
    data = {k: v for k, v in config.to_dict().items() if k in fields and k not in ("architectures", "dtype")}
    return text_cls(**{**data, "vocab_size": vocab_size})


def hf_config(
    config: PreTrainedConfig, vision: PreTrainedConfig, family: str, image_token_id: int, vocab_size: int
) -> PreTrainedConfig:
    """transformers' ``LlavaConfig`` / ``LlavaNextConfig`` for our config and its tower's ``CLIPVisionConfig``."""
    side = vision.image_size // vision.patch_size
    strategy = SELECT_STRATEGIES[config.mm_vision_select_feature]
    vision_dict = {k: v for k, v in vision.to_dict().items() if k != "_name_or_path"}  # a local path of the source
    kwargs: dict[str, Any] = dict(
        text_config=text_config(config, vocab_size), vision_config=vision_dict,
        image_token_index=image_token_id, projector_hidden_act="gelu", multimodal_projector_bias=True,
        vision_feature_layer=config.mm_vision_select_layer, vision_feature_select_strategy=strategy,
        image_seq_length=side * side + (1 if strategy == "full" else 0), tie_word_embeddings=False,
        pad_token_id=config.pad_token_id,
    )  # fmt: skip
    if family == "llava_next":
        kwargs["image_grid_pinpoints"] = hf_pinpoints(config, vision.image_size)
    out = HF_CLASSES[family][0](**kwargs)
    budget = visionzip_entry(config, family)
    if budget is not None:
        out.visionzip = budget
    return out


# --- weights ---------------------------------------------------------------------------------------------------------
def rename_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our parameter names -> transformers' (``KEY_PREFIXES``); ValueError naming any key it cannot place."""
    renamed, unplaced = {}, []
    for key, value in state.items():
        prefix = next((p for p in KEY_PREFIXES if key.startswith(p[0])), None)
        if prefix is None:
            unplaced.append(key)
        else:
            renamed[prefix[1] + key.removeprefix(prefix[0])] = value
    if unplaced:
        raise ValueError(f"weights with no place in transformers' LLaVA classes: {_listed(unplaced)}")
    return renamed


def add_image_token_rows(state: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """Grow the embedding (V, C) and ``lm_head`` (V, C) to ``vocab_size`` rows, each new row their mean row."""
    out = dict(state)
    for key in EMBEDDING_KEYS:
        weight = state[key]  # (V, C)
        extra = vocab_size - weight.shape[0]
        if extra > 0:
            mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)  # (1, C)
            out[key] = torch.cat([weight, mean.expand(extra, -1)])
    return out


def build_hf_model(config: PreTrainedConfig, family: str, state: dict[str, torch.Tensor]) -> PreTrainedModel:
    """transformers' model for ``config`` holding ``state`` (no copy: built on the meta device, then assigned).

    ValueError naming the parameters ``state`` lacks or has in excess.
    """
    with torch.device("meta"):
        model = HF_CLASSES[family][1](config)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint does not fill transformers' {type(model).__name__}: missing [{_listed(list(missing))}]; "
            f"unexpected [{_listed(list(unexpected))}]"
        )
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# --- the export ------------------------------------------------------------------------------------------------------
def source_dtype(src: str | Path) -> torch.dtype:
    """The dtype ``src`` was saved in (config.json's ``torch_dtype``/``dtype``), float32 if it names none."""
    dtype = getattr(read_config(local_checkpoint(str(src), weights=False)), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _check_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty: expected a new or empty folder for the export")


def export_to_hf(
    src: str | Path, out: str | Path, model_base: str | None = None, conv_mode: str | None = None,
    dtype: torch.dtype | str | None = None,
) -> Path:  # fmt: skip
    """Write checkpoint ``src`` (on ``model_base`` for projector-only/LoRA folders) to ``out`` in the llava-hf layout.

    ``conv_mode``: the chat template (default: the one ``run_llava`` uses for this backbone); ``dtype``: of the
    exported weights (default: the checkpoint's). Returns ``out``. Raises ValueError for a source it cannot convert.
    """
    out = Path(out)
    _check_out(out)
    dtype = parse_dtype(dtype) or source_dtype(src)
    tokenizer, model, tower_processor, _ = load_pretrained_model(
        str(src), model_base, device="cpu", device_map=None, dtype=dtype
    )
    config = model.config
    family = hf_family(config)
    conv = get_conv_template(conv_mode or default_conv_mode(config))
    image_token_id = export_tokenizer(tokenizer, conv)
    vocab_size = max(config.vocab_size, image_token_id + 1)
    vision = model.get_vision_tower().config
    exported = hf_config(config, vision, family, image_token_id, vocab_size)
    state = add_image_token_rows(rename_state_dict(model.state_dict()), vocab_size)
    hf_model = build_hf_model(exported, family, state)
    hf_model.generation_config = copy.deepcopy(model.generation_config)
    hf_model.generation_config.suppress_tokens = [image_token_id]
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out)
    build_processor(tokenizer, tower_processor, config, family, vision, conv).save_pretrained(out)
    declare_backend(out / "tokenizer_config.json")
    logger.info("exported %s (%s) to %s as %s", src, family, out, type(hf_model).__name__)
    return out
