"""Draw what VisionZip keeps: dominant patches outlined, contextual groups coloured, attention as a heat map."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from visionzip.config import VisionZipConfig
from visionzip.core import DOMINANT_GROUP, DROPPED_GROUP, Selection, select
from visionzip.encode import capture
from visionzip.encoders import get_adapter

if TYPE_CHECKING:  # matplotlib is imported where a figure is drawn, so that importing this module does not need it
    from matplotlib.figure import Figure

DOMINANT_GID = "dominant"  # gid of the outline of a dominant patch (top row)
CONTEXTUAL_GID = "contextual"  # gid of the fill of a patch merged into a contextual token (top row)
TARGET_GID = "target"  # gid of the marker on a contextual token's merge target
DOMINANT_EDGE = "#ffd400"
PANEL_INCHES = 3.2
CHAR_EM = 0.58  # a generous mean width of a character of matplotlib's default font (DejaVu Sans), in ems
FIT_MARGIN_INCHES = 0.3  # kept free beside a title


@dataclass
class ViewPicture:
    """What one view's panel shows, as arrays over the ``side x side`` patch grid (row-major, as the encoder).

    Attributes:
        dominant: (side, side) bool, patches kept as dominant tokens.
        groups: (side, side) int64: -1 dominant, t >= 0 the contextual token the patch is merged into, -2 dropped.
        heat: (side, side) float, the score of each patch ([CLS] attention, or attention received).
        prefix_kept: tokens before the patches ([CLS]) kept as dominant ones.
        prefix_groups: group of each token before the patches (same coding as ``groups``).
        colors: contextual token t -> its RGBA colour in the picture.
    """

    dominant: np.ndarray
    groups: np.ndarray
    heat: np.ndarray
    prefix_kept: int
    prefix_groups: np.ndarray
    colors: dict[int, tuple[float, float, float, float]]


@dataclass
class KeptPicture:
    """:func:`draw_selection`'s result: the figure, per view what it shows, and the selection it was drawn from."""

    figure: Figure
    views: list[ViewPicture]
    selection: Selection

    def save(self, path: str, dpi: int = 120) -> None:
        """Write the figure (format from the suffix)."""
        self.figure.savefig(path, dpi=dpi, bbox_inches="tight")


def group_colors(contextual: int) -> list[tuple[float, float, float, float]]:
    """One distinct RGBA colour per contextual token: tab10/tab20 up to 20 groups, evenly spaced hues beyond."""
    from matplotlib import colormaps

    if contextual <= 10:
        return [colormaps["tab10"](t) for t in range(contextual)]
    if contextual <= 20:
        return [colormaps["tab20"](t) for t in range(contextual)]
    return [colormaps["hsv"](t / contextual) for t in range(contextual)]


def grid_side(num_tokens: int, prefix: int) -> int:
    """Patches per side of a view of ``num_tokens`` encoder tokens, ``prefix`` of them before the patches."""
    side = math.isqrt(num_tokens - prefix)
    if side * side != num_tokens - prefix:
        raise ValueError(f"{num_tokens} tokens with {prefix} before the patches is not a square grid of patches")
    return side


def view_picture(selection: Selection, scores: torch.Tensor, view: int, prefix: int) -> ViewPicture:
    """The arrays of view ``view``'s panel from a :class:`Selection` and (V, N) ``scores``."""
    groups = selection.groups[view].cpu().numpy()  # (N,)
    side = grid_side(groups.shape[0], prefix)
    patch_groups = groups[prefix:].reshape(side, side)
    contextual = selection.targets.shape[1]
    return ViewPicture(
        dominant=patch_groups == DOMINANT_GROUP,
        groups=patch_groups,
        heat=scores[view, prefix:].float().cpu().numpy().reshape(side, side),
        prefix_kept=int((groups[:prefix] == DOMINANT_GROUP).sum()),
        prefix_groups=groups[:prefix],
        colors=dict(enumerate(group_colors(contextual))),
    )


def _draw_kept(ax, image: np.ndarray, pic: ViewPicture, targets: np.ndarray, prefix: int) -> None:
    """Top panel: the image, merged patches filled with their group's colour, dominant patches outlined."""
    from matplotlib.patches import Rectangle

    side = pic.groups.shape[0]
    ax.imshow(image, extent=(0, side, side, 0), interpolation="bilinear")
    for row, col in zip(*np.nonzero(pic.groups >= 0), strict=True):
        color = pic.colors[int(pic.groups[row, col])]
        ax.add_patch(Rectangle((col, row), 1, 1, facecolor=color, edgecolor="none", alpha=0.55, gid=CONTEXTUAL_GID))
    for row, col in zip(*np.nonzero(pic.groups == DROPPED_GROUP), strict=True):
        ax.add_patch(Rectangle((col, row), 1, 1, facecolor="black", edgecolor="none", alpha=0.6))
    for row, col in zip(*np.nonzero(pic.dominant), strict=True):
        ax.add_patch(Rectangle((col, row), 1, 1, fill=False, edgecolor=DOMINANT_EDGE, linewidth=1.2, gid=DOMINANT_GID))
    patches = targets[targets >= prefix] - prefix
    ax.scatter(patches % side + 0.5, patches // side + 0.5, s=10, c="white", edgecolors="black", linewidths=0.5,
               gid=TARGET_GID)  # fmt: skip
    ax.set_xlim(0, side)
    ax.set_ylim(side, 0)


def _draw_heat(ax, image: np.ndarray, pic: ViewPicture) -> None:
    """Bottom panel: the image under the per-patch score as a heat map."""
    side = pic.heat.shape[0]
    ax.imshow(image, extent=(0, side, side, 0), interpolation="bilinear")
    shown = ax.imshow(pic.heat, extent=(0, side, side, 0), cmap="inferno", alpha=0.6, interpolation="nearest")
    ax.figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)


