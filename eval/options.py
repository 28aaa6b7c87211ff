"""The ``--model_args`` of the ``llava_visionzip`` lmms-eval model, parsed and validated (no lmms-eval import)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

import torch

from llava.model.config import BUDGET_MODES
from llava.model.placement import ATTN_IMPLEMENTATIONS, DTYPE_NAMES, parse_dtype
from visionzip import VisionZipConfig
from visionzip.config import MERGE_MODES, POSITIONS_MODES, SELECTION_MODES, requested_stage

DEFAULT_MAX_NEW_TOKENS = 1024  # lmms-eval's LLaVA default when a task sets none
VISIONZIP_SWITCH = ("auto", "off")  # auto: the budget asked for, else the checkpoint's own, else none
CHOICES = {
    "visionzip_budget": BUDGET_MODES, "selection": SELECTION_MODES, "merge": MERGE_MODES, "positions": POSITIONS_MODES,
    "attn_implementation": ATTN_IMPLEMENTATIONS,
}  # fmt: skip
BUDGET_OPTIONS = ("visionzip_budget", "merge", "cls_token", "selection", "layer", "score_layer", "positions")


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
    """What ``--model_args`` may set. VisionZip: ``budget`` or ``dominant``+``contextual`` if given, else the budget the
    checkpoint saves (a VisionZip‡ checkpoint's, which its projector was trained on), else off; ``visionzip=off``
    turns it off even on such a checkpoint.

    Attributes:
        pretrained: checkpoint folder (or hub id) for ``load_pretrained_model``.
        model_base: base LLM for projector-only or LoRA checkpoints.
        conv_template: chat template; None picks the backbone's (vicuna_v1 for Llama, mistral_instruct).
        visionzip: ``auto`` (as above) or ``off``.
        dominant, contextual: VisionZip counts per image (per crop for LLaVA-NeXT with ``visionzip_budget=per_crop``).
        budget: shorthand for the paper's split (64 = 54+10, 128 = 108+20, 192 = 162+30, 32 = 27+5).
        visionzip_budget: ``per_crop`` (the paper's NeXT setting) or ``total`` (a total per image over its crops);
            None: the checkpoint's, else ``per_crop``.
        merge: VisionZip's contextual merge, ``paper`` or ``mean`` (None: ``paper``, or the checkpoint's).
        cls_token: False scores tokens by attention received (VisionZip without [CLS], as for SigLIP) on CLIP too
            (None: True, or the checkpoint's).
        selection: ``attention`` (the method) or ``random`` (the random-patches baseline, seeded); None: ``attention``,
            or the checkpoint's.
        layer: VisionZip's encoder layer; None: the tower's ``mm_vision_select_layer`` (the model accepts no other,
            since the projector was trained on that layer's features).
        score_layer: the encoder layer whose attention picks and merges the tokens (an ablation); None: ``layer``.
        positions: the kept tokens' position ids, ``packed`` (the released code) or ``original`` (each at its place
            among all the image's tokens; the text after the image as without compression); None: ``packed``, or the
            checkpoint's.
        device: torch device; None: the accelerate process's device (``cuda:<local rank>``, or ``cpu``).
        dtype: ``float16``/``bfloat16``/``float32``; None: float16 on CUDA, float32 on CPU.
        attn_implementation: one of ``llava.model.placement.ATTN_IMPLEMENTATIONS`` (None: transformers' default).
        batch_size: requests per forward pass (a number: lmms-eval's ``auto`` search is not supported).
        greedy: True decodes greedily whatever the task asks (deterministic); False follows the task's sampling.
        max_new_tokens: used when a task sets no ``max_new_tokens``.

    The VisionZip options (merge, cls_token, selection, layer, score_layer, positions, visionzip_budget) change a
    budget: with no budget given they apply to the checkpoint's, and a checkpoint without one is an error (they would
    do nothing).
    """

    pretrained: str
    model_base: str | None = None
    conv_template: str | None = None
    visionzip: str = "auto"
    dominant: int | None = None
    contextual: int | None = None
    budget: int | None = None
    visionzip_budget: str | None = None
    merge: str | None = None
    cls_token: bool | None = None
    selection: str | None = None
    layer: int | None = None
    score_layer: int | None = None
    positions: str | None = None
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
        if self.visionzip not in VISIONZIP_SWITCH:
            raise ValueError(f"model_args visionzip must be one of {VISIONZIP_SWITCH}, got {self.visionzip!r}")
        if self.visionzip == "off" and self.visionzip_args():
            raise ValueError(f"model_args visionzip=off turns VisionZip off: expected none of {self.visionzip_args()}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in (None, *allowed):
                raise ValueError(f"model_args {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise ValueError(f"model_args dtype must be one of {sorted(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"batch_size, max_new_tokens must be >= 1; got {self.batch_size}, {self.max_new_tokens}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> ModelOptions:
        """Build from lmms-eval's parsed ``--model_args`` (values may be int, float, bool or str)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown model_args {unknown} for llava_visionzip; expected some of {sorted(known)}")
        if str(kwargs.get("batch_size", "")).startswith("auto"):
            raise ValueError(
                f"batch_size={kwargs['batch_size']} (lmms-eval's automatic batch size search) is not supported by "
                "llava_visionzip: expected a number, e.g. --batch_size 8"
            )
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
        return parse_dtype(self.dtype)

    def visionzip_args(self) -> list[str]:
        """The VisionZip model args given (budget, counts and the options that change a budget)."""
        names = ("budget", "dominant", *BUDGET_OPTIONS)
        return [name for name in names if getattr(self, name) is not None]

    def requested_visionzip(self, select_layer: int, saved: VisionZipConfig | None = None) -> VisionZipConfig | None:
        """The VisionZip stage asked for on a checkpoint that saves ``saved`` (None: it saves none); None: no request,
        the checkpoint's own stage (or none) applies, or ``visionzip=off``.

        A budget replaces the saved stage's counts and keeps its other options, or gives a new stage at ``layer``
        (else the tower's ``select_layer``); the options given then change it. Without a budget they change the
        checkpoint's stage, and with neither a budget nor a saved stage they are an error
        (:func:`visionzip.config.requested_stage`, the command line's rule too).
        """
        names = ("merge", "cls_token", "selection", "score_layer", "layer", "positions")
        options = {k: getattr(self, k) for k in names}
        options = {k: v for k, v in options.items() if v is not None}
        if self.visionzip == "off":
            return None
        counts = None
        if self.budget is not None:
            split = VisionZipConfig.from_budget(self.budget)
            counts = (split.dominant, split.contextual)
        elif self.dominant is not None and self.contextual is not None:
            counts = (self.dominant, self.contextual)
        given = [name for name in BUDGET_OPTIONS if getattr(self, name) is not None]
        if counts is None and saved is None and given:
            raise ValueError(
                f"model_args {given} change a VisionZip budget, but none is given and the checkpoint saves none: "
                "expected budget=64 (or dominant=54,contextual=10) with them"
            )
        return requested_stage(saved, select_layer, counts, options)

    def replace(self, **changes: Any) -> ModelOptions:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
