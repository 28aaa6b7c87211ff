"""Attention rows of a few query tokens, from a layer's own query/key projections (no L x L map, any kernel)."""

from __future__ import annotations

import torch


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (the half-split form Llama and Mistral use).

    Args:
        x: (B, H, N, D) queries or keys.
        cos, sin: (B, N, D) from the model's rotary module at the tokens' positions.
    """
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def head_mean_attention(
    queries: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor, scaling: float
) -> torch.Tensor:
    """softmax(q k^T * scaling) over the allowed keys, in float32, averaged over heads.

    What an eager attention map gives for these query rows (FastV's and PDrop's score: the last prompt token's row;
    SparseVLM's: its raters' rows), computed for Q queries only.

    Args:
        queries: (B, H, Q, D) after rotary.
        keys: (B, Hkv, N, D) after rotary; H must be a multiple of Hkv (grouped-query attention shares a key head).
        allowed: (B, Q, N) bool, which keys each query may see (causal and padding).
        scaling: the layer's softmax scale (1 / sqrt(D) for Llama).

    Returns:
        (B, Q, N) float32; rows sum to 1 over their allowed keys.
    """
    heads, kv_heads = queries.shape[1], keys.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} key heads")
    keys = keys.repeat_interleave(heads // kv_heads, dim=1)  # (B, H, N, D)
    logits = torch.matmul(queries.float(), keys.float().transpose(-1, -2)) * scaling  # (B, H, Q, N)
    logits = logits.masked_fill(~allowed.unsqueeze(1), torch.finfo(torch.float32).min)
    return logits.softmax(dim=-1).mean(dim=1)
