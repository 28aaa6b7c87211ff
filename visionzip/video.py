"""VisionZip on a video's frames: a budget per frame (the paper's Video-LLaVA setting) or a total split over frames."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from visionzip.config import VisionZipConfig
from visionzip.core import compress

VideoSplit = Literal["per_frame", "uniform", "proportional"]
VIDEO_SPLITS: tuple[str, ...] = ("per_frame", "uniform", "proportional")
# The paper's Video-LLaVA row keeps 136 = 8 x 17 tokens and does not state the split of the 17. Ours: the image
# ratio of 54:10 (5.4 : 1) on 17, i.e. round(17 * 10 / 64) = 3 contextual and 14 dominant ([CLS] + 13 patches).
PAPER_FRAME_SPLIT: tuple[int, int] = (14, 3)


def _paper_frame() -> VisionZipConfig:
    return VisionZipConfig(dominant=PAPER_FRAME_SPLIT[0], contextual=PAPER_FRAME_SPLIT[1])


@dataclass(frozen=True)
class VideoBudget:
    """How many VisionZip tokens each frame of a video keeps.

    Attributes:
        frame: the method on every frame (layer, merge, selection, cls_token...); with ``split="per_frame"`` its
            ``dominant`` and ``contextual`` are every frame's counts (default 14 + 3 = 17, see ``PAPER_FRAME_SPLIT``),
            otherwise they give the dominant : contextual ratio of ``total``.
        split: ``"per_frame"`` (the paper): each frame keeps ``frame.dominant + frame.contextual`` tokens, F x that
            per video. ``"uniform"``: ``total`` tokens per video, dealt out as evenly as integers allow (the first
            frames get the remainders). ``"proportional"`` (an extension for long videos): ``total`` tokens per video
            dealt out in proportion to each frame's score mass (:func:`frame_mass`), see :meth:`frame_counts`.
        total: tokens per video (dominant + contextual over all frames) for ``"uniform"`` and ``"proportional"``;
            None with ``"per_frame"``. It is split into ``total_contextual = round(total * frame.contextual /
            frame.tokens)`` contextual and the rest dominant, so 136 with the default frame is 112 + 24 = 8 x (14 + 3).

    In every mode the count per video depends only on the number of frames (never on the pixels), so a processor
    can expand ``<video>`` into it before the model runs.
    """

    frame: VisionZipConfig = field(default_factory=_paper_frame)
    split: VideoSplit = "per_frame"
    total: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.frame, VisionZipConfig):
            raise ValueError(f"VideoBudget.frame must be a VisionZipConfig, got {type(self.frame).__name__}")
        if self.split not in VIDEO_SPLITS:
            raise ValueError(f"VideoBudget.split must be one of {VIDEO_SPLITS}, got {self.split!r}")
        if self.split == "per_frame" and self.total is not None:
            raise ValueError(f"VideoBudget split='per_frame' takes no total (got {self.total}): a per-video split does")
        bad_total = isinstance(self.total, bool) or not isinstance(self.total, int) or self.total < 1
        if self.split != "per_frame" and bad_total:
            raise ValueError(f"VideoBudget split={self.split!r} needs an int total >= 1, got {self.total!r}")

    def totals(self, frames: int) -> tuple[int, int]:
        """(dominant, contextual) tokens of a video of ``frames`` frames, summed over its frames."""
        if frames < 1:
            raise ValueError(f"a video needs at least one frame, got {frames}")
        if self.split == "per_frame":
            return frames * self.frame.dominant, frames * self.frame.contextual
        assert self.total is not None
        contextual = round(self.total * self.frame.contextual / self.frame.tokens)
        dominant = self.total - contextual
        if dominant < frames:
            raise ValueError(
                f"VideoBudget total={self.total} leaves {dominant} dominant tokens for {frames} frames: every frame "
                f"keeps at least one ([CLS]); expected total >= {frames} x {self.frame.tokens} / {self.frame.dominant}"
            )
        return dominant, contextual

    def tokens(self, frames: int) -> int:
        """Tokens of a video of ``frames`` frames after compression (what ``<video>`` expands to)."""
        dominant, contextual = self.totals(frames)
        return dominant + contextual

    def frame_counts(self, frames: int, num_tokens: int, mass: Sequence[float] | None = None) -> list[tuple[int, int]]:
        """(dominant, contextual) of each frame; they sum to :meth:`totals`.

        ``"proportional"``: every frame keeps one dominant token ([CLS], or its best patch without one); the other
        ``D - F`` dominant tokens and the ``C`` contextual ones are apportioned over the frames in proportion to
        ``mass`` by the largest-remainder method (ties to the earlier frame), a frame never getting more than its
        ``num_tokens`` encoder tokens (the excess goes to the others, again in proportion). Zero total mass splits
        evenly.

        Args:
            frames: F.
            num_tokens: N, encoder tokens per frame.
            mass: (F,) non-negative score mass per frame (:func:`frame_mass`); only read by ``"proportional"``.
        """
        dominant, contextual = self.totals(frames)
        if dominant + contextual > frames * num_tokens:
            raise ValueError(f"VideoBudget keeps {dominant + contextual} tokens of a video of {frames} x {num_tokens}")
        if self.split == "per_frame":
            self.frame.check_fits(num_tokens)
            return [(self.frame.dominant, self.frame.contextual)] * frames
        if self.split == "uniform":
            kept = list(zip(split_evenly(dominant, frames), split_evenly(contextual, frames), strict=True))
        else:
            if mass is None or len(mass) != frames:
                raise ValueError(f"split='proportional' needs one mass per frame ({frames}), got {mass!r}")
            extra = apportion(dominant - frames, mass, [num_tokens - 1] * frames)
            doms = [1 + e for e in extra]
            kept = list(zip(doms, apportion(contextual, mass, [num_tokens - d for d in doms]), strict=True))
        for d, c in kept:
            if d + c > num_tokens:
                raise ValueError(f"VideoBudget gives a frame {d}+{c} tokens of its {num_tokens}: lower the total")
        return kept

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (``frame`` as :meth:`VisionZipConfig.to_dict`), for ``model.config``."""
        return {"frame": self.frame.to_dict(), "split": self.split, "total": self.total}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VideoBudget:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown VideoBudget keys {unknown}; expected a subset of {sorted(known)}")
        data = dict(data)
        if isinstance(data.get("frame"), dict):
            data["frame"] = VisionZipConfig.from_dict(data["frame"])
        return cls(**data)


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` integers differing by at most one, the larger ones first: (10, 4) -> [3, 3, 2, 2]."""
    base, extra = divmod(total, parts)
    return [base + int(i < extra) for i in range(parts)]


def apportion(total: int, weights: Sequence[float], caps: Sequence[int]) -> list[int]:
    """``total`` as integers proportional to ``weights`` (largest remainder), each at most its cap; sum ``total``.

    A part that reaches its cap keeps it and the rest is apportioned again over the others. Equal remainders go to
    the earlier part; all-zero weights count as equal.
    """
    if any(w < 0 for w in weights) or len(weights) != len(caps):
        raise ValueError(f"apportion needs non-negative weights, one per cap; got {list(weights)}, {list(caps)}")
    if total > sum(caps):
        raise ValueError(f"cannot apportion {total} over parts capped at {list(caps)}")
    counts = [0] * len(weights)
    remaining = total
    while remaining > 0:
        open_parts = [i for i in range(len(counts)) if counts[i] < caps[i]]
        mass = sum(weights[i] for i in open_parts)
        shares = {i: remaining * (weights[i] / mass if mass > 0 else 1 / len(open_parts)) for i in open_parts}
        grant = {i: int(shares[i]) for i in open_parts}
        by_remainder = sorted(open_parts, key=lambda i: (-(shares[i] - grant[i]), i))
        for i in by_remainder[: remaining - sum(grant.values())]:
            grant[i] += 1
        for i in open_parts:
            added = min(grant[i], caps[i] - counts[i])
            counts[i] += added
            remaining -= added
    return counts


def frame_mass(scores: torch.Tensor, cls_token: bool) -> torch.Tensor:
    """Score mass of each frame, what ``split="proportional"`` apportions by.

    With [CLS]: the attention the frame's [CLS] row gives its patches, summed over heads and patches (= heads minus
    [CLS]'s attention to itself): a frame whose [CLS] looks at its content more than at itself gets more tokens.
    Without [CLS]: the sum of the frame's scores (received attention, which sums to 1: an even split).

    Args:
        scores: (F, N) VisionZip scores of each frame (:func:`visionzip.encode.capture`).

    Returns:
        (F,) float32.
    """
    scores = scores.float()
    return (scores[:, 1:] if cls_token else scores).sum(dim=1)


def compress_video(
    hidden_states: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, budget: VideoBudget, frames: int,
    content: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """VisionZip on every frame of B videos with ``budget`` (paper Sec. 3 per frame).

    Args:
        hidden_states: (B * F, N, C) encoder features of the frames, video by video.
        scores: (B * F, N) their VisionZip scores; keys: (B * F, N, Dh) their head-mean keys.
        budget: the counts per frame or per video.
        frames: F, frames per video.
        content: (B * F, ...) what each frame's ``selection="random"`` draw depends on (see
            :func:`visionzip.core.compress`).

    Returns:
        (B, T, C), T = ``budget.tokens(F)``: each frame's dominant tokens (ascending) then its contextual ones, frame
        after frame.
    """
    total, n, c = hidden_states.shape
    if total % frames:
        raise ValueError(f"{total} frames are not videos of {frames} frames")
    videos = total // frames
    if budget.split == "per_frame":
        budget.frame_counts(frames, n)  # checks that the budget fits
        tokens, _ = compress(hidden_states, scores, keys, budget.frame, content)  # (B*F, K, C)
        return tokens.reshape(videos, -1, c)
    mass = frame_mass(scores, budget.frame.cls_token).view(videos, frames)  # (B, F)
    out = []
    for v in range(videos):
        counts = budget.frame_counts(frames, n, mass[v].tolist())
        parts = []
        for f, (d, k) in enumerate(counts):
            i = slice(v * frames + f, v * frames + f + 1)
            cfg = dataclasses.replace(budget.frame, dominant=d, contextual=k)
            kept, _ = compress(hidden_states[i], scores[i], keys[i], cfg, None if content is None else content[i])
            parts.append(kept[0])  # (d + k, C)
        out.append(torch.cat(parts))
    return torch.stack(out)  # (B, T, C)
