"""Build the model to train from an LLM or a LLaVA checkpoint, and decide which parameters train (the mode)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel

from llava.model.builder import (
    CONFIG_CLASSES,
    MODEL_CLASSES,
    PROJECTOR_PREFIX,
    TOWER_KEY_MAPPING,
    check_loading_info,
    load_projector_state,
    read_config,
    read_state_dict,
)
from llava.model.config import LlavaConfig, LlavaMistralConfig
from llava.model.hub import HUB_ID, local_checkpoint
from llava.model.tokenizer import load_tokenizer
from llava.model.vision_tower import quiet_load_report
from llava.train.arguments import DataArguments, ModelArguments, TrainingArguments

logger = logging.getLogger(__name__)

LLM_CONFIGS = {"llama": LlavaConfig, "mistral": LlavaMistralConfig}
# Architecture keys a flag may set; None on the flag keeps the checkpoint's value, or LLaVA's default for an LLM.
ARCH_DEFAULTS = {
    "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch",
    "mm_projector_type": "linear",
    "mm_patch_merge_type": "flat",
    "image_aspect_ratio": "square",
    "image_grid_pinpoints": None,
}
MODES = ("projector", "lora", "full")
NEWLINE_KEY = "model.image_newline"


def compute_dtype(args: TrainingArguments) -> torch.dtype:
    """bf16 / fp16 as the Trainer flags say, fp32 otherwise (the CPU)."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def check_attn_implementation(name: str) -> None:
    """FlashAttention only where the package is installed (it is GPU-only and optional)."""
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ImportError("flash_attention_2 needs flash-attn: pip install 'llava-visionzip[flash]' (GPU only)")


