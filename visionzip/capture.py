"""Take what VisionZip needs from one encoder layer (queries, keys) without materialising N x N attention maps."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def capture_outputs(**modules: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record the forward outputs of the named modules while the block runs.

    Forward hooks are registered on these module instances only (another model in the process is
    untouched) and removed on exit, also when the block raises.

    Yields:
        dict filled as the modules run: name -> that module's last output.
    """
    store: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name, module in modules.items():

            def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor, name: str = name) -> None:
                store[name] = output

            handles.append(module.register_forward_hook(hook))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, H * Dh) -> (B, H, N, Dh), in fp32."""
    b, n, _ = x.shape
    return x.float().view(b, n, num_heads, -1).transpose(1, 2)


def head_mean_keys(keys: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Keys averaged over heads: (B, N, H * Dh) -> (B, N, Dh), as the paper's merging metric."""
    b, n, _ = keys.shape
    return keys.view(b, n, num_heads, -1).mean(dim=2)


def cls_scores(queries: torch.Tensor, keys: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """[CLS]-row attention probabilities summed over heads (paper Sec. 3.2), in fp32.

    Only the [CLS] query is used: O(H x N) memory instead of the O(H x N x N) attention map.

    Args:
        queries: (B, N, H * Dh) query projection output; position 0 is [CLS].
        keys: (B, N, H * Dh) key projection output.

    Returns:
        (B, N) scores; entry 0 is [CLS]'s attention to itself.
    """
    q_cls = _heads(queries[:, :1], num_heads)  # (B, H, 1, Dh)
    k = _heads(keys, num_heads)  # (B, H, N, Dh)
    probs = ((q_cls @ k.transpose(-1, -2)) * scale).softmax(dim=-1)  # (B, H, 1, N)
    return probs.sum(dim=1).squeeze(1)


def received_scores(
    queries: torch.Tensor, keys: torch.Tensor, num_heads: int, scale: float, chunk: int = 256
) -> torch.Tensor:
    """Attention each token receives, averaged over heads and queries (for encoders without [CLS]), in fp32.

    Queries are processed ``chunk`` at a time: O(B x H x chunk x N) memory.

    Args:
        queries, keys: (B, N, H * Dh) projection outputs.

    Returns:
        (B, N) mean received attention.
    """
    q = _heads(queries, num_heads)  # (B, H, N, Dh)
    k = _heads(keys, num_heads)  # (B, H, N, Dh)
    b, h, n, _ = q.shape
    total = q.new_zeros(b, n)
    for start in range(0, n, chunk):
        probs = ((q[:, :, start : start + chunk] @ k.transpose(-1, -2)) * scale).softmax(dim=-1)  # (B, H, c, N)
        total += probs.sum(dim=(1, 2))
    return total / (h * n)


def segment_received_scores(
    queries: torch.Tensor, keys: torch.Tensor, cu_seqlens: torch.Tensor, scale: float, chunk: int
) -> torch.Tensor:
    """Attention each token receives inside its attention segment, mean over heads, summed over queries, in fp32.

    Segments never attend to each other (images, frame groups, windows), so each is scored alone, ``chunk`` queries
    at a time (:func:`received_scores`): the largest intermediate is (1, H, chunk, L_segment).

    Args:
        queries, keys: (S, H, Dh) after the block's rotary embedding.
        cu_seqlens: (num_segments + 1,) segment boundaries, as the block received them.

    Returns:
        (S,) scores.
    """
    heads = queries.shape[1]
    bounds = cu_seqlens.tolist()
    parts = []
    for start, end in itertools.pairwise(bounds):
        if end > start:
            q = queries[start:end].reshape(1, end - start, -1)  # (1, L, H * Dh)
            k = keys[start:end].reshape(1, end - start, -1)
            parts.append(received_scores(q, k, heads, scale, chunk)[0] * (end - start))  # mean over queries -> sum
    return torch.cat(parts) if parts else queries.new_zeros(0, dtype=torch.float32)


def group_mean(x: torch.Tensor, unit: int) -> torch.Tensor:
    """Average over groups of ``unit`` consecutive rows: (S, ...) -> (S / unit, ...).

    Qwen's PatchMerger makes one LLM token of ``unit`` = 2x2 consecutive patches; a merged token's score and key
    are the means over its group.
    """
    return x.reshape(x.shape[0] // unit, unit, *x.shape[1:]).mean(dim=1)


def merged_scores_and_keys(
    queries: torch.Tensor, keys: torch.Tensor, cu_seqlens: torch.Tensor, scale: float, chunk: int, unit: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score and merging key of each merged token (Qwen2-VL / Qwen2.5-VL, the released code's method), in fp32.

    Args:
        queries, keys: (S, H, Dh) of the scoring block, after its rotary embedding, in the order the block ran them.
        cu_seqlens: (num_segments + 1,) the block's attention segments.
        unit: patches per merged token (``spatial_merge_size**2``).

    Returns:
        scores: (S / unit,) received attention (:func:`segment_received_scores`) averaged over each merge group;
        keys: (S / unit, Dh) keys averaged over heads, then over each merge group.
    """
    scores = segment_received_scores(queries, keys, cu_seqlens, scale, chunk)  # (S,)
    return group_mean(scores, unit), group_mean(keys.float().mean(dim=1), unit)
