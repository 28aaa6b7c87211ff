"""Where each crop's visual tokens go in LLaVA-NeXT's AnyRes sequence: LLaVA's layouts and VisionZip's."""

from __future__ import annotations

import torch

from llava.mm_utils import unpad_image
from visionzip.anyres import visionzip_layout as visionzip_layout  # one source: our NeXT and transformers' use it


def spatial_layout(
    features: torch.Tensor, grid: tuple[int, int], side: int, image_size: tuple[int, int],
    newline: torch.Tensor | None, unpad: bool,
) -> torch.Tensor:  # fmt: skip
    """LLaVA-NeXT's ``spatial`` / ``spatial_unpad`` merge of one image.

    Args:
        features: (1 + nh * nw, side * side, C): the base view, then the crops in raster order.
        grid: (nw, nh) crops across and down.
        side: patches per crop side (``image_size // patch_size``).
        image_size: (width, height) of the original image, to remove the padding (``unpad``).
        newline: (C,) ``image_newline`` appended at the end of each row when ``unpad``.

    Returns:
        (L, C): base tokens, then the stitched grid's tokens row by row.
    """
    nw, nh = grid
    views, patches, channels = features.shape
    if views != 1 + nw * nh or patches != side * side:
        raise ValueError(f"expected 1 + {nw}x{nh} views of {side}x{side} patches, got {views} of {patches}")
    crops = features[1:].view(nh, nw, side, side, channels)
    if not unpad:
        return torch.cat([features[0], crops.permute(0, 2, 1, 3, 4).reshape(-1, channels)])
    stitched = crops.permute(4, 0, 2, 1, 3).reshape(channels, nh * side, nw * side)  # (C, rows, cols)
    stitched = unpad_image(stitched, image_size)
    if newline is not None:
        column = newline.view(channels, 1, 1).expand(channels, stitched.shape[1], 1).to(stitched)
        stitched = torch.cat([stitched, column], dim=2)
    return torch.cat([features[0], stitched.flatten(1).transpose(0, 1)])
