"""Ask one question about one or more images (LLaVA's ``run_llava``), with visual token counts and time to first token.

Usage::

    python -m llava.eval.run_llava --model-path P --image-file a.jpg,b.jpg --query "What is shown?" \
        --visionzip-dominant 54 --visionzip-contextual 10 [--compare]

VisionZip runs with the flags' budget, else with the budget the checkpoint saves (a VisionZip‡ checkpoint's, which
its projector was trained on), else not at all; ``--no-visionzip`` turns it off. The summary names the setting.

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
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from llava.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_INDEX,
)
from llava.conversation import Conversation, SeparatorStyle, get_conv_template
from llava.mm_utils import (
    KeywordsStoppingCriteria,
    get_anyres_image_grid_shape,
    load_image,
    process_images,
    tokenizer_image_token,
)
from llava.model.anyres import spatial_layout
from llava.model.builder import VisionZipChoice, load_pretrained_model, use_visionzip
from llava.model.config import BUDGET_MODES, LlavaConfig, LlavaMistralConfig
from visionzip import VisionZipConfig
from visionzip.config import POSITIONS_MODES, requested_stage

logger = logging.getLogger(__name__)

# The template each backbone was instruction-tuned with, chosen by config class (never by folder name).
DEFAULT_CONV_MODES: dict[type, str] = {LlavaMistralConfig: "mistral_instruct", LlavaConfig: "vicuna_v1"}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")

BASELINE_LABEL = "without VisionZip"  # --compare's first answer

PixelValues = torch.Tensor | list[torch.Tensor]
ImageSizes = list[tuple[int, int]]


# --- command line ----------------------------------------------------------------------------------------------------
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


def check_visionzip_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The two VisionZip counts come together or not at all, and never with ``--no-visionzip``."""
    if (args.visionzip_dominant is None) != (args.visionzip_contextual is None):
        parser.error("--visionzip-dominant and --visionzip-contextual must be given together")
    given = (args.visionzip_dominant, args.visionzip_budget, getattr(args, "visionzip_positions", None))
    if args.no_visionzip and any(value is not None for value in given):
        parser.error(
            "--no-visionzip turns VisionZip off: expected no --visionzip-dominant/contextual/budget/positions with it"
        )
    if args.no_visionzip and getattr(args, "compare", False):
        parser.error("--compare answers without and with VisionZip: expected no --no-visionzip with it")


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


# --- model, template and images --------------------------------------------------------------------------------------
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


def choose_visionzip(parser: argparse.ArgumentParser, args: argparse.Namespace, model: Any) -> VisionZipChoice:
    """Set the run's VisionZip stage from the flags and the checkpoint (see ``use_visionzip``); bad flags exit."""
    compare = getattr(args, "compare", False)
    asked = "as asked" if args.visionzip_dominant is not None or not compare else "--compare's default"
    try:
        requested = requested_visionzip(args, model, default=compare)
        return use_visionzip(model, requested, args.visionzip_budget, off=args.no_visionzip, reason=asked)
    except ValueError as err:
        parser.error(str(err))


def default_conv_mode(config: Any) -> str:
    """The chat template of the backbone the config describes (LLaVA-1.5/1.6 Vicuna or 1.6 Mistral)."""
    for config_class, mode in DEFAULT_CONV_MODES.items():
        if isinstance(config, config_class):
            return mode
    raise ValueError(f"no default chat template for {type(config).__name__}: pass --conv-mode")


def stop_string(conv: Conversation) -> str:
    """The text that ends an answer in this template (LLaVA's ``stop_str``)."""
    return conv.sep2 if conv.sep_style in (SeparatorStyle.TWO, SeparatorStyle.LLAMA_2) else conv.sep


def split_image_files(spec: str, sep: str = ",") -> list[str]:
    """``"a.jpg,b.jpg"`` -> ``["a.jpg", "b.jpg"]`` (empty entries are an error)."""
    files = [part.strip() for part in spec.split(sep)]
    if not all(files):
        raise ValueError(f"empty image entry in {spec!r} (separator {sep!r})")
    return files


