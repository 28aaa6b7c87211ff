"""Where each crop's visual tokens go in LLaVA-NeXT's AnyRes sequence: LLaVA's layouts and VisionZip's."""

from __future__ import annotations

import torch

from llava.mm_utils import unpad_image


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


def visionzip_layout(
    tokens: torch.Tensor, keep: torch.Tensor, grid: tuple[int, int], side: int, dominant: int, prefix: int
) -> torch.Tensor:
    """The released VisionZip code's order for one multi-crop image.

    Base view's tokens first, then every crop's dominant patches in the raster order of the stitched
    high-resolution grid, then the crops' kept non-patch tokens ([CLS]) in crop order, then all crops'
    contextual tokens. No unpadding and no ``image_newline``. With ``cls_token=True`` every crop keeps its
    [CLS]; with ``cls_token=False`` a crop's [CLS] appears only if its score selected it.

    Args:
        tokens: (1 + nh * nw, dominant + contextual, C) VisionZip tokens per view: dominant ones in the
            ascending order of ``keep``, then contextual ones.
        keep: (1 + nh * nw, dominant) encoder positions kept per view.
        grid: (nw, nh); side: patches per crop side.
        dominant: dominant tokens per view.
        prefix: encoder tokens before the patches in each view (CLIP's [CLS]: 1; none: 0); position
            ``p >= prefix`` is patch ``p - prefix`` of the crop, in raster order.

    Returns:
        (L, C) with L = views * (dominant + contextual).
    """
    nw, nh = grid
    views, _, channels = tokens.shape
    if views != 1 + nw * nh:
        raise ValueError(f"expected 1 + {nw}x{nh} views, got {views}")
    if tuple(keep.shape) != (views, dominant):
        raise ValueError(f"keep must be (views, dominant) = {(views, dominant)}, got {tuple(keep.shape)}")
    crops, crop_keep = tokens[1:], keep[1:]  # (k, D + T, C), (k, D)
    patch = crop_keep - prefix  # (k, D) raster position within the crop; negative: a [CLS]-like token
    crop = torch.arange(crops.shape[0], device=tokens.device).unsqueeze(1)  # (k, 1)
    row = (crop // nw) * side + patch // side
    col = (crop % nw) * side + patch % side
    patches_total = nh * side * nw * side
    # one sort key per dominant token: stitched raster position, or after every patch in (crop, position) order
    key = torch.where(patch >= 0, row * (nw * side) + col, patches_total + crop * prefix + crop_keep)  # (k, D)
    order = key.flatten().argsort(stable=True)
    dominant_tokens = crops[:, :dominant].reshape(-1, channels)[order]
    return torch.cat([tokens[0], dominant_tokens, crops[:, dominant:].reshape(-1, channels)])
