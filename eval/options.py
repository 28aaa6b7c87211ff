"""The ``--model_args`` of the ``llava_visionzip`` lmms-eval model, parsed and validated (no lmms-eval import)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from eval.plugin import IN_LLM_MODELS
from llava.model.config import BUDGET_MODES
from llava.model.placement import ATTN_IMPLEMENTATIONS, DTYPE_NAMES, parse_dtype
from visionzip import VisionZipConfig
from visionzip.baselines import PruneConfig
from visionzip.baselines.select import SelectionConfig
from visionzip.config import MERGE_MODES, POSITIONS_MODES, SELECTION_MODES, requested_stage
from visionzip.methods import (
    COUNT_OPTIONS,
    DEFAULT_BUDGET,
    LLM_METHODS,
    METHODS,
    MULTITURN_MODES,
    SELECTION_METHODS,
    build_method,
    option_types,
    parse_option,
)

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


OTHER_METHODS = LLM_METHODS + SELECTION_METHODS  # the methods with their own options, VisionZip off


def option_names(method: str) -> list[str]:
    """The options of method ``method`` (its config's fields)."""
    return list(option_types(method))


def _is_method_arg(name: str) -> bool:
    """Whether ``name`` reads ``<method>_<option>`` for an in-LLM or selection method (``fastv_layer``,
    ``vispruner_important_ratio``)."""
    prefix, sep, option = name.partition("_")
    return bool(sep and option) and prefix in OTHER_METHODS


def _method_arg(name: str, value: Any) -> Any:
    """``fastv_layer=3`` -> 3, typed by the method config's field (lmms-eval hands ints, floats, bools or text)."""
    method, option = name.split("_", 1)
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # lmms-eval reads "-2" as -2.0; the field's type decides
    try:
        return parse_option(method, option, str(value))
    except ValueError as err:
        raise ValueError(f"model_args {name}={value!r}: {err}") from err


@dataclass(frozen=True)
class ModelOptions:
    """What ``--model_args`` may set. VisionZip: ``budget`` or ``dominant``+``contextual`` if given, else the budget the
    checkpoint saves (a VisionZip‡ checkpoint's, which its projector was trained on), else off; ``visionzip=off``
    turns it off even on such a checkpoint.

    ``method=fastv|pdrop|sparsevlm`` prunes inside the language model instead (:mod:`visionzip.methods`): ``budget``
    is then its layer-average of visual tokens (default 64), ``<method>_<option>=value`` sets its options
    (``fastv_layer=3``, ``pdrop_layers=2/8/16``, ``sparsevlm_scale=9``), and VisionZip is off. On a checkpoint that
    saves a VisionZip budget (VisionZip‡: its projector was trained on VisionZip's tokens) such a method is refused
    unless ``visionzip=off`` says to run it on every image token. ``method=visionzip`` is VisionZip (the default
    wherever a budget is given), at 64 tokens when neither a budget nor a saved stage says otherwise. Without
    ``method`` a method the checkpoint saves (``token_pruning`` or ``token_selection`` in config.json) stays on; with
    one, only that method.

    ``method=divprune|vispruner|cdpruner`` selects patches between the encoder and the language model instead:
    ``budget`` is then the tokens kept per image (per view on AnyRes; default 64), ``vispruner_important_ratio=0.75``
    sets VisPruner's split, and VisionZip is off (refused on a VisionZip‡ checkpoint as above). CDPruner reads each
    request's question without the benchmark's answer-format suffix (:mod:`eval.instructions`).

    Attributes:
        pretrained: checkpoint folder (or hub id) for ``load_pretrained_model``.
        model_base: base LLM for projector-only or LoRA checkpoints.
        conv_template: chat template; None picks the backbone's (vicuna_v1 for Llama, mistral_instruct).
        visionzip: ``auto`` (as above) or ``off``.
        method: one of :data:`visionzip.methods.METHODS`; None: VisionZip where a budget is given, as before.
        dominant, contextual: VisionZip counts per image (per crop for LLaVA-NeXT with ``visionzip_budget=per_crop``).
        budget: VisionZip: shorthand for the paper's split (64 = 54+10, 128 = 108+20, 192 = 162+30, 32 = 27+5); an
            in-LLM method: the layer-average of visual tokens per image; a selection method: tokens per image (view).
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
        multiturn: ``cache`` (a later turn reuses the first turn's cache, so an in-LLM method and CDPruner keep the
            first turn's selection: the setting of the paper's multi-turn claim) or ``reprefill`` (each turn
            re-selects from the whole conversation). Single-turn tasks prefill once per question, so both modes answer
            them identically; two-turn tasks (:mod:`eval.multiturn`) run as a chat in this mode.
        clip_text: the full CLIP checkpoint (hub id or folder) whose text tower CDPruner reads, for transformers'
            classes (``llava_hf_visionzip``: llava-hf checkpoints hold only the vision tower); our LLaVA reads the one
            its ``mm_vision_tower`` names and takes none.
        method_args: the method's options as given, ``{"fastv_layer": 3}`` (typed by the method's config).

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
    method: str | None = None
    multiturn: str = "cache"
    clip_text: str | None = None
    method_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check the combination: the method and its options (:meth:`_check_method`); counts together or not at all,
        never with ``budget``; known modes."""
        if not self.pretrained:
            raise ValueError("model_args needs pretrained=<checkpoint folder or hub id>")
        self._check_method()
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
        known = {f.name for f in fields(cls)} - {"method_args"}
        method_args = {k: _method_arg(k, v) for k, v in kwargs.items() if k not in known and _is_method_arg(k)}
        unknown = sorted(set(kwargs) - known - set(method_args))
        if unknown:
            raise ValueError(
                f"unknown model_args {unknown} for llava_visionzip; expected some of {sorted(known)}, or a method's "
                f"options as <method>_<option> (methods {list(OTHER_METHODS)})"
            )
        kwargs = {k: v for k, v in kwargs.items() if k not in method_args}
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
        return cls(**values, method_args=method_args)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The dtype to load in, or None for the loader's default (float16 on CUDA, float32 on CPU)."""
        return parse_dtype(self.dtype)

    def visionzip_args(self) -> list[str]:
        """The VisionZip model args given (budget, counts and the options that change a budget); ``budget`` belongs to
        the other method when one is named."""
        names = ("dominant", *BUDGET_OPTIONS) if self.other_method else ("budget", "dominant", *BUDGET_OPTIONS)
        return [name for name in names if getattr(self, name) is not None]

    @property
    def llm_method(self) -> str | None:
        """The in-LLM method named by ``method`` (fastv, pdrop, sparsevlm), or None."""
        return self.method if self.method in LLM_METHODS else None

    @property
    def selection_method(self) -> str | None:
        """The selection method named by ``method`` (divprune, vispruner, cdpruner), or None."""
        return self.method if self.method in SELECTION_METHODS else None

    @property
    def other_method(self) -> str | None:
        """The method named other than VisionZip (in-LLM or selection), which runs with VisionZip off; or None."""
        return self.method if self.method in OTHER_METHODS else None

    def method_options(self) -> dict[str, Any]:
        """The method's options without their prefix: ``{"layer": 3}`` for ``fastv_layer=3``."""
        return {name.split("_", 1)[1]: value for name, value in self.method_args.items()}

    def _check_method(self) -> None:
        """``method`` known; its options given with it and only for it; an in-LLM method with none of VisionZip's
        args, and buildable (:func:`visionzip.methods.build_method`: presets, counts, ranges)."""
        if self.method not in (None, *METHODS):
            raise ValueError(f"model_args method must be one of {list(METHODS)}, got {self.method!r}")
        if self.multiturn not in MULTITURN_MODES:
            raise ValueError(f"model_args multiturn must be one of {MULTITURN_MODES}, got {self.multiturn!r}")
        stray = [name for name in self.method_args if name.split("_", 1)[0] != self.method]
        if stray:
            owner = stray[0].split("_", 1)[0]
            raise ValueError(
                f"model_args {stray} are options of method={owner}, but method={self.method}: "
                f"expected method={owner} with them (or drop them)"
            )
        if self.method == "visionzip" and self.visionzip == "off":
            raise ValueError("model_args method=visionzip with visionzip=off: expected one or the other")
        if self.other_method is None:
            return
        vz = [name for name in ("dominant", "contextual", *BUDGET_OPTIONS) if getattr(self, name) is not None]
        if vz:
            where = "prunes inside the language model" if self.llm_method else "selects patches itself"
            raise ValueError(
                f"model_args {vz} are VisionZip's, but method={self.method} {where}: "
                f"expected budget= and {self.method}_<option>= (options {sorted(option_names(self.method))})"
            )
        try:
            self.requested_method()
        except (TypeError, ValueError) as err:
            given = {"method": self.method, "budget": self.budget, **self.method_args}
            text = ",".join(f"{k}={v}" for k, v in given.items() if v is not None)
            raise ValueError(f"model_args {text}: {err}") from err

    def refuse_llm_method(self, model_name: str, selections: bool = False) -> None:
        """ValueError where an lmms-eval model that has no owned decoder loop (all but those of
        :data:`eval.plugin.IN_LLM_MODELS`) is given an in-LLM method, or a selection method unless it runs them
        (``selections``)."""
        if self.llm_method is not None and model_name not in IN_LLM_MODELS:
            raise ValueError(
                f"model_args method={self.method} prunes inside the language model, which {model_name} does not run: "
                f"expected method=visionzip or none (--model {' or '.join(IN_LLM_MODELS)} runs {self.method})"
            )
        if self.selection_method is not None and not selections:
            runs = "VisionZip and the in-LLM methods" if model_name in IN_LLM_MODELS else "VisionZip only"
            raise ValueError(
                f"model_args method={self.method}: {model_name} runs {runs}; expected method=visionzip or none "
                f"(--model llava_visionzip runs {self.method})"
            )

    def requested_method(self) -> PruneConfig | SelectionConfig | None:
        """The config of the method named other than VisionZip (``budget`` or its default of 64 and the options), or
        None for VisionZip/none."""
        if self.other_method is None:
            return None
        return build_method(self.other_method, self.budget, **self.method_options())

    def requested_pruning(self) -> PruneConfig | None:
        """The in-LLM method's config (``budget`` or its default of 64 and the options), or None for any other."""
        return self.requested_method() if self.llm_method is not None else None

    def requested_selection(self) -> SelectionConfig | None:
        """The selection method's config (``budget`` tokens per image/view, default 64, and the options), or None."""
        return self.requested_method() if self.selection_method is not None else None

    def nominal_budget(self) -> float | None:
        """The in-LLM method's nominal layer-average (``budget``, else 64), or None where options fix the count
        (``fastv_keep``, ``pdrop_ratio``, ``sparsevlm_scale``...) or no such method is named; a selection method's
        tokens per image (per view)."""
        if self.selection_method is not None:
            return float(self.requested_method().tokens)
        if self.llm_method is None:
            return None
        if self.budget is not None:
            return float(self.budget)
        fixed = [name for name in COUNT_OPTIONS[self.llm_method] if name in self.method_options()]
        if fixed == ["budget"]:
            return float(self.method_options()["budget"])
        return None if fixed else float(DEFAULT_BUDGET)

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
        if self.other_method is not None and saved is not None and self.visionzip != "off":
            raise ValueError(
                f"model_args method={self.method}: this checkpoint saves VisionZip {saved.dominant}+{saved.contextual} "
                "(its projector may be trained on VisionZip's tokens); expected visionzip=off with it, to run "
                f"{self.method} on every image token"
            )
        if self.visionzip == "off" or self.other_method is not None:
            return None
        counts = None
        budget = self.budget
        if budget is None and self.dominant is None and self.method == "visionzip" and saved is None:
            budget = DEFAULT_BUDGET  # method=visionzip alone runs, as --method does
        if budget is not None:
            split = VisionZipConfig.from_budget(budget)
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
