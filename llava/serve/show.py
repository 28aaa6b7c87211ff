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

The library is :mod:`llava.serve.kept` (loading, the budget, the selection); the drawing :mod:`visionzip.show`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from llava.cli_options import add_flag
from llava.mm_utils import load_image
from llava.model.config import BUDGET_MODES
from llava.serve.kept import choose_budget, load, show
from visionzip.show import KeptPicture

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
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dpi", type=int, default=120)
    parser.add_argument("--out", type=Path, default=Path("kept.png"), help="the picture (png, svg, pdf...)")
    return parser


def main(argv: Sequence[str] | None = None) -> KeptPicture:
    """Draw the picture for ``--image-file`` and write it to ``--out``; returns it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.dominant is None) != (args.contextual is None):
        parser.error("--dominant and --contextual must be given together")
    loaded = load(args.model_path, args.model_base, args.device)
    try:
        cfg = choose_budget(loaded, args.dominant, args.contextual)
        picture = show(loaded, load_image(args.image_file), cfg, args.budget)
    except ValueError as err:
        parser.error(str(err))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(str(args.out), dpi=args.dpi)
    kept = sum(int(v.dominant.sum()) + v.prefix_kept for v in picture.views)
    logger.info("%s: %d views, %d dominant tokens kept, %d contextual; wrote %s", args.image_file,
                len(picture.views), kept, picture.selection.targets.numel(), args.out)  # fmt: skip
    return picture


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
