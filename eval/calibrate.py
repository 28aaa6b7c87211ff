"""Calibrate SparseVLM's scale to a target layer-average of visual tokens, on sample questions and one's own model.

SparseVLM keeps int(rank x scale + bias) image tokens at each cut, and the rank depends on the question, so a budget
(a layer-average of visual tokens) is met only on data; its reference has presets for LLaVA-1.5 alone. This runs the
model's prefill on sample questions (LLaVA-format items, as ``eval.local_task`` reads them), bisects the scale with
:func:`visionzip.baselines.sparsevlm.calibrate_scale` and prints the scale and the average it reached. Table 2's
SparseVLM rows read it from ``SPARSEVLM_NEXT_SCALE_640`` / ``_320``.

Usage::

    python -m eval.calibrate --pretrained liuhaotian/llava-v1.6-vicuna-7b --items playground/data/sample.json \
        --target 640 --limit 64 --batch-size 8
    SPARSEVLM_NEXT_SCALE_640=<the printed scale> bash scripts/eval/table2.sh
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

from eval.local_task import Question, doc_to_text, doc_to_visual, read_llava_items
from eval.options import ModelOptions
from eval.runner import LlavaRunner, pruning_tally
from llava.model.placement import parse_device
from visionzip.baselines import SparseVLMConfig
from visionzip.baselines.sparsevlm import calibrate_scale

logger = logging.getLogger(__name__)

CONVENTIONS = ("inputs", "outputs")  # count what each decoder layer takes in, or what it puts out


def measure(
    runner: LlavaRunner, questions: Sequence[Question], cfg: SparseVLMConfig, convention: str = "inputs",
    batch_size: int = 8,
) -> float:  # fmt: skip
    """The mean layer-average of visual tokens ``cfg`` keeps over the questions' prefills (one new token each)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    runner.model.set_pruning(cfg)
    runner.tally = pruning_tally(runner.model)
    for start in range(0, len(questions), batch_size):
        docs = [q.to_doc() for q in questions[start : start + batch_size]]
        runner.generate([doc_to_text(d) for d in docs], [doc_to_visual(d) for d in docs], {"max_new_tokens": 1})
    value = runner.tally.summary()[f"layer_average_{convention}"]
    if value is None:
        raise ValueError("none of the sample questions has an image: expected LLaVA items with images")
    return float(value)


def calibrate(
    runner: LlavaRunner, questions: Sequence[Question], target: float, cfg: SparseVLMConfig,
    convention: str = "inputs", batch_size: int = 8, steps: int = 12,
) -> tuple[SparseVLMConfig, float]:  # fmt: skip
    """``cfg`` with the scale whose measured average comes closest to ``target``, and that average."""
    return calibrate_scale(lambda c: measure(runner, questions, c, convention, batch_size), target, cfg, steps=steps)


def build_parser() -> argparse.ArgumentParser:
    """The command's flags."""
    parser = argparse.ArgumentParser(prog="python -m eval.calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", required=True, help="checkpoint folder or hub id")
    parser.add_argument("--items", type=Path, required=True, help="LLaVA-format JSON/JSONL of questions with images")
    parser.add_argument("--image-folder", type=Path, default=None, help="image paths' root (default: the items')")
    parser.add_argument("--target", type=float, required=True, help="layer-average of visual tokens, e.g. 640")
    parser.add_argument("--convention", choices=CONVENTIONS, default="inputs")
    parser.add_argument("--bias", type=float, default=None, help="SparseVLM's bias, kept fixed (default 0)")
    parser.add_argument("--limit", type=int, default=64, help="sample questions used")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12, help="bisection steps (each runs every sample once)")
    parser.add_argument("--device", default=None, help="e.g. cuda:0 (default: cuda if available, else cpu)")
    parser.add_argument(
        "--model-arg", action="append", default=[], help="KEY=VALUE model arg: dtype=bfloat16, sparsevlm_layers=2/6/15"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> float:
    """Calibrate, print ``sparsevlm_scale=<scale>`` and the average it reached; return the scale."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    extra = dict(pair.split("=", 1) for pair in args.model_arg)
    options = ModelOptions.from_kwargs(pretrained=args.pretrained, method="sparsevlm", **extra)
    runner = LlavaRunner.load(options, str(parse_device(args.device)))
    questions = read_llava_items(args.items, args.image_folder)[: args.limit]
    start = options.requested_pruning()  # the layers and other options given as sparsevlm_<option> model args
    start = start if args.bias is None else dataclasses.replace(start, bias=args.bias)
    cfg, reached = calibrate(runner, questions, args.target, start, args.convention, args.batch_size, args.steps)
    print(f"sparsevlm_scale={cfg.scale:.4g} (bias {cfg.bias:g}): layer-average {reached:.1f} over layer "
          f"{args.convention}, target {args.target:g}, {len(questions)} questions")  # fmt: skip
    return cfg.scale


if __name__ == "__main__":
    main()
