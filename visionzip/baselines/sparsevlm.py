"""SparseVLM v1 (arXiv v1, the version the VisionZip paper compares with): text raters rank the image tokens.

Specification: ``shared/methods/baselines.md`` section 3.2 (reference ``Gumpest/SparseVLMs@91fb6d9``).
- Raters: the text tokens after the image whose affinity r = mean over image tokens of softmax over text of
  (image embeddings . text embeddings) is above the mean, from the first layer's input.
- At each sparse layer (0-based 2, 6, 15, 19): P = the raters' head-mean attention rows over an image's tokens;
  if rank(P) < the image's tokens, keep min(int(rank * scale + bias), tokens - 1) of them by P's mean over raters.
- Recycling: of the deleted tokens, the top 30% by score (int(0.3 n) + 1) are clustered (DPC-KNN, int(n / 10) + 1
  clusters, Euclidean assignment, cluster means, as the code does) and inserted after the image's kept tokens.
- Positions are renumbered after every cut (the reference's choice).
The kept count depends on the question (through the rank), so a target layer-average is reached by calibrating
``scale`` on sample prompts; the README's three examples are the presets.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from visionzip.baselines.base import BaselineConfig
from visionzip.baselines.fastv import POSITIONS

# Layer-average budget (LLaVA-1.5) -> (scale, bias): the reference README's examples (MME, POPE, TextVQA scripts).
PRESETS: dict[int, tuple[float, float]] = {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)}


@dataclass(frozen=True)
class SparseVLMConfig(BaselineConfig):
    """SparseVLM v1's options.

    Attributes:
        layers: 0-based layers after which the rows are cut (each scored by its own attention on its input).
        scale, bias: an image keeps int(rank * scale + bias) tokens (at most all but one).
        recycle: merge a share of the deleted tokens back (the reference: on).
        recycle_ratio: share of the deleted tokens that are recycled (int(ratio * n) + 1).
        cluster_ratio: clusters per recycled token (int(ratio * n) + 1).
        seed: seeds the density tie-break of the clustering (the reference's is unseeded).
        positions: "renumber" (SparseVLM's) or "original" (a recycled token at its cluster centre's position).
    """

    name: ClassVar[str] = "sparsevlm"
    scored_by: ClassVar[str] = "raters"
    layers: tuple[int, ...] = (2, 6, 15, 19)
    scale: float = PRESETS[64][0]
    bias: float = PRESETS[64][1]
    recycle: bool = True
    recycle_ratio: float = 0.3
    cluster_ratio: float = 0.1
    seed: int = 0
    positions: str = "renumber"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(b) for b in self.layers))
        if not self.layers or self.layers[0] < 0 or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"SparseVLM layers must be strictly increasing and >= 0, got {self.layers}")
        if self.scale <= 0:
            raise ValueError(f"SparseVLM scale must be > 0, got {self.scale}")
        for field in ("recycle_ratio", "cluster_ratio"):
            if not 0 < getattr(self, field) <= 1:
                raise ValueError(f"SparseVLM {field} must be in (0, 1], got {getattr(self, field)}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")

    @classmethod
    def from_budget(cls, budget: int, **options: Any) -> SparseVLMConfig:
        """The reference README's (scale, bias) for 192, 128 or 64 (calibrate for other models or data)."""
        if budget not in PRESETS:
            raise ValueError(f"SparseVLM presets are {sorted(PRESETS)}; for another budget calibrate scale")
        scale, bias = PRESETS[budget]
        return cls(scale=scale, bias=bias, **options)

    def check_layers(self, num_layers: int) -> None:
        if self.layers[-1] >= num_layers - 1:
            raise ValueError(f"SparseVLM's last layer {self.layers[-1]} must leave a layer of the model's {num_layers}")

    def keep_count(self, rank: int, tokens: int) -> int | None:
        """Tokens an image of ``tokens`` keeps given rank(P); None: no cut (P has full column rank)."""
        if tokens - rank == 0:
            return None
        return max(0, min(int(rank * self.scale + self.bias), tokens - 1))

    def describe(self) -> str:
        """``SparseVLM after layers 2/6/15/19, scale 0.8, bias 0``, for logs and summaries."""
        layers = "/".join(str(b) for b in self.layers)
        recycle = "" if self.recycle else ", no recycling"
        return f"SparseVLM after layers {layers}, scale {self.scale:g}, bias {self.bias:g}{recycle}"


def rater_mask(embeds: torch.Tensor, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """SparseVLM's raters of one row: text tokens with above-mean affinity to the image tokens.

    Args:
        embeds: (N, C) the first layer's input.
        image: (N,) bool image tokens; text: (N,) bool candidate text tokens (the real text after the image).

    Returns:
        (N,) bool. r = mean over image rows of softmax over text columns of the unscaled dot products; raters have
        r > mean(r) (the code's strict inequality).
    """
    rater = torch.zeros_like(text)
    if not bool(text.any()) or not bool(image.any()):
        return rater
    affinity = (embeds[image].float() @ embeds[text].float().T).softmax(dim=-1).mean(dim=0)  # (T,)
    rater[text.nonzero().squeeze(1)] = affinity > affinity.mean()
    return rater


def recycle_count(deleted: int, ratio: float) -> int:
    """Deleted tokens that are recycled: int(ratio * n) + 1, at most n."""
    return min(deleted, int(deleted * ratio) + 1)


def cluster_merge(x: torch.Tensor, clusters: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-KNN clustering of ``x`` into ``clusters`` means (the reference code's variant).

    Distances are Euclidean / sqrt(C); density rho = exp(-mean squared distance to the k = ``clusters`` nearest
    tokens, the token itself included) plus a 1e-6 uniform tie-break from ``generator``; delta = distance to the
    nearest denser token (the largest distance for the densest); centres = top rho * delta; every token joins its
    nearest centre; each cluster becomes its mean.

    Args:
        x: (n, C) tokens. clusters: at most n.

    Returns:
        ((clusters, C) means, (clusters,) index into x of each cluster's centre).
    """
    n, channels = x.shape
    clusters = min(clusters, n)
    # float64: the 1e-6 tie-break is below float32's resolution at a density near 1
    dist = torch.cdist(x.double(), x.double()) / math.sqrt(channels)  # (n, n)
    nearest = dist.topk(clusters, dim=-1, largest=False).values  # (n, k)
    noise = torch.rand(n, generator=generator, device=generator.device).to(x.device, torch.float64)
    density = (-(nearest**2).mean(dim=-1)).exp() + noise * 1e-6  # (n,)
    denser = density[None, :] > density[:, None]  # (n, n): column j denser than row i
    delta = dist.masked_fill(~denser, float("inf")).min(dim=-1).values
    delta = torch.where(torch.isinf(delta), dist.max(), delta)
    centres = (density * delta).topk(clusters).indices  # (k,)
    assign = dist[:, centres].argmin(dim=-1)  # (n,)
    assign[centres] = torch.arange(clusters, device=x.device)
    sums = torch.zeros(clusters, channels, dtype=torch.float32, device=x.device).index_add_(0, assign, x.float())
    counts = torch.bincount(assign, minlength=clusters).clamp(min=1).unsqueeze(1)
    return (sums / counts).to(x.dtype), centres


def calibrate_scale(
    measure: Callable[[SparseVLMConfig], float], target: float, cfg: SparseVLMConfig, low: float = 0.05,
    high: float = 64.0, steps: int = 12,
) -> tuple[SparseVLMConfig, float]:  # fmt: skip
    """The ``scale`` whose layer-average comes closest to ``target`` (bisection; the average grows with the scale).

    SparseVLM's kept count is int(rank * scale + bias), and the rank depends on the question, so a budget such as
    "64 tokens on average over the layers" is met only on data: ``measure(cfg)`` runs the model with ``cfg`` on a
    sample of prompts and returns their mean layer-average (either counting convention, used consistently).

    Returns:
        (``cfg`` with the best scale found, its measured average).
    """
    if not 0 < low < high:
        raise ValueError(f"calibrate_scale needs 0 < low < high, got {low}, {high}")
    best: tuple[float, SparseVLMConfig, float] | None = None
    for _ in range(steps):
        middle = (low * high) ** 0.5  # the scale spans orders of magnitude: bisect on a log scale
        candidate = dataclasses.replace(cfg, scale=middle)
        average = measure(candidate)
        if best is None or abs(average - target) < best[0]:
            best = (abs(average - target), candidate, average)
        low, high = (middle, high) if average < target else (low, middle)
    return best[1], best[2]
