"""Image and prompt preparation shared by training, evaluation and serving: padding, AnyRes crops, image tokens."""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from transformers import StoppingCriteria

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX

Resolution = tuple[int, int]  # (width, height), the order PIL's Image.size uses
GridPinpoints = str | Sequence[Sequence[int]]  # [(w, h), ...], its string form, or "(1x1),...,(3x3)"

_MAX_PIXEL_VALUE = 255  # image_mean is given in [0, 1]; padding colours are 8-bit
_URL_PREFIXES = ("http://", "https://")
_DOWNLOAD_TIMEOUT_S = 30
_GRID_RANGE_PATTERN = re.compile(r"\((\d+)x(\d+)\)")  # LLaVA-NeXT/OneVision "(1x1),...,(3x3)"


def expand2square(pil_img: Image.Image, background_color: tuple[int, ...] | int) -> Image.Image:
    """Pad an image to a square with `background_color`, the original centred.

    Args:
        pil_img: image of size (W, H).
        background_color: fill colour in the image's mode (e.g. an RGB tuple).

    Returns:
        Image of size (max(W, H), max(W, H)); the input itself when already square.
    """
    width, height = pil_img.size
    if width == height:
        return pil_img
    side = max(width, height)
    result = Image.new(pil_img.mode, (side, side), background_color)
    result.paste(pil_img, ((side - width) // 2, (side - height) // 2))
    return result


def parse_grid_pinpoints(grid_pinpoints: GridPinpoints, patch_size: int | None = None) -> list[Resolution]:
    """Candidate AnyRes resolutions from a list, its string form, or LLaVA-NeXT's range form.

    Args:
        grid_pinpoints: [(w, h), ...], the same as a string (parsed with `ast.literal_eval`), or
            "(1x1),...,(3x3)": every grid from the first to the last entry, in multiples of `patch_size`.
        patch_size: crop side in pixels; required by the range form only.

    Returns:
        List of (width, height) in pixels.
    """
    if isinstance(grid_pinpoints, str) and _GRID_RANGE_PATTERN.search(grid_pinpoints):
        if patch_size is None:
            raise ValueError(f"grid_pinpoints {grid_pinpoints!r} is in range form and needs a patch_size")
        bounds = _GRID_RANGE_PATTERN.findall(grid_pinpoints)
        (first_w, first_h), (last_w, last_h) = map(int, bounds[0]), map(int, bounds[-1])
        return [
            (cols * patch_size, rows * patch_size)
            for cols in range(first_w, last_w + 1)
            for rows in range(first_h, last_h + 1)
        ]
    expected = f"a non-empty list of positive (width, height) pairs, got {grid_pinpoints!r}"
    try:
        parsed = ast.literal_eval(grid_pinpoints) if isinstance(grid_pinpoints, str) else grid_pinpoints
        resolutions = [tuple(int(v) for v in pair) for pair in parsed]
    except (SyntaxError, TypeError, ValueError) as err:
        raise ValueError(f"grid_pinpoints must be {expected}") from err
    if not resolutions or any(len(r) != 2 or min(r) <= 0 for r in resolutions):
        raise ValueError(f"grid_pinpoints must be {expected}")
    return [(r[0], r[1]) for r in resolutions]


def select_best_resolution(original_size: Resolution, possible_resolutions: Sequence[Sequence[int]]) -> Resolution:
    """AnyRes choice (LLaVA-NeXT): the candidate keeping most of the image's pixels, then wasting least.

    Args:
        original_size: (width, height) of the image.
        possible_resolutions: candidate (width, height) pairs.

    Returns:
        The (width, height) maximising min(pixels after fitting the image in it, original pixels); ties go
        to the smallest unused area.
    """
    if not possible_resolutions:
        raise ValueError("possible_resolutions is empty")
    original_width, original_height = original_size
    original_area = original_width * original_height
    best: Resolution = (0, 0)
    best_key = (-1, 0)  # (effective pixels, -wasted pixels); any candidate beats it
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        effective = min(int(original_width * scale) * int(original_height * scale), original_area)
        key = (effective, -(width * height - effective))
        if key > best_key:
            best, best_key = (int(width), int(height)), key
    return best


def resize_and_pad_image(image: Image.Image, target_resolution: Resolution) -> Image.Image:
    """Resize keeping the aspect ratio to fit `target_resolution`, then pad with black, centred.

    Args:
        image: image of size (W, H).
        target_resolution: (width, height) of the result.

    Returns:
        RGB image of size `target_resolution`.
    """
    original_width, original_height = image.size
    target_width, target_height = target_resolution
    scale_w, scale_h = target_width / original_width, target_height / original_height
    if scale_w < scale_h:
        new_width, new_height = target_width, min(math.ceil(original_height * scale_w), target_height)
    else:
        new_width, new_height = min(math.ceil(original_width * scale_h), target_width), target_height
    resized = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    canvas.paste(resized, ((target_width - new_width) // 2, (target_height - new_height) // 2))
    return canvas


def divide_to_patches(image: Image.Image, patch_size: int) -> list[Image.Image]:
    """Cut an image into patch_size x patch_size crops in raster order (left to right, then top to bottom).

    Args:
        image: image of size (W, H).
        patch_size: crop side in pixels.

    Returns:
        ceil(H / patch_size) * ceil(W / patch_size) crops; crops over the border are zero-filled by PIL.
    """
    width, height = image.size
    return [
        image.crop((left, top, left + patch_size, top + patch_size))
        for top in range(0, height, patch_size)
        for left in range(0, width, patch_size)
    ]


def get_anyres_image_grid_shape(
    image_size: Resolution, grid_pinpoints: GridPinpoints, patch_size: int
) -> tuple[int, int]:
    """Grid of crops AnyRes makes for an image.

    Args:
        image_size: (width, height) of the original image.
        grid_pinpoints: candidate resolutions, in any form `parse_grid_pinpoints` accepts.
        patch_size: crop side in pixels.

    Returns:
        (crops across, crops down) = (best width // patch_size, best height // patch_size).
    """
    width, height = select_best_resolution(image_size, parse_grid_pinpoints(grid_pinpoints, patch_size))
    return width // patch_size, height // patch_size


def _size_entry(size: Any, key: str) -> int | None:
    """One entry of an image processor's size/crop_size (a dict, transformers' SizeDict, or an int)."""
    if size is None:
        return None
    if isinstance(size, int):
        return size
    value = size.get(key) if hasattr(size, "get") else getattr(size, key, None)
    return int(value) if value is not None else None


def _processor_sides(processor: Any) -> tuple[int, int]:
    """(side the whole image is resized to, crop side) of a CLIP-like image processor, in pixels."""
    size, crop_size = getattr(processor, "size", None), getattr(processor, "crop_size", None)
    resize_side = _size_entry(size, "shortest_edge") or _size_entry(size, "height")
    crop_side = _size_entry(crop_size, "height") or resize_side
    if resize_side is None or crop_side is None:
        raise ValueError(f"cannot read an image side from processor size={size!r}, crop_size={crop_size!r}")
    return resize_side, crop_side


def _pixel_values(processor: Any, images: list[Image.Image]) -> torch.Tensor:
    """Run the image processor on PIL images -> (N, 3, S, S) float tensor."""
    return processor(images, return_tensors="pt")["pixel_values"]


def process_anyres_image(image: Image.Image, processor: Any, grid_pinpoints: GridPinpoints) -> torch.Tensor:
    """AnyRes (LLaVA-NeXT): the whole image at the encoder's resolution, then crops of its best-fit upscale.

    Args:
        image: image of size (W, H).
        processor: CLIP-like image processor producing S x S images.
        grid_pinpoints: candidate resolutions, in any form `parse_grid_pinpoints` accepts.

    Returns:
        (1 + num_crops, 3, S, S): index 0 the resized whole image, then the crops in raster order.
    """
    resize_side, crop_side = _processor_sides(processor)
    best = select_best_resolution(image.size, parse_grid_pinpoints(grid_pinpoints, crop_side))
    crops = divide_to_patches(resize_and_pad_image(image, best), crop_side)
    overview = image.resize((resize_side, resize_side), Image.Resampling.BICUBIC)
    return _pixel_values(processor, [overview, *crops])


def unpad_image(tensor: torch.Tensor, original_size: Resolution) -> torch.Tensor:
    """Remove the rows or columns that `resize_and_pad_image` padded (LLaVA-NeXT "spatial_unpad").

    Args:
        tensor: (C, H, W) image or feature map of the padded canvas.
        original_size: (width, height) of the image before resizing and padding.

    Returns:
        (C, H', W) or (C, H, W') with the centred padding cut off the padded dimension.
    """
    original_width, original_height = original_size
    current_height, current_width = tensor.shape[-2:]
    # rounding to 7 digits keeps float error from truncating an exact 12.0 computed as 11.999... to 11
    if original_width / original_height > current_width / current_height:
        new_height = int(round(original_height * (current_width / original_width), 7))
        padding = (current_height - new_height) // 2
        return tensor[..., padding : current_height - padding, :]
    new_width = int(round(original_width * (current_height / original_height), 7))
    padding = (current_width - new_width) // 2
    return tensor[..., :, padding : current_width - padding]


def process_images(images: Sequence[Image.Image], image_processor: Any, model_cfg: Any) -> torch.Tensor | list:
    """Preprocess images as the model was trained: `model_cfg.image_aspect_ratio` picks the mode.

    Args:
        images: PIL images.
        image_processor: CLIP-like image processor producing S x S images.
        model_cfg: object with `image_aspect_ratio` (None/"square", "pad", "anyres", "anyres_max_*") and, for
            AnyRes, `image_grid_pinpoints`.

    Returns:
        (B, 3, S, S) for square and pad; (B, 1 + n, 3, S, S) for AnyRes when every image has the same number of
        crops, else a list of B tensors (1 + n_i, 3, S, S).
    """
    if not images:
        raise ValueError("process_images got no images")
    aspect_ratio = getattr(model_cfg, "image_aspect_ratio", None)
    if aspect_ratio in (None, "square"):
        return _pixel_values(image_processor, list(images))
    if aspect_ratio == "pad":
        background = tuple(int(m * _MAX_PIXEL_VALUE) for m in image_processor.image_mean)
        return _pixel_values(image_processor, [expand2square(img, background) for img in images])
    if isinstance(aspect_ratio, str) and aspect_ratio.startswith("anyres"):
        pinpoints = model_cfg.image_grid_pinpoints
        processed = [process_anyres_image(img, image_processor, pinpoints) for img in images]
        if all(p.shape == processed[0].shape for p in processed):
            return torch.stack(processed, dim=0)
        return processed
    raise ValueError(f"image_aspect_ratio must be None, 'square', 'pad' or 'anyres*', got {aspect_ratio!r}")


def _download_image(url: str) -> Image.Image:
    """Fetch an image over HTTP(S) with `requests` (an optional dependency)."""
    try:
        import requests
    except ImportError as err:
        raise ValueError(f"cannot load {url}: downloading images needs `pip install requests`") from err
    response = requests.get(url, timeout=_DOWNLOAD_TIMEOUT_S)
    response.raise_for_status()
    try:
        return Image.open(BytesIO(response.content)).convert("RGB")
    except UnidentifiedImageError as err:
        raise ValueError(f"{url} did not return a readable image: {err}") from err


def load_image(path_or_url: str | Path) -> Image.Image:
    """Open an image file (or an http(s) URL when `requests` is installed) as RGB.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable image, or a URL was given without `requests`.
    """
    if isinstance(path_or_url, str) and path_or_url.startswith(_URL_PREFIXES):
        return _download_image(path_or_url)
    path = Path(path_or_url)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as err:  # UnidentifiedImageError and truncated files are both OSErrors
        raise ValueError(f"cannot read image {path}: {err}") from err


def tokenizer_image_token(
    prompt: str, tokenizer: Any, image_token_index: int = IMAGE_TOKEN_INDEX, return_tensors: str | None = None
) -> list[int] | torch.Tensor:
    """Tokenize a prompt, putting `image_token_index` where each "<image>" was.

    Each text chunk is tokenized on its own; when the tokenizer adds a BOS, only the first chunk keeps it.

    Args:
        prompt: text with zero or more "<image>" placeholders.
        tokenizer: Hugging Face tokenizer.
        image_token_index: id that stands for an image (negative, so it never collides with a vocabulary id).
        return_tensors: None for a list of ids, "pt" for a 1-D LongTensor.

    Returns:
        list[int] or (L,) LongTensor.
    """
    if return_tensors not in (None, "pt"):
        raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
    chunks = [list(tokenizer(chunk)["input_ids"]) for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and len(chunks[0]) > 0 and chunks[0][0] == bos
    input_ids: list[int] = [bos] if adds_bos else []
    for i, chunk in enumerate(chunks):
        if i > 0:
            input_ids.append(image_token_index)
        input_ids.extend(chunk[1:] if adds_bos and chunk[:1] == [bos] else chunk)
    if return_tensors == "pt":
        return torch.tensor(input_ids, dtype=torch.long)
    return input_ids


def get_model_name_from_path(model_path: str) -> str:
    """Model name from a checkpoint folder: its last component, or "<parent>_<last>" for "checkpoint-*" folders."""
    parts = [part for part in model_path.strip("/").split("/") if part]
    if not parts:
        raise ValueError(f"cannot derive a model name from {model_path!r}")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]


class KeywordsStoppingCriteria(StoppingCriteria):
    """Stop a sequence once any keyword appears in the text generated after the prompt."""

    def __init__(self, keywords: Sequence[str], tokenizer: Any, input_ids: torch.Tensor | None = None) -> None:
        """Tokenize the keywords once.

        Args:
            keywords: stop strings, e.g. ["</s>"] or ["###"].
            tokenizer: tokenizer used for generation.
            input_ids: (B, L) prompt ids when the sequences the criterion sees start with the prompt (generation
                from ``input_ids``); generation then starts at column L. Leave it None for our LLaVA's
                ``model.generate(input_ids, images=...)``: it generates from embeddings, so transformers passes
                the new tokens only.
        """
        self.keywords = list(keywords)
        self.tokenizer = tokenizer
        self.start_len = 0 if input_ids is None else input_ids.shape[1]
        self.keyword_ids: list[torch.Tensor] = []
        for keyword in self.keywords:
            ids = list(tokenizer(keyword)["input_ids"])
            if len(ids) > 1 and ids[0] == tokenizer.bos_token_id:
                ids = ids[1:]
            self.keyword_ids.append(torch.tensor(ids, dtype=torch.long))

    def _row_done(self, generated: torch.Tensor) -> bool:
        """Whether one row's generated ids (T,) end with a keyword's ids or decode to text containing one."""
        for ids in self.keyword_ids:
            n = ids.numel()
            if 0 < n <= generated.numel() and torch.equal(generated[-n:], ids.to(generated.device)):
                return True
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        return any(keyword in text for keyword in self.keywords)

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        """Per-row stop flags.

        Args:
            input_ids: (B, L + T) prompt and generated ids.
            scores: unused.

        Returns:
            (B,) bool tensor, True where the row should stop.
        """
        generated = input_ids[:, self.start_len :]
        done = [generated.shape[1] > 0 and self._row_done(row) for row in generated]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
