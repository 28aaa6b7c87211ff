"""Command-line options shared by the entry points (``run_llava``, the chat CLI, the kept-token picture, the web demo).

LLaVA's scripts spell flags with dashes or underscores (``--model-path``/``--model_path``): :func:`add_flag` takes
both. The VisionZip flags choose the run's stage: the flags' budget, else the one the checkpoint saves (a
VisionZip‡ checkpoint's, which its projector was trained on), else none; ``--no-visionzip`` turns it off.
``--method divprune|vispruner|cdpruner --budget T`` keeps T patches per view chosen by that method instead (VisionZip
off), ``--method fastv|pdrop|sparsevlm`` prunes inside the language model; each method's options are
``--<method>-<option> VALUE`` flags (``--vispruner-important-ratio 0.75``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch

from llava.model.builder import VisionZipChoice, load_pretrained_model, use_visionzip
from llava.model.config import BUDGET_MODES
from llava.model.placement import ATTN_IMPLEMENTATIONS
from visionzip import VisionZipConfig
from visionzip.baselines import PruneConfig
from visionzip.baselines.select import SelectionConfig
from visionzip.config import POSITIONS_MODES, requested_stage
from visionzip.methods import METHODS, SELECTION_METHODS, build_method, option_types, parse_option

SHARED_OPTIONS = ("budget", "tokens")  # the count, given once as --budget, not per method
OPTION_METHODS = tuple(name for name in METHODS if name != "visionzip")  # VisionZip has its own --visionzip-* flags


def add_flag(parser: argparse.ArgumentParser, flag: str, **kwargs: Any) -> None:
    """Add ``--a-b`` under both spellings LLaVA's scripts use (``--a-b`` and ``--a_b``), stored as ``a_b``."""
    dest = flag.removeprefix("--").replace("-", "_")
    parser.add_argument(flag, "--" + dest, dest=dest, **kwargs)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared with ``llava.serve.cli``: checkpoint, device, attention, template and VisionZip."""
    add_flag(parser, "--model-path", required=True)
    add_flag(parser, "--model-base", default=None)
    add_flag(
        parser,
        "--conv-mode",
        default=None,
        help="chat template (default: vicuna_v1 for Llama, mistral_instruct for Mistral backbones)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_flag(parser, "--attn-implementation", choices=ATTN_IMPLEMENTATIONS, default=None)
    add_flag(parser, "--load-8bit", action="store_true")
    add_flag(parser, "--load-4bit", action="store_true")
    add_flag(
        parser,
        "--visionzip-dominant",
        type=int,
        default=None,
        help="VisionZip dominant tokens per image ([CLS] included); default: the budget saved in the checkpoint "
        "(a VisionZip‡ checkpoint's), else off",
    )
    add_flag(
        parser, "--visionzip-contextual", type=int, default=None, help="VisionZip contextual (merged) tokens per image"
    )
    add_flag(
        parser,
        "--visionzip-budget",
        choices=BUDGET_MODES,
        default=None,
        help="AnyRes: the budget applies to each crop, or to the whole image (default: the checkpoint's, or per_crop)",
    )
    add_flag(
        parser,
        "--visionzip-positions",
        choices=POSITIONS_MODES,
        default=None,
        help="position ids of the kept tokens: packed (the released code) or original (each at its place among all "
        "the image's tokens); default: the checkpoint's, or packed",
    )
    add_flag(
        parser, "--no-visionzip", action="store_true", help="run without VisionZip, even on a checkpoint that saves it"
    )
    add_method_args(parser)


def add_method_args(parser: argparse.ArgumentParser) -> None:
    """``--method NAME``, ``--budget T`` and each method's options as ``--<method>-<option> VALUE`` (VisionZip's are
    its ``--visionzip-*`` flags)."""
    group = parser.add_argument_group("method (visionzip.methods)")
    add_flag(
        group, "--method", choices=METHODS, default=None,
        help="token reduction method (default: visionzip where a budget is given; divprune, vispruner and cdpruner "
        "keep --budget patches per view; fastv, pdrop and sparsevlm prune inside the language model)",
    )  # fmt: skip
    add_flag(
        group, "--budget", type=float, default=None,
        help="visual tokens: per image (per view on AnyRes) for visionzip, divprune, vispruner and cdpruner; for "
        "fastv/pdrop/sparsevlm the average over the decoder layers (default 64)",
    )  # fmt: skip
    for name in OPTION_METHODS:
        for option in option_types(name):
            if option not in SHARED_OPTIONS:
                add_flag(group, f"--{name}-{option.replace('_', '-')}", default=None, metavar="VALUE", help=option)


def method_options(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """{method: {option: text}} of the ``--<method>-<option>`` flags given."""
    given: dict[str, dict[str, str]] = {}
    for name in OPTION_METHODS:
        for option in option_types(name):
            value = getattr(args, f"{name}_{option}", None) if option not in SHARED_OPTIONS else None
            if value is not None:
                given.setdefault(name, {})[option] = value
    return given


def requested_method(args: argparse.Namespace) -> PruneConfig | SelectionConfig | None:
    """The method other than VisionZip the flags ask for (an in-LLM method or a selection; None: none), or
    ValueError naming the flag that does not fit."""
    given, name = method_options(args), getattr(args, "method", None)
    stray = sorted(set(given) - {name})
    if stray:
        raise ValueError(
            f"--{stray[0]}-* options given, but --method is {name or 'not given'}: expected --method {stray[0]}"
        )
    if name not in OPTION_METHODS:
        return None
    if args.visionzip_dominant is not None or args.visionzip_budget is not None:
        raise ValueError(
            f"--method {name} runs {name} alone: the --visionzip-* budget flags go with --method visionzip"
        )
    options = {option: parse_option(name, option, text) for option, text in given.get(name, {}).items()}
    return build_method(name, args.budget, **options)


def check_visionzip_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The two VisionZip counts come together or not at all, and never with ``--no-visionzip``; ``--budget`` (with
    ``--method visionzip`` or alone) becomes the paper's split of that count."""
    budget = getattr(args, "budget", None)
    if budget is not None and getattr(args, "method", None) in (None, "visionzip"):
        if args.visionzip_dominant is not None:
            parser.error("--budget and --visionzip-dominant/contextual both set VisionZip's count: give one of them")
        try:
            split = build_method("visionzip", budget)
        except ValueError as err:
            parser.error(str(err))
        args.method, args.visionzip_dominant, args.visionzip_contextual = "visionzip", split.dominant, split.contextual
    if (args.visionzip_dominant is None) != (args.visionzip_contextual is None):
        parser.error("--visionzip-dominant and --visionzip-contextual must be given together")
    given = (args.visionzip_dominant, args.visionzip_budget, getattr(args, "visionzip_positions", None))
    if args.no_visionzip and any(value is not None for value in given):
        parser.error(
            "--no-visionzip turns VisionZip off: expected no --visionzip-dominant/contextual/budget/positions with it"
        )
    if args.no_visionzip and getattr(args, "compare", False):
        parser.error("--compare answers without and with VisionZip: expected no --no-visionzip with it")


