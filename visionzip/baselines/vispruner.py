"""VisPruner (ICCV 2025): important image tokens by [CLS] attention, plus diverse ones by iterative duplicate removal.

Specification: ``shared/methods/baselines.md`` section 6 (reference ``Theia-4869/VisPruner``). Text-free, before the
projector. Of ``tokens`` = T kept, T_imp = int(T * important_ratio) are the top tokens by the [CLS] row of the
encoder layer LLaVA reads (head mean; a head sum ranks the same); the other T_div = T - T_imp come from the rest,
ordered by attention descending, by rounds of: r' = min(8, R - T_div); a = residual[0::2], b = residual[1::2]; each
a-token scored by its largest cosine similarity to a b-token; the r' highest-scoring a-tokens dropped (all of a if
r' exceeds it, as the reference's slice does); new residual = the remaining a-tokens by descending score ++ b.
Differences from the reference, deliberate: sorts are stable (a tie goes to the earlier entry), T_div = 0 keeps no
diverse token (the reference's loop fails on an empty b), and a zero feature is normalised without dividing by 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from visionzip.baselines.base import BaselineConfig
from visionzip.baselines.divprune import check_keep, check_tokens_option

MAX_DROP_PER_ROUND = 8  # the reference's r' cap


@dataclass(frozen=True)
class VisPrunerConfig(BaselineConfig):
    """VisPruner's options.

    Attributes:
        tokens: T, tokens kept per image (per view on AnyRes).
        important_ratio: share of T chosen by [CLS] attention (int(T * ratio)); the rest are the diverse tokens.
            1 is FasterVLM ([CLS] attention only); 0 keeps only diverse tokens. The default 0.5 is the reference
            README's 128-token example and LightCompress' default (its 64-token example uses 0.75).
    """

    name: ClassVar[str] = "vispruner"
    features: ClassVar[str] = "encoder"  # selects on the encoder's output (before the projector) and its [CLS] row
    tokens: int = 64
    important_ratio: float = 0.5

    def __post_init__(self) -> None:
        check_tokens_option("VisPruner", self.tokens)
        if not 0 <= self.important_ratio <= 1:
            raise ValueError(f"VisPruner important_ratio must be in [0, 1], got {self.important_ratio}")

    @property
    def important(self) -> int:
        """T_imp = int(T * important_ratio)."""
        return int(self.tokens * self.important_ratio)

    def describe(self) -> str:
        """``VisPruner, 64 tokens (32 by [CLS] attention, 32 diverse)``, for logs and summaries."""
        return (
            f"VisPruner, {self.tokens} tokens ({self.important} by [CLS] attention, "
            f"{self.tokens - self.important} diverse)"
        )


def diverse_residual(similarity: torch.Tensor, residual: torch.Tensor, diverse: int) -> torch.Tensor:
    """VisPruner's iterative duplicate removal (spec section 6): shrink ``residual`` to ``diverse`` tokens.

    Args:
        similarity: (B, N, N) cosine similarity of the encoder features (fp32), computed once for all rounds.
        residual: (B, R) positions, ordered by [CLS] attention descending (the order decides the a/b split).
        diverse: T_div, 0 <= T_div <= R.

    Returns:
        (B, T_div) positions, in the loop's final order.
    """
    if diverse == 0:
        return residual[:, :0]
    rows = torch.arange(residual.shape[0], device=residual.device)[:, None, None]  # (B, 1, 1)
    while residual.shape[1] > diverse:
        size = residual.shape[1]
        drop = min(MAX_DROP_PER_ROUND, size - diverse)
        a, b = residual[:, 0::2], residual[:, 1::2]  # (B, ceil(R/2)), (B, floor(R/2))
        score = similarity[rows, a[:, :, None], b[:, None, :]].amax(dim=-1)  # (B, |a|): its closest b-token
        order = score.argsort(dim=-1, descending=True, stable=True)[:, drop:]  # (B, |a| - r'); empty if r' >= |a|
        residual = torch.cat([a.gather(1, order), b], dim=1)
    return residual


def vispruner_select(features: torch.Tensor, attention: torch.Tensor, keep: int, important: int) -> torch.Tensor:
    """VisPruner's selection (spec section 6), each row of the batch on its own.

    Args:
        features: (B, N, C) encoder features of the image's N patches (no [CLS]), before the projector.
        attention: (B, N) the [CLS] row's attention to those patches, head mean (or sum).
        keep: T, 1 <= T <= N. important: T_imp, 0 <= T_imp <= T (VisPrunerConfig.important).

    Returns:
        (B, T) int64 positions, ascending (raster order).
    """
    _, n, _ = features.shape
    check_keep("VisPruner", keep, n)
    if not 0 <= important <= keep:
        raise ValueError(f"VisPruner's important tokens must be in [0, {keep}] (of {keep} kept), got {important}")
    if attention.shape != features.shape[:2]:
        raise ValueError(
            f"VisPruner attention must be (B, N) = {tuple(features.shape[:2])}, got {tuple(attention.shape)}"
        )
    order = attention.float().argsort(dim=-1, descending=True, stable=True)  # (B, N)
    normalized = F.normalize(features.float(), dim=-1)  # (B, N, C)
    similarity = normalized @ normalized.transpose(-1, -2)  # (B, N, N)
    diverse = diverse_residual(similarity, order[:, important:], keep - important)  # (B, T_div)
    return torch.cat([order[:, :important], diverse], dim=1).sort(dim=-1).values
