"""Where each crop's visual tokens go in LLaVA-NeXT's AnyRes sequence: LLaVA's layouts and VisionZip's."""

from __future__ import annotations

from typing import Any

import torch

from llava.mm_utils import get_anyres_image_grid_shape, unpad_image
from visionzip.anyres import Grid
from visionzip.anyres import visionzip_layout as visionzip_layout  # one source: our NeXT and transformers' use it

SizeWH = tuple[int, int]  # (width, height): LLaVA's ``image_sizes``, in PIL's ``Image.size`` order


def image_grid(size: SizeWH, grid_pinpoints: Any, view_size: int) -> Grid:
    """The crop grid LLaVA's AnyRes makes for an image of ``size`` (width, height), ``view_size`` pixels a crop."""
    cols, rows = get_anyres_image_grid_shape(size, grid_pinpoints, view_size)  # LLaVA's (across, down)
    return Grid(rows=rows, cols=cols)


def spatial_layout(
    features: torch.Tensor, grid: Grid, side: int, image_size: SizeWH, newline: torch.Tensor | None, unpad: bool
) -> torch.Tensor:
    """LLaVA-NeXT's ``spatial`` / ``spatial_unpad`` merge of one image.

    Args:
        features: (grid.views, side * side, C): the base view, then the crops in raster order.
        grid: the crops (:func:`image_grid`).
        side: patches per crop side (``image_size // patch_size``).
        image_size: (width, height) of the original image, to remove the padding (``unpad``).
        newline: (C,) ``image_newline`` appended at the end of each row when ``unpad``.

    Returns:
        (L, C): base tokens, then the stitched grid's tokens row by row.
    """
    if not isinstance(grid, Grid):
        raise ValueError(f"grid must be a visionzip.anyres.Grid(rows, cols), got {grid!r}")
    rows, cols = grid
    views, patches, channels = features.shape
    if views != grid.views or patches != side * side:
        raise ValueError(f"expected 1 + {rows}x{cols} views of {side}x{side} patches, got {views} of {patches}")
    crops = features[1:].view(rows, cols, side, side, channels)  # (crop row, crop col, patch row, patch col, C)
    if not unpad:
        return torch.cat([features[0], crops.permute(0, 2, 1, 3, 4).reshape(-1, channels)])
    stitched = crops.permute(4, 0, 2, 1, 3).reshape(channels, rows * side, cols * side)  # (C, rows, cols)
    stitched = unpad_image(stitched, image_size)
    if newline is not None:
        column = newline.view(channels, 1, 1).expand(channels, stitched.shape[1], 1).to(stitched)
        stitched = torch.cat([stitched, column], dim=2)
    return torch.cat([features[0], stitched.flatten(1).transpose(0, 1)])
