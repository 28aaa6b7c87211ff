"""FastV (ECCV 2024): after layer K-1, keep the image tokens the last prompt token attends to most.

Specification: ``shared/methods/baselines.md`` section 2 (reference ``pkunlp-icler/FastV``). The score is the head-mean
attention row of the last token at layer K-1 (0-based), restricted to the image's tokens; the top k stay, every
text token stays; the kept tokens keep their original positions (the reference's choice). Pruned once, at prefill
(the KV-cache variant); the reference's re-ranking at every decode step is not done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from visionzip.baselines.base import BaselineConfig

POSITIONS = ("original", "renumber")


def fastv_keep_for_average(budget: float, layer: int, tokens: int, num_layers: int) -> int:
    """The tokens k to keep after layer ``layer``-1 so the layer-average (inputs) is ``budget``.

    T = (K N + (L - K) k) / L, so k = (L T - K N) / (L - K), rounded (LLaVA-1.5, K=2: 166 / 98 / 30 for 192 / 128 /
    64). Raises ValueError with the numbers when no k in [0, N] reaches T.
    """
    if not 0 < layer < num_layers:
        raise ValueError(f"FastV layer K={layer} must be in 1..{num_layers - 1} (decoder layers: {num_layers})")
    floor = layer * tokens / num_layers
    if budget < floor:
        raise ValueError(
            f"FastV at K={layer} cannot average {budget:g} visual tokens over {num_layers} layers on {tokens} tokens: "
            f"the first {layer} layers alone average {floor:g} (K*N/L); lower K or raise the budget"
        )
    if budget > tokens:
        raise ValueError(f"FastV budget {budget:g} is larger than the image's {tokens} tokens")
    return min(tokens, round((num_layers * budget - layer * tokens) / (num_layers - layer)))


@dataclass(frozen=True)
class FastVConfig(BaselineConfig):
    """FastV's options. Exactly one of ``budget`` (a layer-average, the VisionZip paper's convention), ``keep``
    (tokens kept per image after layer K-1) or ``ratio`` (FastV's R: the fraction of each image's tokens pruned).

    Attributes:
        layer: K; layers 0..K-1 see every token, layer K-1's attention ranks them.
        budget / keep / ratio: how many stay (see above); default a layer-average of 64.
        positions: "original" (FastV's) or "renumber" (kept tokens numbered consecutively).
    """

    name: ClassVar[str] = "fastv"
    scored_by: ClassVar[str] = "this"  # layer K-1 scores, on its own input
    layer: int = 2
    budget: float | None = None
    keep: int | None = None
    ratio: float | None = None
    positions: str = "original"

    def __post_init__(self) -> None:
        given = [v is not None for v in (self.budget, self.keep, self.ratio)]
        if sum(given) > 1:
            raise ValueError("FastV takes one of budget, keep or ratio, not several")
        if not any(given):
            object.__setattr__(self, "budget", 64)
        if self.layer < 1:
            raise ValueError(f"FastV layer K must be >= 1 (its attention ranks the tokens), got {self.layer}")
        if self.keep is not None and self.keep < 0:
            raise ValueError(f"FastV keep must be >= 0, got {self.keep}")
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise ValueError(f"FastV ratio R (the fraction pruned) must be in [0, 1), got {self.ratio}")
        if self.budget is not None and self.budget <= 0:
            raise ValueError(f"FastV budget must be > 0, got {self.budget}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")

    def check_layers(self, num_layers: int) -> None:
        """ValueError unless layer K leaves at least one layer to run on the kept tokens."""
        if self.layer >= num_layers:
            raise ValueError(f"FastV layer K={self.layer} must be below the model's {num_layers} decoder layers")

    def kept_after(self, tokens: int, num_layers: int) -> dict[int, int]:
        """{layer index after which to prune: tokens kept} for one image of ``tokens`` tokens."""
        self.check_layers(num_layers)
        if self.keep is not None:
            if self.keep > tokens:
                raise ValueError(f"FastV keep={self.keep} is larger than the image's {tokens} tokens")
            keep = self.keep
        elif self.ratio is not None:
            keep = round(tokens * (1 - self.ratio))
        else:
            keep = fastv_keep_for_average(self.budget, self.layer, tokens, num_layers)
        return {self.layer - 1: keep}

    def describe(self) -> str:
        """``FastV K=2, layer-average 64`` (or ``keep 30`` / ``R=0.5``), for logs and summaries."""
        if self.keep is not None:
            count = f"keep {self.keep}"
        elif self.ratio is not None:
            count = f"R={self.ratio:g}"
        else:
            count = f"layer-average {self.budget:g}"
        return f"FastV K={self.layer}, {count}{'' if self.positions == 'original' else ', renumbered positions'}"
