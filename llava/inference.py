"""Inference helpers shared by every entry point: chat template choice, prompts, images, token counts, timing.

One path, many callers: ``python -m llava.eval.run_llava``, the chat CLI and web demo (``llava.serve``), the
lmms-eval runner (``eval.runner``) and the miniature all build prompts, prepare images and time the prefill here.
The time to first token (TTFT, :func:`measure_prefill`) is the wall time of one forward pass over the prompt with its
images (CUDA synchronised before and after): vision encoder, VisionZip, projector, the language model's prefill and
the first token's logits. Visual tokens "before" (:func:`uncompressed_token_count`) are what the model gives without
VisionZip, read from the image layout (the encoder does not run for it).
"""

from __future__ import annotations

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
from llava.conversation import Conversation, SeparatorStyle
from llava.mm_utils import KeywordsStoppingCriteria, process_images
from llava.model.anyres import image_grid, spatial_layout
from llava.model.config import LlavaConfig, LlavaMistralConfig

# The template each backbone was instruction-tuned with, chosen by config class (never by folder name).
DEFAULT_CONV_MODES: dict[type, str] = {LlavaMistralConfig: "mistral_instruct", LlavaConfig: "vicuna_v1"}

PixelValues = torch.Tensor | list[torch.Tensor]
ImageSizes = list[tuple[int, int]]


# --- template and prompt ---------------------------------------------------------------------------------------------
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
            grid = image_grid(size, model.config.image_grid_pinpoints, tower.config.image_size)
            newline = torch.zeros(1) if has_newline else None
            total += spatial_layout(torch.zeros(views, side * side, 1), grid, side, size, newline, unpad).shape[0]
    return total


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_prefill(
    model: Any, input_ids: torch.Tensor, pixels: PixelValues, image_sizes: ImageSizes,
    instructions: list[str] | None = None,
) -> tuple[float, int]:  # fmt: skip
    """(milliseconds, sequence length) of one forward over the prompt (1, L) with its images, to the first token.
    ``instructions``: the row's question, for a selection that reads it (CDPruner)."""
    _synchronize(model.device)
    start = time.perf_counter()
    out = model(
        input_ids=input_ids, images=pixels, image_sizes=image_sizes, use_cache=True, logits_to_keep=1,
        instructions=instructions,
    )  # fmt: skip
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
    gen_kwargs: dict, stop_str: str | None = None, instructions: list[str] | None = None,
) -> RunResult:  # fmt: skip
    """Generate the answer, then time the prefill and count the visual tokens it saw. ``instructions``: the row's
    question, for a selection that reads it (CDPruner)."""
    criteria = None
    if stop_str and stop_str != tokenizer.eos_token:
        # generate on embeddings hands the criteria only the new tokens: they start at column 0
        criteria = [KeywordsStoppingCriteria([stop_str], tokenizer)]
    output = model.generate(
        input_ids, images=pixels, image_sizes=image_sizes, stopping_criteria=criteria, instructions=instructions,
        **gen_kwargs,
    )  # fmt: skip
    answer = tokenizer.batch_decode(output, skip_special_tokens=True)[0].strip()
    if stop_str:
        answer = answer.removesuffix(stop_str).strip()
    ttft_ms, length = measure_prefill(model, input_ids, pixels, image_sizes, instructions)
    placeholders = int((input_ids == IMAGE_TOKEN_INDEX).sum())
    return RunResult(answer, length - (input_ids.shape[1] - placeholders), ttft_ms)


def summary_line(
    before: int, after: int, ttft_ms: float, label: str, layer_average: tuple[float, float] | None = None
) -> str:
    """``[label] visual tokens: before -> after | time to first token: x ms`` (and an in-LLM method's achieved
    layer-average of visual tokens, over the layers' inputs / outputs)."""
    line = f"[{label}] visual tokens: {before} -> {after} | time to first token: {ttft_ms:.1f} ms"
    if layer_average is not None:
        line += f" | in the LLM, average over layers: {layer_average[0]:.1f} in / {layer_average[1]:.1f} out"
    return line


def layer_average_of(model: Any) -> tuple[float, float] | None:
    """The last prefill's achieved layer-average of visual tokens (first row; both conventions), if a method pruned
    inside the language model; None otherwise."""
    if not getattr(model.config, "token_pruning", None):
        return None
    report = model.get_model().pruning_report()
    return report[0] if report else None
