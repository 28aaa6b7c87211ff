"""Draw the patches a token selection keeps (DivPrune, VisPruner, CDPruner; VisionZip's dominant ones): one row per
method, one column per view, the dropped patches dimmed and the kept ones outlined. Pure: images + positions -> figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from visionzip.show import PANEL_INCHES, fit_text

if TYPE_CHECKING:  # matplotlib is imported where a figure is drawn
    from matplotlib.figure import Figure

KEPT_GID = "kept"  # gid of the outline of a kept patch
KEPT_EDGE = "#ffd400"
DROPPED_SHADE = (0.0, 0.0, 0.0, 0.65)  # RGBA laid over a dropped patch


@dataclass
class KeptPatches:
    """One row of the picture: a method's kept patches per view.

    Attributes:
        label: the row's name (``DivPrune, 64 tokens (greedy max-min diversity)``...).
        mask: (V, side, side) bool, True where a view keeps the patch (:func:`kept_mask` from positions).
        note: a line under the label (what the drawing leaves out, e.g. VisionZip's merged tokens); may be empty.
    """

    label: str
    mask: np.ndarray
    note: str = ""


@dataclass
class KeptPatchesPicture:
    """The figure and its rows (one per method)."""

    figure: Figure
    rows: list[KeptPatches]

    def save(self, path: str, dpi: int = 120) -> None:
        """Write the figure (format from the suffix)."""
        self.figure.savefig(path, dpi=dpi, bbox_inches="tight")


def kept_mask(keep: torch.Tensor, side: int) -> np.ndarray:
    """(V, T) kept patch positions -> (V, side, side) bool, True where a patch is kept; ValueError out of range."""
    if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= side * side):
        raise ValueError(f"kept positions must be in [0, {side * side}), got [{int(keep.min())}, {int(keep.max())}]")
    mask = torch.zeros(keep.shape[0], side * side, dtype=torch.bool)
    mask.scatter_(1, keep.long().cpu(), True)
    return mask.view(-1, side, side).numpy()


def _draw_panel(ax, image: np.ndarray, mask: np.ndarray) -> None:
    """The view with its dropped patches dimmed and each kept patch outlined."""
    from matplotlib.patches import Rectangle

    height, width = image.shape[:2]
    side = mask.shape[0]
    shade = np.zeros((side, side, 4))
    shade[~mask] = DROPPED_SHADE
    ax.imshow(image)
    ax.imshow(shade, extent=(0, width, height, 0), interpolation="nearest")
    cell_w, cell_h = width / side, height / side
    for row, col in zip(*np.nonzero(mask), strict=True):
        edge = Rectangle((col * cell_w, row * cell_h), cell_w, cell_h, fill=False, edgecolor=KEPT_EDGE, linewidth=0.8)
        edge.set_gid(KEPT_GID)
        ax.add_patch(edge)
    ax.set_xticks([])
    ax.set_yticks([])


def draw_kept_patches(
    images: Sequence[np.ndarray], rows: Sequence[KeptPatches], labels: Sequence[str] | None = None,
    title: str | None = None,
) -> KeptPatchesPicture:  # fmt: skip
    """The picture of what each of ``rows`` keeps on the same views, methods one under another.

    Args:
        images: V arrays (H, W, 3) in [0, 1], the processed views the patches cover.
        rows: one per method, each with a (V, side, side) mask.
        labels: a name per view (default ``view i``; one view: ``image``).
        title: the figure's title (default: the patches per view).
    """
    views = len(images)
    if not rows:
        raise ValueError("draw_kept_patches needs at least one method's kept patches")
    side = rows[0].mask.shape[-1]
    wrong = [row.label for row in rows if row.mask.shape != (views, side, side)]
    if wrong:
        raise ValueError(f"expected a ({views}, {side}, {side}) mask in every row; not so for {wrong}")
    from matplotlib.figure import Figure

    labels = list(labels) if labels is not None else (["image"] if views == 1 else [f"view {i}" for i in range(views)])
    figure = Figure(figsize=(PANEL_INCHES * views + 0.6, PANEL_INCHES * len(rows) + 0.8), layout="constrained")
    axes = figure.subplots(len(rows), views, squeeze=False)
    for r, row in enumerate(rows):
        for v in range(views):
            _draw_panel(axes[r, v], images[v], row.mask[v])
            kept = f"{labels[v]}: {int(row.mask[v].sum())} of {side * side} patches kept"
            text = f"{row.label}\n{kept}" if v == 0 else kept
            axes[r, v].set_title(fit_text(text + (f"\n{row.note}" if v == 0 and row.note else ""), PANEL_INCHES, 8),
                                 fontsize=8)  # fmt: skip
    title = title or f"Patches kept per view (outlined; dimmed: dropped), {side}x{side} patches a view"
    figure.suptitle(fit_text(title, figure.get_figwidth(), 9), fontsize=9)
    return KeptPatchesPicture(figure, list(rows))