def build_config(model_args: ModelArguments, data_args: DataArguments, max_length: int):
    """The LLaVA config to train: a LLaVA checkpoint's own, or an LLM's plus the multimodal keys from the flags.

    ``model_args.model_name_or_path`` is a local folder here (``build_model`` resolves a hub id first).
    """
    path = Path(model_args.model_name_or_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model_name_or_path {path} has no config.json")
    flags = {
        "mm_vision_select_layer": model_args.mm_vision_select_layer,
        "mm_vision_select_feature": model_args.mm_vision_select_feature,
        "mm_projector_type": model_args.mm_projector_type,
        "mm_patch_merge_type": model_args.mm_patch_merge_type,
        "image_aspect_ratio": data_args.image_aspect_ratio,
        "image_grid_pinpoints": data_args.image_grid_pinpoints,
    }
    data = json.loads((path / "config.json").read_text())
    if data.get("model_type") in CONFIG_CLASSES or data.get("mm_vision_tower"):  # a LLaVA checkpoint
        config = read_config(path)
        if model_args.vision_tower:  # e.g. a local copy of the tower the checkpoint names by hub id
            config.mm_vision_tower = model_args.vision_tower
    else:
        if data.get("model_type") not in LLM_CONFIGS:
            raise ValueError(f"{path}: model_type {data.get('model_type')!r} is not one of {sorted(LLM_CONFIGS)}")
        if not model_args.vision_tower:
            raise ValueError(f"{path} is a plain LLM: pass --vision_tower (the CLIP to put in front of it)")
        config = LLM_CONFIGS[data.pop("model_type")].from_dict(data)
        config.mm_vision_tower = model_args.vision_tower
        flags = {k: ARCH_DEFAULTS[k] if v is None else v for k, v in flags.items()}
    for key, value in flags.items():
        if value is not None:
            setattr(config, key, value)
    config.tokenizer_padding_side, config.tokenizer_model_max_length = "right", max_length
    config.mm_use_im_start_end, config.mm_use_im_patch_token = False, False
    return config


def _quantization(bits: int) -> dict[str, Any]:
    if bits == 16:
        return {}
    if bits not in (4, 8):
        raise ValueError(f"--bits must be 16, 8 or 4, got {bits}")
    if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
        raise ImportError(f"--bits {bits} (QLoRA) needs bitsandbytes and a GPU: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_8bit=bits == 8, load_in_4bit=bits == 4)}


def read_projector_file(path: str | Path) -> dict[str, torch.Tensor]:
    """``--pretrain_mm_mlp_adapter``: a ``mm_projector.bin`` / ``.safetensors`` file, or a folder (or hub id, as
    LLaVA's released ``liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5``) holding one."""
    if not Path(path).exists() and HUB_ID.fullmatch(str(path)):
        path = local_checkpoint(str(path))
    path = Path(path)
    if path.is_dir():
        return read_state_dict(path, "mm_projector")
    if not path.is_file():
        raise FileNotFoundError(f"--pretrain_mm_mlp_adapter: no projector weights at {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def init_image_newline(model: PreTrainedModel) -> None:
    """Start a new ``image_newline`` (hidden,) (LLaVA-NeXT's stage 2 from a plain LLM) as LLaVA-NeXT starts it: normal,
    std 1/sqrt(hidden). ``from_pretrained`` initialises modules' weights, not a bare parameter that the checkpoint
    lacks: it would keep uninitialised memory (inf/nan seen), and every AnyRes image without VisionZip uses it."""
    newline = model.get_model().image_newline
    whole = contextlib.nullcontext()
    if hasattr(newline, "ds_numel"):  # built under ZeRO-3: each rank holds a slice; rank 0 draws the whole vector
        import deepspeed

        whole = deepspeed.zero.GatheredParameters([newline], modifier_rank=0)
    with whole, torch.no_grad():
        newline.normal_(0.0, newline.shape[0] ** -0.5)


def build_model(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments):
    """The model and tokenizer, with the tower loaded, the stage-1 projector if given, and VisionZip if asked."""
    if model_args.mm_use_im_start_end or model_args.mm_use_im_patch_token:
        raise ValueError("--mm_use_im_start_end / --mm_use_im_patch_token are not supported (LLaVA-1.5/1.6 use False)")
    check_attn_implementation(model_args.attn_implementation)
    # a hub id (lmsys/vicuna-7b-v1.5, liuhaotian/llava-v1.5-7b) read from the hub cache; the flags keep the id
    model_args = dataclasses.replace(model_args, model_name_or_path=local_checkpoint(model_args.model_name_or_path))
    config = build_config(model_args, data_args, training_args.model_max_length)
    dtype = compute_dtype(training_args)
    with quiet_load_report():  # check_loading_info reports what matters
        model, info = MODEL_CLASSES[type(config)].from_pretrained(
            model_args.model_name_or_path, config=config, attn_implementation=model_args.attn_implementation,
            dtype=dtype, key_mapping=TOWER_KEY_MAPPING, output_loading_info=True, **_quantization(training_args.bits),
        )  # fmt: skip
    if check_loading_info(info, model, (PROJECTOR_PREFIX, NEWLINE_KEY)):
        model.get_vision_tower().load_pretrained(dtype=dtype)
    if NEWLINE_KEY in info.get("missing_keys", ()):
        init_image_newline(model)
    if model_args.pretrain_mm_mlp_adapter:
        load_projector_state(model, read_projector_file(model_args.pretrain_mm_mlp_adapter),
                             model_args.pretrain_mm_mlp_adapter)  # fmt: skip
    model.config.use_cache = False
    select_layer = model.get_vision_tower().select_layer
    model.set_visionzip(model_args.visionzip(select_layer), model_args.visionzip_budget)
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    tokenizer.model_max_length, tokenizer.padding_side = training_args.model_max_length, "right"
    if tokenizer.pad_token is None:  # LLaVA pads Vicuna with <unk>
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return model, tokenizer


def training_mode(model_args: ModelArguments, training_args: TrainingArguments) -> str:
    """``projector`` (stage 1 and VisionZip‡), ``lora`` or ``full``."""
    if training_args.lora_enable:
        if model_args.tune_mm_mlp_adapter:
            raise ValueError("--lora_enable and --tune_mm_mlp_adapter exclude each other")
        return "lora"
    if training_args.bits != 16:
        raise ValueError("--bits 4/8 is QLoRA: pass --lora_enable True too")
    return "projector" if model_args.tune_mm_mlp_adapter else "full"


def lora_targets(model: nn.Module) -> list[str]:
    """Every linear layer of the LLM: not the tower, the projector or the output head (as LLaVA)."""
    skip = ("vision_tower", "mm_projector", "lm_head")
    names = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    return sorted(name for name in names if not any(s in name for s in skip))


def _numel(param: torch.Tensor) -> int:
    return getattr(param, "ds_numel", param.numel())  # ZeRO-3 partitions leave a local size of 0


def set_trainable(model: PreTrainedModel, mode: str, model_args: ModelArguments, training_args: TrainingArguments):
    """Freeze and unfreeze per mode; returns the model (a peft model for LoRA). The tower never trains."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    model.requires_grad_(mode == "full" and not model_args.freeze_backbone)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        args = training_args
        lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=lora_targets(model),
                          lora_dropout=args.lora_dropout, bias=args.lora_bias, task_type="CAUSAL_LM")  # fmt: skip
        model = get_peft_model(model, lora)
    projector = model.get_model().mm_projector
    projector.requires_grad_(not training_args.freeze_mm_mlp_adapter)
    newline = getattr(model.get_model(), "image_newline", None)
    if mode == "lora" and newline is not None:  # beside the adapter, as the projector: saved in non_lora_trainables,
        newline.requires_grad_(not training_args.freeze_mm_mlp_adapter)  # so a LoRA job on a plain LLM reloads it
    model.get_vision_tower().requires_grad_(False)
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: the checkpointed blocks still need a grad input
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise ValueError("nothing to train: every parameter is frozen (check --freeze_* and --tune_* flags)")
    logger.info("mode %s: %d trainable parameters of %d", mode, trainable, sum(_numel(p) for p in model.parameters()))
    return model