def load_model(args: argparse.Namespace) -> tuple[Any, Any, Any, int]:
    """``load_pretrained_model`` from the parsed flags; VisionZip is switched on separately."""
    return load_pretrained_model(
        args.model_path, args.model_base, load_8bit=args.load_8bit, load_4bit=args.load_4bit, device=args.device,
        attn_implementation=args.attn_implementation,
    )  # fmt: skip


def requested_visionzip(args: argparse.Namespace, model: Any, default: bool = False) -> VisionZipConfig | None:
    """The VisionZip stage the flags ask for, or None when they ask for none (the checkpoint's own then applies).

    Counts replace the checkpoint's saved counts and keep its other options (merge, selection...); without a saved
    stage they apply at the layer LLaVA reads (``mm_vision_select_layer``). ``default``: the paper's 54+10 when
    neither the flags nor the checkpoint give a budget (``--compare``). ``--visionzip-positions`` sets the positions
    of the stage asked for, or of the checkpoint's; with neither (and no ``default``) it is a ValueError.
    """
    saved = model.config.visionzip_config()
    positions = getattr(args, "visionzip_positions", None)
    options = {} if positions is None else {"positions": positions}
    counts = None if args.visionzip_dominant is None else (args.visionzip_dominant, args.visionzip_contextual)
    if counts is None and saved is None:
        if default:  # --compare: the paper's 54+10 at the layer LLaVA reads
            return VisionZipConfig(layer=model.get_vision_tower().select_layer, **options)
        if positions is not None:
            raise ValueError(
                "--visionzip-positions changes a VisionZip budget, but none is given and the checkpoint saves none: "
                "expected --visionzip-dominant and --visionzip-contextual with it"
            )
    return requested_stage(saved, model.get_vision_tower().select_layer, counts, options)


