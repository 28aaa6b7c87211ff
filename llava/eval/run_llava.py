"""Ask one question about one or more images (LLaVA's ``run_llava``), with visual token counts and time to first token.

Usage::

    python -m llava.eval.run_llava --model-path P --image-file a.jpg,b.jpg --query "What is shown?" \
        --visionzip-dominant 54 --visionzip-contextual 10 [--compare]

VisionZip runs with the flags' budget, else with the budget the checkpoint saves (a VisionZip‡ checkpoint's, which
its projector was trained on), else not at all; ``--no-visionzip`` turns it off. ``--method divprune|vispruner|
cdpruner`` [``--budget T``] [``--vispruner-important-ratio R``] keeps T patches per image (per view on AnyRes) chosen
by that method instead (CDPruner by their relevance to ``--query``); ``--method fastv|pdrop|sparsevlm``
[``--budget T``] [``--fastv-layer K`` ...] prunes inside the language model (VisionZip off); the summary then gives
the achieved average of visual tokens over the decoder layers. The summary names the setting.

The answer comes from ``model.generate`` (greedy when ``--temperature 0``). The time to first token (TTFT) is the
wall time of one forward pass over the prompt with its images, timed after generation so that the kernels are warm
(CUDA synchronised before and after): vision encoder, VisionZip, projector, the language model's prefill and the
first token's logits, i.e. what a user waits before the first word. Visual tokens "before" are what the model
gives without VisionZip (read from the image layout, the encoder does not run for it); "after" are the tokens that
reached the language model in that forward pass. ``--compare`` answers without and then with VisionZip.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

from llava.cli_options import add_flag, add_model_args, check_visionzip_args, choose_method, load_model
from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import get_conv_template
from llava.inference import (
    build_prompt,
    build_query,
    default_conv_mode,
    generation_kwargs,
    layer_average_of,
    prepare_images,
    run_once,
    split_image_files,
    stop_string,
    summary_line,
    uncompressed_token_count,
)
from llava.mm_utils import load_image, tokenizer_image_token

BASELINE_LABEL = "without VisionZip"  # --compare's first answer


def build_parser() -> argparse.ArgumentParser:
    """LLaVA's ``run_llava`` flags (dashes or underscores), plus VisionZip and ``--compare``."""
    parser = argparse.ArgumentParser(
        prog="python -m llava.eval.run_llava", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser)
    add_flag(parser, "--image-file", required=True, help="image path(s) or URL(s), separated by --sep")
    parser.add_argument("--query", required=True)
    parser.add_argument("--sep", default=",", help="separator between several --image-file entries")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding")
    add_flag(parser, "--top-p", type=float, default=None)
    add_flag(parser, "--num-beams", type=int, default=1)
    add_flag(parser, "--max-new-tokens", type=int, default=512)
    parser.add_argument(
        "--compare",
        action="store_true",
        help="answer without and with VisionZip (its budget: the flags', else the checkpoint's, else 54+10)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Answer the query; print the answer(s) and the summary; return the numbers.

    VisionZip: the flags' budget, else the one the checkpoint saves (a VisionZip‡ checkpoint runs on the budget its
    projector was trained on), off with ``--no-visionzip``; the summary line names it and where it came from.

    Returns:
        ``answer``, ``tokens_before``, ``tokens_after``, ``ttft_ms`` (with VisionZip when it is on), ``visionzip``
        (the setting used, described), ``layer_average`` (an in-LLM method's achieved average of visual tokens over
        the decoder layers, (inputs, outputs) conventions; None without one); with
        ``--compare`` also ``answer_baseline``, ``tokens_baseline`` and ``ttft_ms_baseline`` (without it).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    check_visionzip_args(parser, args)
    tokenizer, model, image_processor, _ = load_model(args)
    choice = choose_method(parser, args, model)
    images = [load_image(f) for f in split_image_files(args.image_file, args.sep)]
    pixels, sizes = prepare_images(images, image_processor, model)
    conv = get_conv_template(args.conv_mode or default_conv_mode(model.config))
    prompt = build_prompt(conv, build_query(args.query, len(images), model.config))
    input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    input_ids = input_ids.to(model.device)
    gen = generation_kwargs(args.temperature, args.top_p, args.num_beams, args.max_new_tokens)
    before = uncompressed_token_count(model, pixels, sizes)
    result: dict[str, Any] = {"tokens_before": before, "visionzip": choice.describe()}
    baseline_label = BASELINE_LABEL if choice.other is None else f"without {choice.other.name}"
    instructions = [args.query]  # the row's question: what CDPruner's selection reads
    if args.compare:
        model.set_visionzip(None)
        model.set_pruning(None)
        model.set_selection(None)
        base = run_once(model, tokenizer, input_ids, pixels, sizes, gen, stop_string(conv))
        print(f"{baseline_label}:\n{base.answer}")
        result.update(answer_baseline=base.answer, tokens_baseline=base.visual_tokens, ttft_ms_baseline=base.ttft_ms)
        model.set_visionzip(choice.visionzip.config, choice.visionzip.budget)
        model.set_pruning(choice.pruning)
        model.set_selection(choice.selection)
    run = run_once(model, tokenizer, input_ids, pixels, sizes, gen, stop_string(conv), instructions)
    label = choice.describe()
    print(f"{label}:\n{run.answer}" if args.compare else run.answer)
    if args.compare:
        print(summary_line(before, base.visual_tokens, base.ttft_ms, baseline_label))
    average = layer_average_of(model)
    print(summary_line(before, run.visual_tokens, run.ttft_ms, label, average))
    result.update(answer=run.answer, tokens_after=run.visual_tokens, ttft_ms=run.ttft_ms, layer_average=average)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
