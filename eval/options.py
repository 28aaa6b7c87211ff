"""The ``--model_args`` of the ``llava_visionzip`` lmms-eval model, parsed and validated (no lmms-eval import)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

import torch

from llava.model.config import BUDGET_MODES
from visionzip import VisionZipConfig
from visionzip.config import MERGE_MODES, SELECTION_MODES

DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULT_MAX_NEW_TOKENS = 1024  # lmms-eval's LLaVA default when a task sets none


def _as_int(name: str, value: Any) -> int | None:
    """lmms-eval parses ``54`` to int but ``-2`` to float (``str.isnumeric``): take both, reject 5.5 or text."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"model_args {name} must be an integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    raise ValueError(f"model_args {name} must be an integer, got {value!r}")


def _as_bool(name: str, value: Any) -> bool:
    """``True``/``False`` as lmms-eval parses them, or their strings."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if value in (0, 1):
        return bool(value)
    raise ValueError(f"model_args {name} must be true or false, got {value!r}")


@dataclass(frozen=True)
class ModelOptions:
    """What ``--model_args`` may set; VisionZip is off unless ``budget`` or ``dominant``+``contextual`` is given.

    Attributes:
        pretrained: checkpoint folder (or hub id) for ``load_pretrained_model``.
        model_base: base LLM for projector-only or LoRA checkpoints.
        conv_template: chat template; None picks the backbone's (vicuna_v1 for Llama, mistral_instruct).
        dominant, contextual: VisionZip counts per image (per crop for LLaVA-NeXT with ``visionzip_budget=per_crop``).
        budget: shorthand for the paper's split (64 = 54+10, 128 = 108+20, 192 = 162+30, 32 = 27+5).
        visionzip_budget: ``per_crop`` (the paper's NeXT setting) or ``total`` (a total per image over its crops).
        merge: VisionZip's contextual merge, ``paper`` or ``mean``.
        cls_token: False scores tokens by attention received (VisionZip without [CLS], as for SigLIP) on CLIP too.
        selection: ``attention`` (the method) or ``random`` (the random-patches baseline, seeded).
        layer: VisionZip's encoder layer; None: the tower's ``mm_vision_select_layer`` (the model accepts no other,
            since the projector was trained on that layer's features).
        score_layer: the encoder layer whose attention picks and merges the tokens (an ablation); None: ``layer``.
        device: torch device; None: the accelerate process's device (``cuda:<local rank>``, or ``cpu``).
        dtype: ``float16``/``bfloat16``/``float32``; None: float16 on CUDA, float32 on CPU.
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2`` (None: transformers' default).
        batch_size: requests per forward pass.
        greedy: True decodes greedily whatever the task asks (deterministic); False follows the task's sampling.
        max_new_tokens: used when a task sets no ``max_new_tokens``.
    """

    pretrained: str
    model_base: str | None = None
    conv_template: str | None = None
    dominant: int | None = None
    contextual: int | None = None
    budget: int | None = None
    visionzip_budget: str = "per_crop"
    merge: str = "paper"
    cls_token: bool = True
    selection: str = "attention"
    layer: int | None = None
    score_layer: int | None = None
    device: str | None = None
    dtype: str | None = None
    attn_implementation: str | None = None
    batch_size: int = 1
    greedy: bool = True
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    def __post_init__(self) -> None:
        """Check the combination: counts together or not at all, never with ``budget``; known modes."""
        if not self.pretrained:
            raise ValueError("model_args needs pretrained=<checkpoint folder or hub id>")
        if (self.dominant is None) != (self.contextual is None):
            raise ValueError("model_args dominant and contextual must be given together")
        if self.budget is not None and self.dominant is not None:
            raise ValueError("model_args: give either budget or dominant+contextual, not both")
        if self.visionzip_budget not in BUDGET_MODES:
            raise ValueError(f"visionzip_budget must be one of {BUDGET_MODES}, got {self.visionzip_budget!r}")
        if self.selection not in SELECTION_MODES:
            raise ValueError(f"model_args selection must be one of {SELECTION_MODES}, got {self.selection!r}")
        if self.merge not in MERGE_MODES:
            raise ValueError(f"model_args merge must be one of {MERGE_MODES}, got {self.merge!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"model_args dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"batch_size, max_new_tokens must be >= 1; got {self.batch_size}, {self.max_new_tokens}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> ModelOptions:
        """Build from lmms-eval's parsed ``--model_args`` (values may be int, float, bool or str)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown model_args {unknown} for llava_visionzip; expected some of {sorted(known)}")
        values: dict[str, Any] = {}
        for name, value in kwargs.items():
            if name in ("dominant", "contextual", "budget", "layer", "score_layer", "batch_size", "max_new_tokens"):
                value = _as_int(name, value)
                if value is None and name in ("batch_size", "max_new_tokens"):
                    continue
            elif name in ("greedy", "cls_token"):
                value = _as_bool(name, value)
            elif value is not None:
                value = str(value)
            values[name] = value
        return cls(**values)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The dtype to load in, or None for the loader's default (float16 on CUDA, float32 on CPU)."""
        return DTYPES[self.dtype] if self.dtype else None

    def visionzip(self, select_layer: int) -> VisionZipConfig | None:
        """The VisionZip stage (at ``layer``, else the tower's ``select_layer``), or None when off."""
        options = {
            "layer": select_layer if self.layer is None else self.layer, "merge": self.merge,
            "cls_token": self.cls_token, "selection": self.selection, "score_layer": self.score_layer,
        }  # fmt: skip
        if self.budget is not None:
            return VisionZipConfig.from_budget(self.budget, **options)
        if self.dominant is not None and self.contextual is not None:
            return VisionZipConfig(self.dominant, self.contextual, **options)
        return None

    def replace(self, **changes: Any) -> ModelOptions:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
