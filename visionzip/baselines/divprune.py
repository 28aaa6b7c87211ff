"""DivPrune (CVPR 2025): keep the projected image tokens that are most diverse, by greedy max-min cosine distance.

Specification: ``shared/methods/baselines.md`` section 5 (reference ``vbdi/divprune``). Text-free, before the
language model, on the tokens after the projector. With D = 1 - cos(x_i, x_j): the first pick is the token whose
nearest other token is farthest; each next pick is the candidate whose distance to the picked set (its minimum
over the picks) is largest; the picks are sorted back into raster order. The reference keeps round(ratio * n);
here the count is given directly (``tokens``). Differences from the reference, all deliberate: every row of a batch
is selected on its own (the reference reads row 0 only), distances are fp32 whatever the input dtype, a picked token
is never picked again (the reference relies on its zero self-distance, which duplicates can tie), and equal scores
go to the lower position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from visionzip.baselines.base import BaselineConfig


def check_keep(method: str, keep: int, tokens: int) -> None:
    """ValueError with the numbers unless 1 <= ``keep`` <= ``tokens`` (the image's tokens)."""
    if not 1 <= keep <= tokens:
        raise ValueError(f"{method} keeps {keep} tokens, but an image here has {tokens}: need 1 <= tokens <= {tokens}")


def check_tokens_option(method: str, tokens: int) -> None:
    """ValueError unless a config's ``tokens`` is an int >= 1 (an image's size is checked when it is selected)."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"{method} tokens must be an integer >= 1, got {tokens!r}")


@dataclass(frozen=True)
class DivPruneConfig(BaselineConfig):
    """DivPrune's options.

    Attributes:
        tokens: tokens kept per image (per view on AnyRes), chosen among the projected tokens.
    """

    name: ClassVar[str] = "divprune"
    features: ClassVar[str] = "projected"  # selects on the projector's output
    tokens: int = 64

    def __post_init__(self) -> None:
        check_tokens_option("DivPrune", self.tokens)

    def describe(self) -> str:
        """``DivPrune, 64 tokens (max-min diversity)``, for logs and summaries."""
        return f"DivPrune, {self.tokens} tokens (max-min diversity)"


def cosine_distance(tokens: torch.Tensor) -> torch.Tensor:
    """D = 1 - cos(x_i, x_j) in fp32: (B, N, C) -> (B, N, N). A zero token is at distance 1 from every token."""
    x = F.normalize(tokens.float(), dim=-1)  # (B, N, C)
    return 1 - x @ x.transpose(-1, -2)


def divprune_select(tokens: torch.Tensor, keep: int) -> torch.Tensor:
    """DivPrune's greedy max-min diversity selection (spec section 5), each row of the batch on its own.

    Args:
        tokens: (B, N, C) projected image tokens (any float dtype; distances are computed in fp32).
        keep: tokens to keep, 1 <= keep <= N.

    Returns:
        (B, keep) int64 positions, ascending (raster order).
    """
    b, n, _ = tokens.shape
    check_keep("DivPrune", keep, n)
    dist = cosine_distance(tokens)  # (B, N, N); column j: distances to token j
    rows = torch.arange(b, device=tokens.device)
    self_mask = torch.eye(n, dtype=torch.bool, device=tokens.device)
    score = dist.masked_fill(self_mask, float("inf")).amin(dim=1)  # (B, N): each token's nearest-other distance
    score = score.masked_fill(torch.isinf(score), 0.0)  # a lone token (N = 1) has no other
    picked = torch.empty(b, keep, dtype=torch.long, device=tokens.device)
    chosen = torch.zeros(b, n, dtype=torch.bool, device=tokens.device)
    to_set = torch.full((b, n), float("inf"), device=tokens.device)  # (B, N): min distance to the picked set
    for t in range(keep):
        j = score.argmax(dim=-1)  # (B,); the first maximum: the lower position wins a tie
        picked[:, t] = j
        chosen[rows, j] = True
        to_set = torch.minimum(to_set, dist[rows, j])  # (B, N): rows of D are the picks' distances
        score = to_set.masked_fill(chosen, -float("inf"))
    return picked.sort(dim=-1).values
