"""See what VisionZip keeps: ``python -m llava.serve.show --model-path P --image-file F --out kept.png``.

Usage::

    python -m llava.serve.show --model-path liuhaotian/llava-v1.5-7b --image-file photo.jpg \
        [--dominant 54 --contextual 10] [--budget per_crop|total] --out kept.png

Draws the image as the vision tower sees it (padded/resized; for AnyRes one panel per view: the base view, then the
crops), the dominant patches outlined, the patches merged into each contextual token in that token's colour (a dot
on its merge target), and the [CLS] attention (or, with ``cls_token=False``, the attention received) as a heat map;
the counts are in the titles. Works on our LLaVA checkpoints and on llava-hf folders (transformers' ``Llava`` /
``LlavaNext`` classes through :mod:`visionzip.hf`). The budget: the flags, else the checkpoint's saved one, else
the paper's 64 of 576 in proportion to the tower's tokens (54+10 for CLIP-L/336).

``--method divprune|vispruner|cdpruner`` draws the patches that method keeps instead (``--tokens T`` per view, default
the checkpoint's saved selection, else the same 64-of-576 proportion; ``--vispruner-important-ratio R``; CDPruner
selects for ``--query``), and ``--methods visionzip divprune vispruner cdpruner`` draws several, one row each, on the
same views (VisionZip's row: its dominant patches)::

    python -m llava.serve.show --model-path P --image-file photo.jpg --methods visionzip divprune vispruner cdpruner \
        --query "What is on the table?" --out kept.png

The library is :mod:`llava.serve.kept` (loading, the budget, the selection); the drawing :mod:`visionzip.show` and
:mod:`visionzip.show_kept`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llava.cli_options import SHARED_OPTIONS, add_flag
from llava.mm_utils import load_image
from llava.model.config import BUDGET_MODES
from llava.serve.kept import Loaded, choose_budget, default_budget, load, show, show_methods
from visionzip.methods import ENCODER_METHODS, SELECTION_METHODS, MethodConfig, build_method, option_types, parse_option
from visionzip.show import KeptPicture
from visionzip.show_kept import KeptPatchesPicture

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The command's flags."""
    parser = argparse.ArgumentParser(
        prog="python -m llava.serve.show", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_flag(parser, "--model-path", required=True)
    add_flag(parser, "--model-base", default=None)
    add_flag(parser, "--image-file", required=True)
    parser.add_argument("--dominant", type=int, default=None, help="dominant tokens per view ([CLS] included)")
    parser.add_argument("--contextual", type=int, default=None, help="contextual (merged) tokens per view")
    parser.add_argument("--budget", choices=BUDGET_MODES, default=None, help="AnyRes: per crop or over all views")
    parser.add_argument(
        "--method", choices=ENCODER_METHODS, default=None,
        help="whose kept patches to draw (default: visionzip's picture with its merged groups and attention)",
    )  # fmt: skip
    parser.add_argument(
        "--methods", nargs="+", choices=ENCODER_METHODS, default=None,
        help="several methods' kept patches side by side, one row each (visionzip: its dominant patches)",
    )  # fmt: skip
    parser.add_argument("--tokens", type=int, default=None, help="patches kept per view by divprune/vispruner/cdpruner")
    parser.add_argument("--query", default=None, help="the instruction CDPruner selects for")
    for name in SELECTION_METHODS:
        for option in option_types(name):
            if option not in SHARED_OPTIONS:
                add_flag(parser, f"--{name}-{option.replace('_', '-')}", default=None, metavar="VALUE", help=option)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dpi", type=int, default=120)
    parser.add_argument("--out", type=Path, default=Path("kept.png"), help="the picture (png, svg, pdf...)")
    return parser


def method_configs(args: Any, loaded: Loaded, names: Sequence[str]) -> list[MethodConfig]:
    """The config of each method to draw: VisionZip's budget as :func:`choose_budget` gives it; a selection at
    ``--tokens`` (else the checkpoint's saved selection's, else the paper's proportion) with its option flags."""
    model = loaded.model
    saved = model.config.selection_config()
    patches = model.get_vision_tower().num_patches_per_side ** 2
    tokens = args.tokens or (saved.tokens if saved is not None else default_budget(patches).tokens)
    cfgs: list[MethodConfig] = []
    for name in names:
        if name == "visionzip":
            cfgs.append(choose_budget(loaded, args.dominant, args.contextual))
            continue
        options = {option: parse_option(name, option, getattr(args, f"{name}_{option}"))
                   for option in option_types(name)
                   if option not in SHARED_OPTIONS and getattr(args, f"{name}_{option}") is not None}  # fmt: skip
        cfgs.append(build_method(name, tokens, **options))
    return cfgs


def _draw(args: Any, loaded: Loaded) -> KeptPicture | KeptPatchesPicture:
    """VisionZip's own picture, or the kept patches of ``--method``/``--methods``."""
    names = args.methods or ([args.method] if args.method not in (None, "visionzip") else None)
    image = load_image(args.image_file)
    if names is None:
        return show(loaded, image, choose_budget(loaded, args.dominant, args.contextual), args.budget)
    if loaded.kind != "llava":
        raise ValueError(f"--method/--methods {' '.join(names)} draws on our LLaVA checkpoints; a llava-hf folder "
                         "draws VisionZip's picture only")  # fmt: skip
    if args.budget not in (None, "per_crop"):
        raise ValueError(f"the selections keep --tokens per view: expected no --budget {args.budget}")
    return show_methods(loaded.model, loaded.processor, image, method_configs(args, loaded, names), args.query)


def main(argv: Sequence[str] | None = None) -> KeptPicture | KeptPatchesPicture:
    """Draw the picture for ``--image-file`` and write it to ``--out``; returns it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.dominant is None) != (args.contextual is None):
        parser.error("--dominant and --contextual must be given together")
    if args.method is not None and args.methods is not None:
        parser.error("--method draws one method, --methods several: give one of them")
    loaded = load(args.model_path, args.model_base, args.device)
    try:
        picture = _draw(args, loaded)
    except ValueError as err:
        parser.error(str(err))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(str(args.out), dpi=args.dpi)
    if isinstance(picture, KeptPatchesPicture):
        counts = ", ".join(f"{row.label}: {int(row.mask.sum())}" for row in picture.rows)
        logger.info("%s: patches kept over all views (%s); wrote %s", args.image_file, counts, args.out)
        return picture
    kept = sum(int(v.dominant.sum()) + v.prefix_kept for v in picture.views)
    logger.info("%s: %d views, %d dominant tokens kept, %d contextual; wrote %s", args.image_file,
                len(picture.views), kept, picture.selection.targets.numel(), args.out)  # fmt: skip
    return picture


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
