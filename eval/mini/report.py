"""The miniature's tables: one seed's table, plot and per-split summary with TTFT; the seeds table and its tests."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from eval.mini.config import FULL_TOKENS, LAYOUTS, SPLITS, Paths, ReproConfig
from eval.mini.jobs import run_logged
from eval.mini.multiturn import multiturn_markdown

Table = dict[tuple[str, int], dict[str, float | None]]  # {(method, tokens): {column: value}}


def read_table(csv_path: Path) -> Table:
    """``{(method, tokens): {column: value}}`` from the CSV ``eval.tables`` wrote."""
    table: Table = {}
    with open(csv_path, newline="") as handle:
        for line in csv.DictReader(handle):
            value = float(line["ours"]) if line["ours"] not in ("", "None") else None
            table.setdefault((line["method"], int(line["tokens"])), {})[line["column"]] = value
    return table


def summary_markdown(table: Table, ttft: dict[str, float]) -> str:
    """Accuracy and retention per split, and time to first token per visual token count."""
    base = table[("Vanilla", FULL_TOKENS)]
    splits = " | ".join(f"{s} acc | {s} ret %" for s in SPLITS)
    header = f"| Method | Tokens | {splits} | Avg ret % | TTFT ms | TTFT x |"
    lines = [header, "|---|---:|" + "---:|" * (2 * len(SPLITS) + 3)]
    full_ms = ttft.get(str(FULL_TOKENS))
    for (method, tokens), values in table.items():
        cells = []
        for split in SPLITS:
            acc, ref = values.get(split), base.get(split)
            cells += [_num(acc), _num(100 * acc / ref if acc is not None and ref else None)]
        ms = ttft.get(str(tokens))
        ratio = _num(ms / full_ms, 2) if ms is not None and full_ms else "-"
        cells += [_num(values.get("Avg %")), _num(ms, 2), ratio]
        lines.append(f"| {method} | {tokens} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(paths: Paths) -> str:
    """``eval.tables`` (mini.md/.csv/.png: table and retention plot), then the per-split summary with TTFT."""
    command = [sys.executable, "-m", "eval.tables", "--spec", str(paths.spec), "--results", str(paths.results),
               "--out", str(paths.run)]  # fmt: skip
    run_logged("render", command, paths)
    ttft = json.loads((paths.run / "ttft.json").read_text())
    summary = summary_markdown(read_table(paths.run / "mini.csv"), ttft)
    timings = json.loads((paths.run / "timings.json").read_text())
    text = (paths.run / "mini.md").read_text() + "\n#### Per split, with time to first token (CPU)\n\n" + summary
    text += multiturn_section(paths.run / "eval" / "mini_multiturn.yaml", [paths.multiturn])
    text += "\nStage times (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()) + "\n"
    (paths.run / "reproduce.md").write_text(text)
    return text


def versus_visionzip(csv_path: Path, methods: Sequence[str]) -> str:
    """Per split, the comparison methods better than, worse than and indistinguishable from VisionZip (the tests over
    seeds in ``seeds.csv``), each with its mean difference in points per budget; empty without such tests."""
    with open(csv_path, newline="") as handle:
        tests = [r for r in csv.DictReader(handle) if r["table"] == "comparison" and r["method_b"] == "VisionZip"
                 and r["method"] in methods]  # fmt: skip
    if not tests:
        return ""
    lines = ["", "#### Against VisionZip, per split (tests over seeds above; points, per budget)", ""]
    for column in dict.fromkeys(r["column"] for r in tests):
        groups: dict[str, list[str]] = {"better": [], "worse": [], "indistinguishable": []}
        for method in dict.fromkeys(r["method"] for r in tests):
            rows = [r for r in tests if r["column"] == column and r["method"] == method]
            for verdict in groups:
                cells = [f"{r['tokens']}: {float(r['diff']):+.1f}" for r in rows if r["verdict"] == verdict]
                if cells:
                    groups[verdict].append(f"{method} ({', '.join(cells)})")
        parts = [f"{verdict}: {'; '.join(found) if found else 'none'}" for verdict, found in groups.items()]
        lines.append(f"- **{column}**: " + ". ".join(parts) + ".")
    return "\n".join(lines) + "\n"


def multiturn_section(spec: Path, results: Sequence[Path]) -> str:
    """The multi-turn table (``eval.mini.multiturn``) under its heading; empty when no multi-turn test ran."""
    if not spec.exists():
        return ""
    heading = "\n#### Multi-turn: turn 2 asks about the other object (turn 1 answered by its ground truth)\n\n"
    return heading + multiturn_markdown(spec, results)


def comparisons(layouts: Sequence[str], methods: Sequence[str] = ()) -> list[tuple[str, str]]:
    """The seeds table's paired tests: VisionZip against random patches and dominant-only in each layout, the two
    layouts of VisionZip against each other, and each comparison method (a row name of ``methods``) against VisionZip
    (packed, as they run)."""
    pairs = [(f"VisionZip{LAYOUTS[lay]}", f"{other}{LAYOUTS[lay]}") for lay in layouts
             for other in ("Random patches", "Dominant only")]  # fmt: skip
    if set(LAYOUTS) <= set(layouts):
        pairs.append((f"VisionZip{LAYOUTS['original']}", "VisionZip"))
    return pairs + [(method, "VisionZip") for method in methods]


def aggregate_seeds(out: Path, cfg: ReproConfig, seeds: Sequence[int]) -> str:
    """``<out>/seeds.md|csv``: every row as mean ± sd over ``seeds`` and the paired tests (``eval.tables.seeds``)."""
    runs = [Paths(out.resolve(), seed) for seed in seeds]
    command = [sys.executable, "-m", "eval.tables.seeds", "--spec", str(runs[0].spec), "--out", str(out.resolve()),
               "--name", "seeds", "--results", *(str(run.results) for run in runs)]  # fmt: skip
    for a, b in comparisons(cfg.layouts, cfg.comparisons):
        command += ["--compare", f"{a}|{b}"]
    run_logged("seeds", command, runs[0])
    text = (out / "seeds.md").read_text() + versus_visionzip(out / "seeds.csv", cfg.comparisons)
    text += multiturn_section(runs[0].run / "eval" / "mini_multiturn.yaml", [run.multiturn for run in runs])
    (out / "seeds.md").write_text(text)
    return text