def image_token_text(config: Any) -> str:
    """What stands for one image in a prompt: ``<image>``, wrapped in ``<im_start>``/``<im_end>`` if trained so."""
    if getattr(config, "mm_use_im_start_end", False):
        return DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
    return DEFAULT_IMAGE_TOKEN


def build_query(query: str, num_images: int, config: Any) -> str:
    """The first user message: ``<image-placeholder>`` replaced, or one ``<image>\\n`` per image put in front."""
    token = image_token_text(config)
    if IMAGE_PLACEHOLDER in query:
        query = query.replace(IMAGE_PLACEHOLDER, token)
    elif DEFAULT_IMAGE_TOKEN not in query:
        query = (token + "\n") * num_images + query
    found = query.count(DEFAULT_IMAGE_TOKEN)
    if found != num_images:
        raise ValueError(f"the query holds {found} image tokens but {num_images} images were given")
    return query


def build_prompt(conv: Conversation, query: str) -> str:
    """One user turn and the open assistant turn, rendered by the template."""
    conv.append_message(conv.roles[0], query)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def prepare_images(images: Sequence[Image.Image], image_processor: Any, model: Any) -> tuple[PixelValues, ImageSizes]:
    """PIL images -> pixel values on the model's device and dtype, and their (width, height) sizes."""
    pixels = process_images(list(images), image_processor, model.config)
    if isinstance(pixels, list):
        pixels = [p.to(model.device, dtype=model.dtype) for p in pixels]
    else:
        pixels = pixels.to(model.device, dtype=model.dtype)
    return pixels, [image.size for image in images]


# --- measurements ----------------------------------------------------------------------------------------------------
def _views_per_image(pixels: PixelValues) -> list[int]:
    """Views (1, or 1 + AnyRes crops) of each image in ``process_images``'s output."""
    if isinstance(pixels, torch.Tensor):
        return [1] * pixels.shape[0] if pixels.dim() == 4 else [pixels.shape[1]] * pixels.shape[0]
    return [1 if p.dim() == 3 else p.shape[0] for p in pixels]


def uncompressed_token_count(model: Any, pixels: PixelValues, image_sizes: ImageSizes) -> int:
    """Visual tokens the model gives these images without VisionZip, summed; the encoder does not run.

    Per view ``(image_size // patch_size) ** 2`` patches (+1 for ``cls_patch``); multi-crop images go through
    LLaVA-NeXT's layout (``spatial_layout`` on one-channel zeros, for its unpadding and ``image_newline``).
    """
    tower = model.get_vision_tower()
    side = tower.num_patches_per_side
    per_view = side * side + (1 if tower.select_feature == "cls_patch" else 0)
    merge = model.config.mm_patch_merge_type or "flat"
    unpad = "unpad" in merge
    has_newline = getattr(model.get_model(), "image_newline", None) is not None
    total = 0
    for views, size in zip(_views_per_image(pixels), image_sizes, strict=True):
        if views == 1:
            total += per_view + int(unpad and has_newline)
        elif merge == "flat":
            total += views * per_view
        else:
            grid = get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, tower.config.image_size)
            newline = torch.zeros(1) if has_newline else None
            total += spatial_layout(torch.zeros(views, side * side, 1), grid, side, size, newline, unpad).shape[0]
    return total


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_prefill(
    model: Any, input_ids: torch.Tensor, pixels: PixelValues, image_sizes: ImageSizes
) -> tuple[float, int]:
    """(milliseconds, sequence length) of one forward over the prompt (1, L) with its images, to the first token."""
    _synchronize(model.device)
    start = time.perf_counter()
    out = model(input_ids=input_ids, images=pixels, image_sizes=image_sizes, use_cache=True, logits_to_keep=1)
    out.logits[:, -1].argmax(-1)
    _synchronize(model.device)
    return (time.perf_counter() - start) * 1000.0, out.past_key_values.get_seq_length()


# --- one answer ------------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """One answer: its text, the visual tokens the language model saw, and the time to first token."""

    answer: str
    visual_tokens: int
    ttft_ms: float