@dataclass(frozen=True)
class MethodChoice:
    """A run's token reduction: the VisionZip stage (off for any other method), and the in-LLM method or the
    encoder-side selection, if any (``source``: where that one came from)."""

    visionzip: VisionZipChoice
    pruning: PruneConfig | None = None
    selection: SelectionConfig | None = None
    source: str = "as asked"

    @property
    def other(self) -> PruneConfig | SelectionConfig | None:
        """The method run instead of VisionZip (None: VisionZip or nothing)."""
        return self.pruning if self.pruning is not None else self.selection

    def describe(self) -> str:
        """``VisionZip 54+10 (as asked)``, ``FastV K=2, layer-average 64 (as asked)``, ``DivPrune, 64 tokens ...``."""
        return f"{self.other.describe()} ({self.source})" if self.other is not None else self.visionzip.describe()


def _use_other(model: Any, args: argparse.Namespace, method: PruneConfig | SelectionConfig) -> MethodChoice:
    """Run ``method`` (``--method`` other than visionzip) with VisionZip off; a checkpoint's saved VisionZip budget is
    never dropped silently (as the lmms-eval args: ``--no-visionzip`` says so)."""
    saved = model.config.visionzip_config()
    if saved is not None and not args.no_visionzip:
        raise ValueError(
            f"this checkpoint saves VisionZip {saved.dominant}+{saved.contextual} (its projector may be trained on "
            f"it); --method {args.method} runs instead of it: add --no-visionzip to do so"
        )
    model.set_pruning(None)
    model.set_selection(None)
    choice = use_visionzip(model, None, None, off=True, reason=f"--method {args.method}")
    if args.method in SELECTION_METHODS:
        model.set_selection(method)
        return MethodChoice(choice, selection=method)
    model.set_pruning(method)
    return MethodChoice(choice, pruning=method)


def choose_method(parser: argparse.ArgumentParser, args: argparse.Namespace, model: Any) -> MethodChoice:
    """Set the run's method from the flags and the checkpoint: ``--method`` other than visionzip (VisionZip off), else
    a selection the checkpoint saves (when no VisionZip flag is given), else VisionZip as ``use_visionzip`` chooses
    it; bad flags exit with the reason."""
    compare = getattr(args, "compare", False)
    asked = "as asked" if args.visionzip_dominant is not None or not compare else "--compare's default"
    try:
        other = requested_method(args)
        if other is not None:
            return _use_other(model, args, other)
        model.set_pruning(None)
        saved = model.config.selection_config()
        visionzip_flags = (args.visionzip_dominant, args.visionzip_budget, getattr(args, "visionzip_positions", None))
        if saved is not None and args.method is None and not compare and all(f is None for f in visionzip_flags):
            choice = use_visionzip(model, None, None, off=True, reason=f"the checkpoint's {saved.name}")
            return MethodChoice(choice, selection=saved, source="saved in the checkpoint")
        model.set_selection(None)
        requested = requested_visionzip(args, model, default=compare)
        return MethodChoice(use_visionzip(model, requested, args.visionzip_budget, off=args.no_visionzip, reason=asked))
    except ValueError as err:
        parser.error(str(err))
