"""CDPruner (NeurIPS 2025): image tokens by a conditional DPP over their similarity and relevance to the instruction.

Specification: ``shared/methods/baselines.md`` section 7 (reference ``Theia-4869/CDPruner``). Before the language
model. The kernel is L = diag(r) S diag(r): S the cosine similarity of the projected tokens (fp32), r each token's
relevance to the instruction, r = mean over text segments of -cos(CLIP image embedding, CLIP text embedding) (the
reference's minus sign), min-max normalised as (r - min + 1e-6) / (max - min). T tokens are picked by the fast greedy
MAP of a DPP (Chen et al. 2018: each pick maximises log det L over the picked set, by an incremental Cholesky
update) and sorted back into raster order. Differences from the reference, deliberate: the relevance is normalised
per row of the batch (the reference takes min and max over the whole batch and one instruction for all rows; here
each row has its own), a constant relevance becomes 1 (the reference divides by zero), and a pick whose remaining
determinant gain is not positive (only once L's rank is exhausted) adds no update instead of dividing by zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from visionzip.baselines.base import BaselineConfig
from visionzip.baselines.divprune import check_keep, check_tokens_option

RELEVANCE_OFFSET = 1e-6  # the reference's, so the least relevant token keeps a non-zero weight


@dataclass(frozen=True)
class CDPrunerConfig(BaselineConfig):
    """CDPruner's options.

    Attributes:
        tokens: T, tokens kept per image (per view on AnyRes).
    """

    name: ClassVar[str] = "cdpruner"
    features: ClassVar[str] = "projected"  # similarity on the projector's output; relevance from CLIP's two towers
    tokens: int = 64

    def __post_init__(self) -> None:
        check_tokens_option("CDPruner", self.tokens)

    def describe(self) -> str:
        """``CDPruner, 64 tokens (conditional DPP)``, for logs and summaries."""
        return f"CDPruner, {self.tokens} tokens (conditional DPP)"


def cdpruner_relevance(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Each image token's relevance to its row's instruction, min-max normalised per row (spec section 7).

    Args:
        image_embeds: (B, N, D) CLIP image-space embeddings of the patches (visual_projection(post_layernorm(F))).
        text_embeds: (B, M, D) CLIP text embeddings of the row's instruction, one per 77-token segment.
        text_mask: (B, M) bool, which segments are real (rows with fewer segments are padded); None: all.

    Returns:
        (B, N) fp32 r = (s - min s + 1e-6) / (max s - min s), s = mean over real segments of -cos(image, text);
        1 everywhere in a row where s is constant.
    """
    b, m = text_embeds.shape[:2]
    if text_mask is None:
        text_mask = torch.ones(b, m, dtype=torch.bool, device=text_embeds.device)
    counts = text_mask.sum(dim=-1, keepdim=True)  # (B, 1)
    if bool((counts == 0).any()):
        raise ValueError("CDPruner needs at least one text segment per row (a row's text_mask is all False)")
    cos = F.normalize(image_embeds.float(), dim=-1) @ F.normalize(text_embeds.float(), dim=-1).transpose(-1, -2)
    score = -(cos * text_mask[:, None, :]).sum(dim=-1) / counts  # (B, N)
    low, high = score.amin(dim=-1, keepdim=True), score.amax(dim=-1, keepdim=True)  # (B, 1) each: per row
    spread = high - low
    scaled = (score - low + RELEVANCE_OFFSET) / spread.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(spread > 0, scaled, torch.ones_like(score))


def cdpruner_kernel(tokens: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """L = diag(r) S diag(r), S the cosine similarity of the tokens, in fp32: (B, N, C), (B, N) -> (B, N, N)."""
    x = F.normalize(tokens.float(), dim=-1)  # (B, N, C)
    similarity = x @ x.transpose(-1, -2)  # (B, N, N)
    r = relevance.float()
    return r[:, :, None] * similarity * r[:, None, :]


def dpp_greedy_map(kernel: torch.Tensor, keep: int) -> torch.Tensor:
    """Fast greedy MAP inference for a DPP (Chen et al. 2018), each row on its own.

    Pick j = argmax d2 (d2_j = det L[S + j] / det L[S], the gain in log det); e = (L[j] - c[:, j] . c) / sqrt(d2_j)
    is the new row of the incremental Cholesky factor c; d2 -= e^2; j is never picked again.

    Args:
        kernel: (B, N, N) symmetric positive semi-definite.
        keep: picks, 1 <= keep <= N.

    Returns:
        (B, keep) int64 positions in the order picked.
    """
    b, n, _ = kernel.shape
    check_keep("CDPruner", keep, n)
    kernel = kernel.float()
    rows = torch.arange(b, device=kernel.device)
    factor = torch.zeros(b, keep, n, dtype=torch.float32, device=kernel.device)  # (B, T, N): c
    gain = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # (B, N): d2
    picked = torch.empty(b, keep, dtype=torch.long, device=kernel.device)
    for t in range(keep):
        j = gain.argmax(dim=-1)  # (B,); the first maximum: the lower position wins a tie
        picked[:, t] = j
        projection = (factor[rows, :t, j].unsqueeze(1) @ factor[:, :t]).squeeze(1)  # (B, N): c[:, j] . c
        pivot = gain[rows, j]  # (B,)
        usable = (pivot > 0).unsqueeze(-1)  # (B, 1); not positive only once L's rank is used up
        e = (kernel[rows, j] - projection) / pivot.clamp_min(torch.finfo(torch.float32).tiny).sqrt().unsqueeze(-1)
        e = torch.where(usable, e, torch.zeros_like(e))  # (B, N)
        factor[:, t] = e
        gain = gain - e.square()
        gain[rows, j] = -float("inf")
    return picked


def cdpruner_select(tokens: torch.Tensor, relevance: torch.Tensor, keep: int) -> torch.Tensor:
    """CDPruner's selection (spec section 7): greedy DPP MAP on diag(r) S diag(r), each row on its own.

    Args:
        tokens: (B, N, C) projected image tokens. relevance: (B, N) per row (:func:`cdpruner_relevance`).
        keep: T, 1 <= T <= N.

    Returns:
        (B, T) int64 positions, ascending (raster order).
    """
    if relevance.shape != tokens.shape[:2]:
        raise ValueError(f"CDPruner relevance must be (B, N) = {tuple(tokens.shape[:2])}, got {tuple(relevance.shape)}")
    return dpp_greedy_map(cdpruner_kernel(tokens, relevance), keep).sort(dim=-1).values
