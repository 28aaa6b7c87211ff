"""Mini-Gemini's patch info mining: each low-resolution CLIP token attends to its own region of the ConvNeXt map."""

from __future__ import annotations

import math

import torch
from torch import nn

# the released names of the three mining projections on the inner model (``model.<name>.{0,1}.{weight,bias}``)
QUERY, KEY, VALUE = "vlm_uni_query_projector", "vlm_uni_aux_projector", "vlm_uni_val_projector"


def mining_projector(in_features: int, out_features: int) -> nn.Sequential:
    """LayerNorm then Linear, as the released ``vlm_uni_*_projector`` (keys ``0.*`` and ``1.*``)."""
    return nn.Sequential(nn.LayerNorm(in_features), nn.Linear(in_features, out_features))


def regions(aux_map: torch.Tensor, side: int) -> torch.Tensor:
    """Cut a (B, C_aux, H, W) map into the side x side regions under the CLIP patches, in raster order.

    Returns:
        (B, side * side, (H / side) * (W / side), C_aux): region r = (row, col) holds the map's pixels
        [row * H / side, (row + 1) * H / side) x [col * W / side, (col + 1) * W / side), themselves in raster order.
    """
    b, c, h, w = aux_map.shape
    if h % side or w % side:
        raise ValueError(
            f"the ConvNeXt map is {h}x{w}, not divisible into the {side}x{side} CLIP patches: expected a side that "
            f"is a multiple of {side} (image_size_aux / 4 = k * {side})"
        )
    ph, pw = h // side, w // side
    cells = aux_map.permute(0, 2, 3, 1).reshape(b, side, ph, side, pw, c)  # (B, row, y, col, x, C)
    return cells.permute(0, 1, 3, 2, 4, 5).reshape(b, side * side, ph * pw, c)


def mine_patches(
    tokens: torch.Tensor, aux_map: torch.Tensor, query: nn.Module, key: nn.Module, value: nn.Module
) -> torch.Tensor:
    """Mini-Gemini's patch info mining (its paper, Sec. 3.2): ``tokens + softmax(q k^T / sqrt(C)) v`` per patch.

    Token i of the square CLIP grid queries only the ConvNeXt pixels of its own region (:func:`regions`); the
    keys and values come from those pixels. The result keeps one token per patch, so the count stays N.

    Args:
        tokens: (B, N, C) CLIP patch tokens, N = side^2 in raster order (no [CLS]).
        aux_map: (B, C_aux, H, W) the high-resolution map, H and W multiples of side.
        query: C -> C; key, value: C_aux -> C.

    Returns:
        (B, N, C) the tokens with what they mined added.
    """
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise ValueError(f"patch info mining needs a square grid of CLIP tokens, got {tokens.shape[1]}")
    cells = regions(aux_map.to(tokens.dtype), side)  # (B, N, P, C_aux)
    q = query(tokens).unsqueeze(2)  # (B, N, 1, C)
    k = key(cells)  # (B, N, P, C)
    v = value(cells)  # (B, N, P, C)
    scores = q @ (k.transpose(-1, -2) / math.sqrt(k.shape[-1]))  # (B, N, 1, P)
    # the released code zeroes NaN/inf scores (fp16 overflow) before the softmax; kept so that half precision agrees
    mined = (scores.nan_to_num().softmax(-1) @ v).squeeze(2)  # (B, N, C)
    return tokens + mined