def generation_kwargs(temperature: float, top_p: float | None, num_beams: int, max_new_tokens: int) -> dict:
    """``generate`` options as LLaVA's run_llava sets them; greedy (no sampling) when temperature is 0."""
    kwargs: dict[str, Any] = {"num_beams": num_beams, "max_new_tokens": max_new_tokens, "use_cache": True}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature)
        if top_p is not None:
            kwargs["top_p"] = top_p
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def run_once(
    model: Any, tokenizer: Any, input_ids: torch.Tensor, pixels: PixelValues, image_sizes: ImageSizes,
    gen_kwargs: dict, stop_str: str | None = None,
) -> RunResult:  # fmt: skip
    """Generate the answer, then time the prefill and count the visual tokens it saw."""
    criteria = None
    if stop_str and stop_str != tokenizer.eos_token:
        # generate on embeddings hands the criteria only the new tokens: they start at column 0
        criteria = [KeywordsStoppingCriteria([stop_str], tokenizer)]
    output = model.generate(input_ids, images=pixels, image_sizes=image_sizes, stopping_criteria=criteria, **gen_kwargs)
    answer = tokenizer.batch_decode(output, skip_special_tokens=True)[0].strip()
    if stop_str:
        answer = answer.removesuffix(stop_str).strip()
    ttft_ms, length = measure_prefill(model, input_ids, pixels, image_sizes)
    placeholders = int((input_ids == IMAGE_TOKEN_INDEX).sum())
    return RunResult(answer, length - (input_ids.shape[1] - placeholders), ttft_ms)


def summary_line(before: int, after: int, ttft_ms: float, label: str) -> str:
    """``[label] visual tokens: before -> after | time to first token: x ms``."""
    return f"[{label}] visual tokens: {before} -> {after} | time to first token: {ttft_ms:.1f} ms"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Answer the query; print the answer(s) and the summary; return the numbers.

    VisionZip: the flags' budget, else the one the checkpoint saves (a VisionZip‡ checkpoint runs on the budget its
    projector was trained on), off with ``--no-visionzip``; the summary line names it and where it came from.

    Returns:
        ``answer``, ``tokens_before``, ``tokens_after``, ``ttft_ms`` (with VisionZip when it is on), ``visionzip``
        (the setting used, described); with
        ``--compare`` also ``answer_baseline``, ``tokens_baseline`` and ``ttft_ms_baseline`` (without it).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    check_visionzip_args(parser, args)
    tokenizer, model, image_processor, _ = load_model(args)
    choice = choose_visionzip(parser, args, model)
    images = [load_image(f) for f in split_image_files(args.image_file, args.sep)]
    pixels, sizes = prepare_images(images, image_processor, model)
    conv = get_conv_template(args.conv_mode or default_conv_mode(model.config))
    prompt = build_prompt(conv, build_query(args.query, len(images), model.config))
    input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    input_ids = input_ids.to(model.device)
    gen = generation_kwargs(args.temperature, args.top_p, args.num_beams, args.max_new_tokens)
    before = uncompressed_token_count(model, pixels, sizes)
    result: dict[str, Any] = {"tokens_before": before, "visionzip": choice.describe()}
    if args.compare:
        model.set_visionzip(None)
        base = run_once(model, tokenizer, input_ids, pixels, sizes, gen, stop_string(conv))
        print(f"{BASELINE_LABEL}:\n{base.answer}")
        result.update(answer_baseline=base.answer, tokens_baseline=base.visual_tokens, ttft_ms_baseline=base.ttft_ms)
        model.set_visionzip(choice.config, choice.budget)
    run = run_once(model, tokenizer, input_ids, pixels, sizes, gen, stop_string(conv))
    label = choice.describe()
    print(f"{label}:\n{run.answer}" if args.compare else run.answer)
    if args.compare:
        print(summary_line(before, base.visual_tokens, base.ttft_ms, BASELINE_LABEL))
    print(summary_line(before, run.visual_tokens, run.ttft_ms, label))
    result.update(answer=run.answer, tokens_after=run.visual_tokens, ttft_ms=run.ttft_ms)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
