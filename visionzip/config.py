"""VisionZip's budgets (VisionZipConfig, and Qwen's per-segment QwenVisionZipConfig) as validated, serialisable data."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

MergeMode = Literal["paper", "mean"]
MERGE_MODES: tuple[str, ...] = ("paper", "mean")
SelectionMode = Literal["attention", "random"]
SELECTION_MODES: tuple[str, ...] = ("attention", "random")
PositionsMode = Literal["packed", "original"]
POSITIONS_MODES: tuple[str, ...] = ("packed", "original")
MAX_SEED = 2**32  # a seed and a content hash below 2**31 fit one torch.Generator seed (< 2**64)


@dataclass(frozen=True)
class VisionZipConfig:
    """Budget and options of VisionZip (paper, Sec. 3).

    Attributes:
        dominant: tokens kept by attention score. With ``cls_token=True`` this count includes the [CLS]
            token, which is always kept (as the paper's released code does): ``dominant=54`` keeps [CLS]
            and 53 patches.
        contextual: tokens made by merging the remaining ones by key similarity (0 turns merging off).
        layer: encoder layer whose attention, keys and output hidden states are used; negative values
            count from the end as in LLaVA's ``mm_vision_select_layer`` (-2 = penultimate).
        cls_token: True for encoders with a [CLS] token at position 0 (CLIP): score = [CLS]-row
            attention summed over heads. False (SigLIP): score = attention received, averaged over heads
            and queries (paper, appendix).
        merge: ``"paper"``: contextual token = target + mean(assigned), as the released code does;
            ``"mean"``: the true average of the target and its assigned tokens (ablation).
        query_chunk: queries processed at once when scoring without [CLS] (memory O(chunk x N)).
        score_layer: layer whose attention and keys pick and merge the tokens, when it should differ from ``layer``
            (whose hidden states are kept, since the projector was trained on them); None: ``layer`` (the paper).
        selection: ``"attention"`` (the method) or ``"random"``: the same number of dominant tokens drawn
            uniformly at random, a baseline that shows what attention buys. Each image's draw depends only on
            ``seed`` and that image's own content (in :func:`visionzip.encode.encode`: the exact values of its
            pixel tensor; see :func:`visionzip.core.content_seeds`), never on its batch size, position or batch
            mates, so a run repeats exactly.
        seed: seed of the ``"random"`` selection, 0 <= seed < 2**32 (unused by ``"attention"``).
        positions: the language model's position ids of the kept tokens. ``"packed"`` (the released code): the kept
            tokens are numbered consecutively, as if the image had only them. ``"original"``: each kept token takes
            the position it would have with every token (a dominant token its own, a contextual token its merge
            target's, [CLS] the slot before the first patch) and the text after the image keeps the positions it
            has without compression, as pruning inside the LLM (FastV, PDrop) leaves them. Read by the model that
            places the tokens (see :func:`visionzip.core.token_positions`); :func:`visionzip.core.compress` is the
            same for both.
    """

    dominant: int = 54
    contextual: int = 10
    layer: int = -2
    cls_token: bool = True
    merge: MergeMode = "paper"
    query_chunk: int = 256
    selection: SelectionMode = "attention"
    score_layer: int | None = None
    seed: int = 0
    positions: PositionsMode = "packed"

    def __post_init__(self) -> None:
        for name in ("dominant", "contextual", "layer", "query_chunk", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"VisionZipConfig.{name} must be an int, got {value!r}")
        if self.dominant < 1:
            raise ValueError(f"VisionZipConfig.dominant must be >= 1, got {self.dominant}")
        if self.contextual < 0:
            raise ValueError(f"VisionZipConfig.contextual must be >= 0, got {self.contextual}")
        if self.merge not in MERGE_MODES:
            raise ValueError(f"VisionZipConfig.merge must be one of {MERGE_MODES}, got {self.merge!r}")
        score_layer = self.score_layer
        if score_layer is not None and (isinstance(score_layer, bool) or not isinstance(score_layer, int)):
            raise ValueError(f"VisionZipConfig.score_layer must be an int or None, got {self.score_layer!r}")
        if self.selection not in SELECTION_MODES:
            raise ValueError(f"VisionZipConfig.selection must be one of {SELECTION_MODES}, got {self.selection!r}")
        if self.query_chunk < 1:
            raise ValueError(f"VisionZipConfig.query_chunk must be >= 1, got {self.query_chunk}")
        if not 0 <= self.seed < MAX_SEED:
            raise ValueError(f"VisionZipConfig.seed must be in [0, {MAX_SEED}), got {self.seed}")
        if self.positions not in POSITIONS_MODES:
            raise ValueError(f"VisionZipConfig.positions must be one of {POSITIONS_MODES}, got {self.positions!r}")
        if not isinstance(self.cls_token, bool):
            raise ValueError(f"VisionZipConfig.cls_token must be a bool, got {self.cls_token!r}")

    @property
    def tokens(self) -> int:
        """Tokens per image (or per crop) after compression."""
        return self.dominant + self.contextual

    def check_fits(self, num_tokens: int) -> None:
        """Raise ValueError if this budget cannot be taken from ``num_tokens`` encoder tokens."""
        if self.dominant > num_tokens:
            raise ValueError(
                f"VisionZip dominant={self.dominant} is larger than the {num_tokens} tokens the encoder gives"
            )
        remaining = num_tokens - self.dominant
        if self.contextual > remaining:
            raise ValueError(
                f"VisionZip contextual={self.contextual} is larger than the {remaining} tokens left after "
                f"dominant={self.dominant} of {num_tokens}"
            )

    def resolve_layer(self, num_layers: int) -> int:
        """Return the 0-based index of ``layer`` in an encoder of ``num_layers`` layers."""
        return _resolve("layer", self.layer, num_layers)

    def resolve_score_layer(self, num_layers: int) -> int:
        """Return the 0-based index of the layer that scores the tokens (``score_layer``, else ``layer``)."""
        if self.score_layer is None:
            return self.resolve_layer(num_layers)
        return _resolve("score_layer", self.score_layer, num_layers)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, JSON-serialisable, for ``model.config``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionZipConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a typo must not pass silently)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown VisionZipConfig keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_budget(cls, budget: int, **kwargs: Any) -> VisionZipConfig:
        """The paper's split of a total budget: 192 = 162+30, 128 = 108+20, 64 = 54+10 (about 5.4 : 1).

        Budgets outside the paper's table keep the same proportion, contextual rounded.
        """
        if budget < 1:
            raise ValueError(f"VisionZip budget must be >= 1, got {budget}")
        contextual = PAPER_SPLITS.get(budget, (0, round(budget * 10 / 64)))[1]
        contextual = min(contextual, budget - 1)
        return cls(dominant=budget - contextual, contextual=contextual, **kwargs)


@dataclass(frozen=True)
class QwenVisionZipConfig:
    """VisionZip budget for Qwen2-VL / Qwen2.5-VL, per segment: an image, or one temporal patch of a video.

    ``dominant`` and ``contextual`` are both fractions (floats) of the segment's M merged tokens (M = h * w / 4 after
    the PatchMerger) or both counts (ints). Fractions give ``dominant = max(1, round(M * dominant))`` and
    ``contextual = min(round(M * contextual), M - dominant)`` (halves round up); counts must fit every segment.
    The paper's budgets: 70% = ``QwenVisionZipConfig(0.65, 0.05)``, 50% = ``(0.45, 0.05)``
    (:meth:`from_retention`). ``merge``, ``selection``, ``seed`` and ``query_chunk`` are those of
    :class:`visionzip.config.VisionZipConfig`.
    """

    dominant: float | int = 0.65
    contextual: float | int = 0.05
    merge: MergeMode = "paper"
    selection: SelectionMode = "attention"
    seed: int = 0
    query_chunk: int = 256

    def __post_init__(self) -> None:
        kinds = {type(self.dominant), type(self.contextual)}
        if bool in kinds or not kinds <= {int, float} or len(kinds) != 1:
            raise ValueError(
                f"QwenVisionZipConfig dominant/contextual must be two floats (fractions) or two ints (counts), got "
                f"{self.dominant!r} and {self.contextual!r}"
            )
        if self.is_ratio and not (0 < self.dominant <= 1 and 0 <= self.contextual <= 1 - self.dominant + 1e-9):
            raise ValueError(f"fractions need 0 < dominant <= 1 and dominant + contextual <= 1, got {self}")
        if not self.is_ratio and (self.dominant < 1 or self.contextual < 0):
            raise ValueError(f"counts need dominant >= 1 and contextual >= 0, got {self}")
        if self.merge not in MERGE_MODES or self.selection not in SELECTION_MODES:
            raise ValueError(f"merge must be one of {MERGE_MODES} and selection one of {SELECTION_MODES}, got {self}")
        if isinstance(self.query_chunk, bool) or not isinstance(self.query_chunk, int) or self.query_chunk < 1:
            raise ValueError(f"query_chunk must be an int >= 1, got {self.query_chunk!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < MAX_SEED:
            raise ValueError(f"seed must be an int in [0, {MAX_SEED}), got {self.seed!r}")

    @property
    def is_ratio(self) -> bool:
        """True when the budget is a fraction of each segment's tokens."""
        return isinstance(self.dominant, float)

    @classmethod
    def from_retention(cls, retention: float, contextual: float = 0.05, **kwargs: Any) -> QwenVisionZipConfig:
        """The released split of a retention: 0.70 -> 0.65 + 0.05, 0.50 -> 0.45 + 0.05 (1.0: every token)."""
        contextual = 0.0 if retention == 1.0 else contextual
        return cls(round(retention - contextual, 6), float(contextual), **kwargs)

    def counts(self, num_merged: int) -> tuple[int, int]:
        """(dominant, contextual) tokens kept from a segment of ``num_merged`` merged tokens."""
        if not self.is_ratio:
            VisionZipConfig(self.dominant, self.contextual).check_fits(num_merged)
            return self.dominant, self.contextual
        dominant = max(1, math.floor(num_merged * self.dominant + 0.5))
        return dominant, min(math.floor(num_merged * self.contextual + 0.5), num_merged - dominant)

    def segment_config(self, num_merged: int) -> VisionZipConfig:
        """The :class:`VisionZipConfig` :func:`visionzip.core.compress` applies to one segment."""
        dominant, contextual = self.counts(num_merged)
        return VisionZipConfig(
            dominant=dominant, contextual=contextual, layer=-1, cls_token=False, merge=self.merge,
            query_chunk=self.query_chunk, selection=self.selection, seed=self.seed, positions="original",
        )  # fmt: skip

    def item_tokens(self, grid_thw: Any, merge_size: int) -> int:
        """LLM tokens of one image or video of ``grid_thw`` (t, h, w) patches: t segments of h * w / merge**2."""
        t, h, w = (int(v) for v in grid_thw)
        return t * sum(self.counts(h * w // merge_size**2))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, JSON-serialisable, for ``model.config.visionzip`` and ``processor_config.json``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QwenVisionZipConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown QwenVisionZipConfig keys {unknown}")
        return cls(**data)


def requested_stage(
    saved: VisionZipConfig | None, layer: int, counts: tuple[int, int] | None, options: dict[str, Any]
) -> VisionZipConfig | None:
    """The stage a user asks for on a checkpoint that saves ``saved`` (None: it saves none); None: nothing asked.

    ``counts`` (dominant, contextual) replace the saved counts and keep the saved stage's other options (the layout
    a VisionZip-FT checkpoint was trained in stays), or start a stage at ``layer`` on a checkpoint without one;
    ``options`` (merge, positions, ...) then change it. Options alone change the saved stage; with nothing saved
    they are a ValueError (they would change a budget nobody gave). One rule for the command line and lmms-eval.
    """
    if counts is None:
        if not options:
            return None
        if saved is None:
            raise ValueError(f"{sorted(options)} change a VisionZip budget, but none is given and none is saved")
        return replace(saved, **options)
    dominant, contextual = counts
    if saved is None:
        return VisionZipConfig(dominant, contextual, **{"layer": layer, **options})
    return replace(saved, dominant=dominant, contextual=contextual, **options)


def _resolve(name: str, layer: int, num_layers: int) -> int:
    index = layer + num_layers if layer < 0 else layer
    if not 0 <= index < num_layers:
        raise ValueError(f"VisionZip {name}={layer} is out of range for an encoder of {num_layers} layers")
    return index


# The paper's (dominant, contextual) per image; LLaVA-NeXT applies 108+20 / 54+10 / 27+5 per crop.
PAPER_SPLITS: dict[int, tuple[int, int]] = {
    192: (162, 30),
    128: (108, 20),
    64: (54, 10),
    32: (27, 5),
}
