"""Where VisionZip's compressed views go in a multi-crop (AnyRes) image: the released code's order."""

from __future__ import annotations

import torch


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
