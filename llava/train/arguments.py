"""Training options with LLaVA's flag names, ours beside them, and YAML configs that flags override."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import transformers
import yaml

from llava.model.placement import ATTN_IMPLEMENTATIONS
from visionzip import VisionZipConfig


@dataclass
class ModelArguments:
    """What to train: the LLM (or a LLaVA checkpoint), the tower, the projector, the VisionZip stage."""

    model_name_or_path: str = field(default="", metadata={"help": "an LLM (stage 1) or a LLaVA checkpoint"})
    version: str = field(default="v1", metadata={"help": "conversation template: plain, v1, llava_llama_2, mpt..."})
    vision_tower: str | None = field(default=None, metadata={"help": "CLIP directory or hub id"})
    # Architecture keys: None inherits a LLaVA checkpoint's value, else LLaVA's default (-2, patch, linear, flat).
    mm_vision_select_layer: int | None = None
    mm_vision_select_feature: str | None = None
    mm_projector_type: str | None = None
    pretrain_mm_mlp_adapter: str | None = field(default=None, metadata={"help": "mm_projector.bin of stage 1"})
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "train the projector only"})
    freeze_backbone: bool = field(default=False, metadata={"help": "freeze the LLM"})
    mm_patch_merge_type: str | None = None
    mm_use_im_start_end: bool = False
    mm_use_im_patch_token: bool = False
    attn_implementation: str = field(default="sdpa", metadata={"help": " | ".join(ATTN_IMPLEMENTATIONS)})
    visionzip_dominant: int | None = field(default=None, metadata={"help": "dominant tokens ([CLS] included)"})
    visionzip_contextual: int | None = field(default=None, metadata={"help": "contextual tokens"})
    visionzip_layer: int | None = field(default=None, metadata={"help": "default: mm_vision_select_layer"})
    visionzip_merge: str = field(default="paper", metadata={"help": "paper | mean"})
    visionzip_positions: str = field(
        default="packed", metadata={"help": "packed | original: position ids of the kept tokens (saved in config)"}
    )
    visionzip_budget: str = field(default="per_crop", metadata={"help": "AnyRes: per_crop | total"})

    def visionzip(self, select_layer: int) -> VisionZipConfig | None:
        """The VisionZip stage the projector trains on, or None (both counts unset)."""
        if self.visionzip_dominant is None and self.visionzip_contextual is None:
            return None
        if self.visionzip_dominant is None or self.visionzip_contextual is None:
            raise ValueError("set both --visionzip_dominant and --visionzip_contextual (e.g. 54 and 10 for 64 tokens)")
        layer = select_layer if self.visionzip_layer is None else self.visionzip_layer
        return VisionZipConfig(
            self.visionzip_dominant, self.visionzip_contextual, layer, merge=self.visionzip_merge,
            positions=self.visionzip_positions,
        )  # fmt: skip


@dataclass
class DataArguments:
    """Where the samples and images are, and how much of them to use."""

    data_path: str = field(default="", metadata={"help": "LLaVA JSON (list) or JSONL"})
    image_folder: str | None = None
    image_aspect_ratio: str | None = field(default=None, metadata={"help": "square | pad | anyres (None: inherit)"})
    image_grid_pinpoints: str | None = None
    lazy_preprocess: bool = field(default=True, metadata={"help": "kept for LLaVA's scripts; loading is always lazy"})
    is_multimodal: bool = field(default=True, metadata={"help": "kept for LLaVA's scripts"})
    data_fraction: float = field(default=1.0, metadata={"help": "seeded subset, e.g. 0.1 (seed: --data_seed)"})
    skip_missing_images: bool = field(default=False, metadata={"help": "drop samples with bad images, not fail"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """transformers' options plus LLaVA's."""

    model_max_length: int = field(default=2048, metadata={"help": "text tokens per sample, before image tokens"})
    lora_enable: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_bias: str = "none"
    mm_projector_lr: float | None = field(default=None, metadata={"help": "projector learning rate (default: lr)"})
    group_by_modality_length: bool = False
    freeze_mm_mlp_adapter: bool = False
    bits: int = field(default=16, metadata={"help": "16, or 8/4 for QLoRA through bitsandbytes (GPU)"})
    report_to: str | list[str] = field(default="none", metadata={"help": "wandb (offline unless WANDB_MODE says)"})
    warmup_ratio: float | None = field(default=None, metadata={"help": "LLaVA's flag; transformers 5: warmup_steps<1"})

    def __post_init__(self) -> None:
        if self.warmup_ratio is not None:  # transformers 5 reads a float warmup_steps in [0, 1) as a ratio
            if not 0.0 <= self.warmup_ratio < 1.0:
                raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = self.warmup_ratio
        super().__post_init__()


PARSER_CLASSES = (ModelArguments, DataArguments, TrainingArguments)


def _split_config_flag(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    rest, config, i = [], None, 0
    while i < len(argv):
        if argv[i] == "--config":
            if i + 1 >= len(argv):
                raise ValueError("--config needs a YAML file")
            config, i = argv[i + 1], i + 2
        elif argv[i].startswith("--config="):
            config, i = argv[i].split("=", 1)[1], i + 1
        else:
            rest.append(argv[i])
            i += 1
    return config, rest


def _known_fields() -> set[str]:
    return {f.name for cls in PARSER_CLASSES for f in dataclasses.fields(cls)}


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of flag names (without dashes) to values; unknown names are an error."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    unknown = sorted(set(data) - _known_fields())
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {unknown}")
    return data


def parse_args(argv: Sequence[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Flags as LLaVA's ``train.py`` takes them; ``--config x.yaml`` sets defaults that the other flags override."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config, rest = _split_config_flag(argv)
    parser = transformers.HfArgumentParser(PARSER_CLASSES)
    if config is not None:
        parser.set_defaults(**load_yaml_config(config))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=rest)
    if not model_args.model_name_or_path or not data_args.data_path:
        raise ValueError("--model_name_or_path and --data_path are required (as flags or in --config)")
    if model_args.attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"--attn_implementation must be one of {ATTN_IMPLEMENTATIONS}")
    return model_args, data_args, training_args


def save_resolved(path: str | Path, *groups: Any) -> None:
    """Write every option as resolved (YAML and flags merged) next to the checkpoints, as YAML."""
    resolved: dict[str, Any] = {}
    for group in groups:
        values = group.to_dict() if hasattr(group, "to_dict") else dataclasses.asdict(group)
        resolved.update(values)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    safe = json.loads(json.dumps(resolved, default=str))  # enums and paths as plain strings
    Path(path).write_text(yaml.safe_dump(safe, sort_keys=True))
