"""Read lmms-eval's results files (``<output_path>/<model>/<date>_results.json``) for a table's rows."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from eval.tables.spec import TableSpec

logger = logging.getLogger(__name__)

RESULTS_GLOB = "*_results.json"
TaskResults = dict[str, dict[str, float]]  # {task: {metric: value}}


def read_results_file(path: str | Path) -> TaskResults:
    """``{task: {metric: value}}`` from one results file; metric keys lose lmms-eval's ``,none`` filter suffix.

    Standard errors, aliases and non-numeric entries (``"N/A"``) are left out.
    """
    data = json.loads(Path(path).read_text())
    if "results" not in data:
        raise ValueError(f"{path} is not an lmms-eval results file (no 'results' key)")
    out: TaskResults = {}
    for task, metrics in data["results"].items():
        kept = {}
        for key, value in metrics.items():
            name = key.split(",", 1)[0]
            if "_stderr" in name or name == "alias" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            kept[name] = float(value)
        out[task] = kept
    return out


def results_files(folder: str | Path) -> list[Path]:
    """Every results file under ``folder``, oldest first (lmms-eval names them by date)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(folder.rglob(RESULTS_GLOB), key=lambda p: (p.stat().st_mtime, p.name))


def folder_results(folder: str | Path) -> TaskResults:
    """All tasks found under ``folder`` merged; a newer file's task replaces an older one's."""
    merged: TaskResults = {}
    for path in results_files(folder):
        merged.update(read_results_file(path))
    return merged


def collect(spec: TableSpec, results_dir: str | Path) -> dict[str, dict[str, float]]:
    """``{row id: {column: value}}`` from ``results_dir/<row id>/**`` (the grid runner's layout)."""
    results_dir = Path(results_dir)
    table: dict[str, dict[str, float]] = {}
    for row in spec.rows:
        found = folder_results(results_dir / row.id)
        values = {b.column: v for b in spec.benchmarks if (v := b.value(found)) is not None}
        if values:
            table[row.id] = values
        logger.debug("row %s: %d of %d columns", row.id, len(values), len(spec.benchmarks))
    return table


def folder_visual_tokens(folder: str | Path) -> tuple[float, float] | None:
    """The layer-average of visual tokens an in-LLM method achieved over the runs under ``folder`` (their requests
    with an image pooled; over layer inputs, over layer outputs), from ``config.visual_tokens``; None if none."""
    count, inputs, outputs = 0, 0.0, 0.0
    for path in results_files(folder):
        summary = json.loads(path.read_text()).get("config", {}).get("visual_tokens") or {}
        if summary.get("requests"):
            count += summary["requests"]
            inputs += summary["requests"] * summary["layer_average_inputs"]
            outputs += summary["requests"] * summary["layer_average_outputs"]
    return (inputs / count, outputs / count) if count else None


def collect_visual_tokens(spec: TableSpec, results_dir: str | Path) -> dict[str, tuple[float, float]]:
    """``{row id: (layer-average over inputs, over outputs)}`` for the rows whose runs used an in-LLM method."""
    found = {row.id: folder_visual_tokens(Path(results_dir) / row.id) for row in spec.rows}
    return {row_id: value for row_id, value in found.items() if value is not None}