def text_inches(text: str, fontsize: float) -> float:
    """Width in inches of the longest line of ``text`` at ``fontsize`` points (a generous estimate, :data:`CHAR_EM`)."""
    return max(len(line) for line in text.split("\n")) * CHAR_EM * fontsize / 72


def fit_text(text: str, inches: float, fontsize: float) -> str:
    """``text`` with its lines broken at spaces to fit ``inches`` at ``fontsize`` points: a title wider than its figure
    would be cut on both sides where the figure is drawn as is (the web demo renders its canvas, not a tight box)."""
    chars = max(16, int((inches - FIT_MARGIN_INCHES) * 72 / (CHAR_EM * fontsize)))
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def _view_title(pic: ViewPicture, cfg: VisionZipConfig, prefix: int, label: str) -> str:
    kept_patches = int(pic.dominant.sum())
    total = pic.groups.size + prefix
    cls = f" ([CLS] + {kept_patches})" if pic.prefix_kept else ""  # [CLS] counts among the dominant tokens
    return f"{label}\n{cfg.dominant} dominant{cls} + {cfg.contextual} contextual = {cfg.tokens} of {total} tokens"


def draw_selection(
    images: Sequence[np.ndarray], selection: Selection, scores: torch.Tensor, cfg: VisionZipConfig,
    prefix: int, labels: Sequence[str] | None = None, title: str | None = None,
) -> KeptPicture:  # fmt: skip
    """The picture of VisionZip's choice: one column per view, kept/merged patches on top, scores below.

    Args:
        images: V arrays (H, W, 3) in [0, 1], the pixels each view's patches cover (the processed view).
        selection: :func:`visionzip.core.select`'s result for the V views (B = V).
        scores: (V, N) the scores the selection was made from.
        cfg: the budget of each view (a total budget already split per view).
        prefix: encoder tokens before the patches in each view (CLIP's [CLS]: 1, SigLIP: 0).
        labels: a name per view (default ``view i``; one view: ``image``).
        title: the figure's title (default: the counts over all views).

    Returns:
        :class:`KeptPicture`; ``figure`` is a ``matplotlib.figure.Figure`` (no pyplot state).
    """
    views = len(images)
    if selection.groups.shape[0] != views or scores.shape[0] != views:
        raise ValueError(
            f"expected {views} views in selection and scores, got {selection.groups.shape[0]}, {scores.shape[0]}"
        )
    from matplotlib.figure import Figure

    labels = list(labels) if labels is not None else (["image"] if views == 1 else [f"view {i}" for i in range(views)])
    pictures = [view_picture(selection, scores, v, prefix) for v in range(views)]
    titles = [_view_title(pic, cfg, prefix, label) for pic, label in zip(pictures, labels, strict=True)]
    # each column as wide as its title: a wider title would be cut at the figure's edge or run into its neighbour's
    column = max(PANEL_INCHES, *(text_inches(t, 8) + FIT_MARGIN_INCHES for t in titles))
    figure = Figure(figsize=(column * views + 0.6, 2 * PANEL_INCHES + 0.8), layout="constrained")
    axes = figure.subplots(2, views, squeeze=False)
    for v, pic in enumerate(pictures):
        _draw_kept(axes[0, v], images[v], pic, selection.targets[v].cpu().numpy(), prefix)
        _draw_heat(axes[1, v], images[v], pic)
        axes[0, v].set_title(titles[v], fontsize=8)
        axes[1, v].set_title("[CLS] attention" if prefix else "attention received", fontsize=8)
        for ax in axes[:, v]:
            ax.set_xticks([])
            ax.set_yticks([])
    kept = cfg.tokens * views
    encoder_tokens = int(selection.groups.numel())
    title = title or (
        f"VisionZip keeps {kept} of {encoder_tokens} visual tokens\n"
        "outlined: dominant; a colour: the patches merged into one contextual token (dot: its target)"
    )
    figure.suptitle(fit_text(title, figure.get_figwidth(), 9), fontsize=9)
    return KeptPicture(figure, pictures, selection)


def denormalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> list[np.ndarray]:
    """(V, 3, H, W) normalised pixel values -> V arrays (H, W, 3) in [0, 1], what the encoder saw."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    images = (pixels.detach().float().cpu() * std_t + mean_t).clamp(0, 1)
    return list(images.permute(0, 2, 3, 1).numpy())


def show_vision_model(
    vision_model: nn.Module, pixels: torch.Tensor, cfg: VisionZipConfig, mean: Sequence[float], std: Sequence[float],
    labels: Sequence[str] | None = None,
) -> KeptPicture:  # fmt: skip
    """The picture for a transformers ``CLIPVisionModel``/``SiglipVisionModel`` and (V, 3, H, W) pixels, one budget.

    ``mean``/``std``: the image processor's normalisation (to show the pixels as the encoder saw them); ``labels``:
    one name per view. The encoder runs as :func:`visionzip.encode.encode` runs it (:func:`visionzip.encode.capture`),
    then :func:`visionzip.core.select` makes the choice :func:`visionzip.core.compress` makes (random selection: per
    view's pixels, as ``encode``).
    """
    with torch.no_grad():
        seen = capture(vision_model, pixels, cfg)
    selection = select(seen.scores, seen.keys, cfg, content=pixels)
    prefix = int(get_adapter(vision_model).has_cls)
    return draw_selection(denormalize(pixels, mean, std), selection, seen.scores, cfg, prefix, labels)
