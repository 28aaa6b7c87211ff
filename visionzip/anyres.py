"""One multi-view (AnyRes) layout: the crop grid as (rows, cols), and VisionZip's tokens per image in released order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

ViewEncoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (V, 3, S, S) -> (V, K, C), keep (V, D)


class Grid(NamedTuple):
    """An AnyRes crop grid: ``rows`` crops down, ``cols`` crops across; the views are the base view, then the crops
    in raster order (row by row)."""

    rows: int
    cols: int

    @property
    def views(self) -> int:
        """The base view and the rows x cols crops."""
        return 1 + self.rows * self.cols


class SizeHW(NamedTuple):
    """An image size in pixels, height first (transformers' and vLLM's ``image_sizes``)."""

    height: int
    width: int


def _as_grid(grid: Grid) -> Grid:
    """A plain tuple is refused: (rows, cols) and (cols, rows) look alike, and a swapped grid lays tokens out wrong."""
    if not isinstance(grid, Grid):
        raise ValueError(f"grid must be a visionzip.anyres.Grid(rows, cols), got {grid!r}")
    return grid


def visionzip_layout(
    tokens: torch.Tensor, keep: torch.Tensor, grid: Grid, side: int, dominant: int, prefix: int
) -> torch.Tensor:
    """The released VisionZip code's order for one multi-crop image.

    Base view's tokens first, then every crop's dominant patches in the raster order of the stitched
    high-resolution grid, then the crops' kept non-patch tokens ([CLS]) in crop order, then all crops'
    contextual tokens. No unpadding and no ``image_newline``. With ``cls_token=True`` every crop keeps its
    [CLS]; with ``cls_token=False`` a crop's [CLS] appears only if its score selected it.

    Args:
        tokens: (grid.views, dominant + contextual, C) VisionZip tokens per view: dominant ones in the
            ascending order of ``keep``, then contextual ones.
        keep: (grid.views, dominant) encoder positions kept per view.
        grid: the crops; side: patches per crop side.
        dominant: dominant tokens per view.
        prefix: encoder tokens before the patches in each view (CLIP's [CLS]: 1; none: 0); position
            ``p >= prefix`` is patch ``p - prefix`` of the crop, in raster order.

    Returns:
        (L, C) with L = views * (dominant + contextual).
    """
    rows, cols = _as_grid(grid)
    views, _, channels = tokens.shape
    if views != grid.views:
        raise ValueError(f"expected 1 + {rows}x{cols} views, got {views} (grid: {rows} rows x {cols} cols)")
    if tuple(keep.shape) != (views, dominant):
        raise ValueError(f"keep must be (views, dominant) = {(views, dominant)}, got {tuple(keep.shape)}")
    crops, crop_keep = tokens[1:], keep[1:]  # (k, D + T, C), (k, D)
    patch = crop_keep - prefix  # (k, D) raster position within the crop; negative: a [CLS]-like token
    crop = torch.arange(crops.shape[0], device=tokens.device).unsqueeze(1)  # (k, 1)
    row = (crop // cols) * side + patch // side  # (k, D) row in the stitched patch grid
    col = (crop % cols) * side + patch % side
    patches_total = rows * side * cols * side
    # one sort key per dominant token: stitched raster position, or after every patch in (crop, position) order
    key = torch.where(patch >= 0, row * (cols * side) + col, patches_total + crop * prefix + crop_keep)  # (k, D)
    order = key.flatten().argsort(stable=True)
    dominant_tokens = crops[:, :dominant].reshape(-1, channels)[order]
    return torch.cat([tokens[0], dominant_tokens, crops[:, dominant:].reshape(-1, channels)])


def stack_views(pixel_values: torch.Tensor | Sequence[torch.Tensor], views: Sequence[int]) -> torch.Tensor:
    """Each image's real views, padding views dropped, in one batch.

    Args:
        pixel_values: (N, V_max, 3, S, S) padded views, N tensors (V_i' >= V_i, 3, S, S), or already (sum V_i, 3, S, S).
        views: V_i, the real views of each image.

    Returns:
        (sum V_i, 3, S, S).
    """
    if isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 4:
        if pixel_values.shape[0] != sum(views):
            raise ValueError(f"expected {sum(views)} views (per image: {views}), got {pixel_values.shape[0]}")
        return pixel_values
    images = list(pixel_values)
    if len(images) != len(views) or any(p.dim() != 4 or p.shape[0] < v for p, v in zip(images, views, strict=False)):
        shapes = [tuple(p.shape) for p in images]
        raise ValueError(f"pixel_values must hold {len(views)} images of >= {list(views)} views each, got {shapes}")
    return torch.cat([pixels[:count] for pixels, count in zip(images, views, strict=True)])


@dataclass
class AnyresTokens:
    """:func:`compress_anyres`' result.

    Attributes:
        features: one (V_i * K, C_llm) tensor per image, laid out by :func:`visionzip_layout` (an image without a
            grid: its base view's (K, C_llm) tokens).
        encoder_tokens: (sum V_i, K, C_vision) the compressed encoder tokens of every view, before the projector.
    """

    features: list[torch.Tensor]
    encoder_tokens: torch.Tensor


def compress_anyres(
    pixel_values: torch.Tensor | Sequence[torch.Tensor], grids: Sequence[Grid | None], encode_views: ViewEncoder,
    project: Callable[[torch.Tensor], torch.Tensor], side: int, dominant: int, prefix: int,
) -> AnyresTokens:  # fmt: skip
    """VisionZip on multi-view images: every view compressed on its own, projected, laid out per image (paper Sec. 3,
    applied per crop as the released LLaVA-NeXT code does). One encoder and one projector call for the batch.

    Args:
        pixel_values: the views, as :func:`stack_views` takes them.
        grids: per image its crop grid, or None for an image seen as its base view alone (OneVision's multi-image
            prompts).
        encode_views: (sum V_i, 3, S, S) -> compressed tokens (sum V_i, K, C_vision) and dominant positions
            (sum V_i, D), as :func:`visionzip.core.compress` returns them.
        project: the projector, (..., C_vision) -> (..., C_llm).
        side: patches per view side; dominant: D; prefix: encoder tokens before the patches ([CLS]: 1).
    """
    views = [1 if grid is None else _as_grid(grid).views for grid in grids]
    tokens, keep = encode_views(stack_views(pixel_values, views))  # (sum V, K, C_vision), (sum V, D)
    projected = project(tokens)  # (sum V, K, C_llm)
    features = [
        image[0] if grid is None else visionzip_layout(image, image_keep, grid, side, dominant, prefix)
        for image, image_keep, grid in zip(projected.split(views), keep.split(views), grids, strict=True)
    ]
    return AnyresTokens(features, tokens)
