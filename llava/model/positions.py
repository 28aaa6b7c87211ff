"""Where each encoder token of an image stands in the vanilla (uncompressed) LLaVA sequence of that image.

VisionZip's ``positions="original"`` gives each kept token the position id it would have without compression. The
"original position" of an encoder token is its offset within its image's span in the vanilla layout:

* one view (LLaVA-1.5): patch ``p`` (raster order) is at ``p``; with ``mm_vision_select_feature="cls_patch"`` the
  [CLS] token is part of the vanilla span, at 0, and patches follow it; with ``"patch"`` (the released setting) vanilla
  drops [CLS]: it takes the slot before the first patch, -1 (the position of the token before the image). A trailing
  ``image_newline`` (``spatial_unpad`` on a single view) is the span's last slot, as in vanilla.
* ``flat`` multi-view: view ``v``'s tokens follow the ``v`` views before it, each of its full token count.
* ``spatial`` / ``spatial_unpad`` (LLaVA-NeXT): the base view's patches first, then the stitched crop grid row by
  row, with one ``image_newline`` per row and the padding rows or columns removed when unpadded. A crop patch is at
  its place in that grid; a patch that unpadding removes takes the place of the nearest patch vanilla keeps (its row
  and column clamped into the kept rectangle). Vanilla has no [CLS] for crops: a crop's [CLS] takes the slot before
  its first (top-left) patch's place, as an image's [CLS] does.

The image's span is vanilla's token count: the text after it starts where it would without compression.
"""

from __future__ import annotations

import torch

from llava.mm_utils import unpad_image
from visionzip.anyres import Grid


def single_view_table(num_tokens: int, dropped: int, newline: bool) -> tuple[torch.Tensor, int]:
    """(1, N) original position of each encoder token of a one-view image, and the span.

    Args:
        num_tokens: N, encoder tokens of a view ([CLS] included).
        dropped: encoder tokens vanilla drops before the patches (1 for ``select_feature="patch"``, else 0).
        newline: whether an ``image_newline`` ends the image (it takes the span's last slot).
    """
    table = torch.arange(num_tokens).unsqueeze(0) - dropped  # (1, N)
    return table, num_tokens - dropped + int(newline)


def flat_table(views: int, num_tokens: int, dropped: int) -> tuple[torch.Tensor, int]:
    """(V, N) original positions of a ``flat`` multi-view image (views one after the other), and the span."""
    per_view = num_tokens - dropped
    table = torch.arange(views).unsqueeze(1) * per_view + torch.arange(num_tokens).unsqueeze(0) - dropped  # (V, N)
    return table, views * per_view


def kept_rectangle(rows: int, cols: int, image_size: tuple[int, int] | None) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the stitched patch grid that ``unpad_image`` keeps (None: no unpadding)."""
    if image_size is None:
        return 0, 0, rows, cols
    index = unpad_image(torch.arange(rows * cols).view(1, rows, cols), image_size)  # (1, h, w)
    first = int(index[0, 0, 0])
    return first // cols, first % cols, index.shape[1], index.shape[2]


def spatial_table(
    grid: Grid, side: int, prefix: int, image_size: tuple[int, int] | None, newline: bool
) -> tuple[torch.Tensor, int]:
    """(grid.views, prefix + side * side) original positions of a LLaVA-NeXT image, and the span.

    Args:
        grid: the crops (nh rows, nw cols; :func:`llava.model.anyres.image_grid`); side: patches per crop side.
        prefix: encoder tokens before the patches in each view ([CLS]: 1); vanilla drops them.
        image_size: (width, height) to unpad with (``spatial_unpad``); None: ``spatial``, nothing removed.
        newline: whether each stitched row ends with an ``image_newline`` (vanilla adds it only when unpadding).
    """
    nh, nw = grid.rows, grid.cols
    patches = side * side
    base = torch.arange(-prefix, patches).unsqueeze(0)  # (1, N): [CLS] before the first patch
    top, left, height, width = kept_rectangle(nh * side, nw * side, image_size)
    stride = width + int(newline)
    crop = torch.arange(nw * nh).unsqueeze(1)  # (k, 1)
    patch = torch.arange(-prefix, patches).clamp(min=0).unsqueeze(0)  # (1, N): a [CLS] looks at patch 0
    row = ((crop // nw) * side + patch // side).clamp(top, top + height - 1) - top
    col = ((crop % nw) * side + patch % side).clamp(left, left + width - 1) - left
    crops = patches + row * stride + col  # (k, N)
    is_cls = torch.arange(-prefix, patches) < 0  # (N,)
    crops = torch.where(is_cls, crops - 1, crops)
    return torch.cat([base, crops]), patches + height * stride
