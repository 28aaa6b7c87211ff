"""The miniature's retention plot (``eval.tables.render.plot``, written as mini.png): the legend lies outside the axes,
so it covers no point, and the long title is wrapped inside the figure instead of cut off at its sides."""

from __future__ import annotations

from pathlib import Path

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from eval.mini.config import Paths, ReproConfig, spec_rows
from eval.mini.evaluate import write_spec
from eval.tables.render import TableRow, plot
from eval.tables.spec import load_spec


def test_legend_and_title_fit_beside_the_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ReproConfig()
    spec = load_spec(write_spec(cfg, Paths(tmp_path)))
    rows = [
        TableRow(r["method"], r["tokens"], avg_ours=90.0 + i % 9) for i, r in enumerate(spec_rows(cfg, Paths(tmp_path)))
    ]
    drawn: list[Figure] = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (drawn.append(self), save(self, *a, **k))[1])
    assert plot(spec, rows, tmp_path / "mini.png").stat().st_size > 0
    figure = drawn[0]
    FigureCanvasAgg(figure).draw()  # lay the figure out again on a canvas that can measure it
    renderer = figure.canvas.get_renderer()
    (axes,), (legend,) = figure.axes, figure.legends
    assert len(legend.get_texts()) == len({r.method for r in rows})  # every method (and the baseline line) named
    assert not legend.get_window_extent(renderer).overlaps(axes.get_window_extent(renderer))
    box, title = figure.bbox, axes.title.get_window_extent(renderer)
    assert box.x0 <= title.x0 and title.x1 <= box.x1  # the whole title is on the figure
    assert box.x0 <= legend.get_window_extent(renderer).x0 and legend.get_window_extent(renderer).x1 <= box.x1
