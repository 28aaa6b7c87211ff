"""Take what VisionZip needs from one encoder layer (queries, keys) without materialising N x N attention maps."""

from __future__ import annotations

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
