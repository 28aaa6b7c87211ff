"""PyramidDrop (CVPR 2025): drop image tokens in stages, ranked by the last instruction token with the next layer.

Specification: ``shared/methods/baselines.md`` section 4 (reference ``Cooperx521/PyramidDrop``). After (1-indexed)
layer b of ``layers`` (0-based: after layer b-1), stage s keeps int(N * ratio**s) of an image's N tokens, ranked by
the head-mean attention of the last prompt token computed with layer b's (0-based: the next layer's) norm and
query/key projections at the current positions; the kept tokens are renumbered consecutively (the reference's
choice). Presets for the paper's budgets follow the author's recipe (layers 2, 8, 16 and one ratio lambda).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from visionzip.baselines.base import BaselineConfig
from visionzip.baselines.fastv import POSITIONS

# Layer-average budget (LLaVA-1.5: 576 tokens, 32 layers) -> (stage boundaries, lambda); derived in the spec (4.2).
PRESETS: dict[int, tuple[tuple[int, ...], float]] = {
    192: ((2, 8, 16), 0.56),
    128: ((2, 8, 16), 0.421),
    64: ((2, 8, 16), 0.19),
}
RELEASED = ((8, 16, 24), 0.5)  # the reference's default (an average of 270 on LLaVA-1.5)


@dataclass(frozen=True)
class PDropConfig(BaselineConfig):
    """PyramidDrop's options.

    Attributes:
        layers: 1-indexed stage boundaries, strictly increasing (prune after these layers).
        ratio: lambda, the fraction each stage keeps of the previous one.
        positions: "renumber" (PyramidDrop's) or "original".
    """

    name: ClassVar[str] = "pdrop"
    scored_by: ClassVar[str] = "next"  # the next layer's norm and q/k score, on this layer's output
    layers: tuple[int, ...] = PRESETS[64][0]
    ratio: float = PRESETS[64][1]
    positions: str = "renumber"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(b) for b in self.layers))
        if not self.layers or any(b < 1 for b in self.layers) or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"PDrop layers must be strictly increasing and >= 1, got {self.layers}")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"PDrop ratio (lambda) must be in (0, 1], got {self.ratio}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")

    @classmethod
    def from_budget(cls, budget: int | str, **options: Any) -> PDropConfig:
        """The preset for a layer-average of 192, 128 or 64 tokens (LLaVA-1.5), or "released" (8/16/24, 0.5)."""
        if budget == "released":
            layers, ratio = RELEASED
        elif budget in PRESETS:
            layers, ratio = PRESETS[budget]
        else:
            raise ValueError(f"PDrop presets are {sorted(PRESETS)} and 'released', got {budget!r}")
        return cls(layers=layers, ratio=ratio, **options)

    def kept_after(self, tokens: int, num_layers: int) -> dict[int, int]:
        """{0-based layer after which to prune: tokens kept} for one image of ``tokens`` tokens."""
        if self.layers[-1] >= num_layers:
            raise ValueError(f"PDrop's last boundary {self.layers[-1]} must be below the model's {num_layers} layers")
        return {b - 1: int(tokens * self.ratio ** (s + 1)) for s, b in enumerate(self.layers)}

    def describe(self) -> str:
        """``PDrop after layers 2/8/16, lambda 0.19``, for logs and summaries."""
        layers = "/".join(str(b) for b in self.layers)
        positions = "" if self.positions == "renumber" else ", original positions"
        return f"PDrop after layers {layers}, lambda {self.ratio:g}{positions}"
