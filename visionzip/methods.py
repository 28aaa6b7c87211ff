"""One name per method, the same in every entry point, and the config each name builds from a budget and options.

``--method NAME`` (``run_llava``, the chat CLI), ``method=NAME`` (lmms-eval model args) and ``method:`` (grid specs)
all go through :func:`build_method`. A budget is the paper's visual-token count: the tokens per image (per view on
AnyRes) of VisionZip and of the encoder-side selections (DivPrune, VisPruner, CDPruner), and for the methods that
prune inside the language model a layer-average (their papers' and the VisionZip paper's convention). Without one
every method runs at :data:`DEFAULT_BUDGET`. Options are the fields of the method's config (``FastVConfig.layer``,
``PDropConfig.ratio``, ...), given as text and typed here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from visionzip.baselines.cdpruner import CDPrunerConfig
from visionzip.baselines.divprune import DivPruneConfig
from visionzip.baselines.fastv import FastVConfig
from visionzip.baselines.pdrop import PDropConfig
from visionzip.baselines.prune import PruneConfig
from visionzip.baselines.select import SelectionConfig
from visionzip.baselines.sparsevlm import SparseVLMConfig
from visionzip.baselines.vispruner import VisPrunerConfig
from visionzip.config import VisionZipConfig

# Between the vision encoder and the language model: VisionZip, and the methods that select patches there.
SELECTION_METHODS: tuple[str, ...] = ("divprune", "vispruner", "cdpruner")
ENCODER_METHODS: tuple[str, ...] = ("visionzip", *SELECTION_METHODS)
LLM_METHODS: tuple[str, ...] = ("fastv", "pdrop", "sparsevlm")  # inside the language model
METHODS: tuple[str, ...] = ENCODER_METHODS + LLM_METHODS
DEFAULT_BUDGET = 64  # LLaVA-1.5's smallest budget in the paper
MethodConfig = VisionZipConfig | PruneConfig | SelectionConfig
# How a later turn of a chat meets an in-LLM method, whose choice of image tokens follows the text: "cache" keeps the
# first turn's choice with the cached keys and values (what KV-cache reuse gives, the setting of the paper's
# multi-turn claim; the default, since a chat that reuses its cache behaves so); "reprefill" runs the whole
# conversation again each turn, so the method chooses again from the latest question (as LLaVA's CLI re-prefills).
# Text-independent methods (VisionZip, none) answer the same either way; "reprefill" only costs more.
MULTITURN_MODES: tuple[str, ...] = ("cache", "reprefill")
CONFIGS: dict[str, type] = {
    "visionzip": VisionZipConfig,
    "fastv": FastVConfig,
    "pdrop": PDropConfig,
    "sparsevlm": SparseVLMConfig,
    "divprune": DivPruneConfig,
    "vispruner": VisPrunerConfig,
    "cdpruner": CDPrunerConfig,
}
# Options that fix the count themselves, so a budget cannot be given beside them.
COUNT_OPTIONS: dict[str, tuple[str, ...]] = {
    "visionzip": ("dominant", "contextual"),
    "fastv": ("budget", "keep", "ratio"),
    "pdrop": ("layers", "ratio"),
    "sparsevlm": ("scale", "bias"),
    "divprune": ("tokens",),
    "vispruner": ("tokens",),
    "cdpruner": ("tokens",),
}


def option_types(name: str) -> dict[str, str]:
    """{option: its annotation as text} of method ``name`` (what the entry points offer as flags/arguments)."""
    return {field.name: str(field.type) for field in dataclasses.fields(_config_class(name))}


def parse_option(name: str, option: str, text: str) -> Any:
    """``text`` as the type of ``name``'s ``option``: ints, floats, booleans, tuples of ints ("2/8/16" or "2,8,16")."""
    types = option_types(name)
    if option not in types:
        raise ValueError(f"{name} has no option {option!r}; its options: {sorted(types)}")
    kind, text = types[option], text.strip()
    if text.lower() == "none" and "None" in kind:
        return None
    if "tuple" in kind:
        return tuple(int(part) for part in text.replace("/", ",").replace(" ", ",").split(",") if part)
    if kind.startswith("bool"):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{name} option {option} takes true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if kind.startswith("int"):
        return int(text)
    if kind.startswith("float"):
        return float(text)
    return text


def build_method(name: str, budget: float | None = None, **options: Any) -> MethodConfig:
    """The config of method ``name`` at ``budget`` (None: :data:`DEFAULT_BUDGET`, unless an option fixes the count).

    VisionZip splits a budget as the paper does (``VisionZipConfig.from_budget``); FastV solves its keep count for
    the layer-average; PDrop and SparseVLM take the presets for 192/128/64 (other budgets: give their options, or
    calibrate SparseVLM's scale); DivPrune, VisPruner and CDPruner keep ``budget`` patches per image (per view).
    ValueError names the method, the option and what was expected.
    """
    cls = _config_class(name)
    fixed = [option for option in COUNT_OPTIONS[name] if option in options]
    if fixed and budget is not None:
        raise ValueError(f"{name}: a budget and {', '.join(fixed)} both set the count; give one of them")
    if name == "fastv":
        return cls(**options) if fixed else cls(budget=DEFAULT_BUDGET if budget is None else budget, **options)
    if fixed:
        return cls(**options)
    budget = DEFAULT_BUDGET if budget is None else budget
    if name in ENCODER_METHODS and budget != int(budget):
        raise ValueError(f"{name} keeps a whole number of tokens per image; got a budget of {budget}")
    if name in SELECTION_METHODS:
        return cls(tokens=int(budget), **options)
    return cls.from_budget(int(budget) if float(budget).is_integer() else budget, **options)


def method_name(cfg: MethodConfig | None) -> str:
    """The entry-point name of a config (``"none"`` for None)."""
    if cfg is None:
        return "none"
    return "visionzip" if isinstance(cfg, VisionZipConfig) else cfg.name


def _config_class(name: str) -> type:
    if name not in CONFIGS:
        raise ValueError(f"unknown method {name!r}; expected one of {list(METHODS)}")
    return CONFIGS[name]
