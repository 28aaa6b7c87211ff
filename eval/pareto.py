"""``python -m eval.pareto``: retention against time to first token, per method at one budget, and the Pareto front.

Time comes from a ``python -m llava.bench`` run (its ``results.json``): each method's first-token time at
``--budget`` as a share of the same model's vanilla time (full weights). Retention comes from a CSV, for example the
miniature's per-method retention (``eval/mini``), in this format::

    method,budget,retention
    vanilla,576,100
    visionzip,64,94.4
    divprune,64,94.7

one row per method and budget; ``method`` is a method's name (``visionzip``, ``divprune``, ``vispruner``,
``cdpruner``, ``fastv``, ``pdrop``, ``sparsevlm``, ``vanilla``; case and punctuation ignored, so "VisionZip" or
"Vanilla" read too), ``budget`` the visual tokens it kept (the CSV's own budgets may differ from the bench's:
``--retention-budget``), ``retention`` in percent of vanilla's score. The long CSV that ``python -m eval.tables``
writes (the miniature's ``mini.csv``: ``method,tokens,column,ours,...``) reads too: each row's ``Avg %`` line is its
retention. Vanilla is at (1, 100) unless the CSV says otherwise. A method on the front is one that no other method
beats on both axes (as fast or faster and at least as accurate, better on one). Writes the plot (PNG) and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

CSV_COLUMNS = ("method", "budget", "retention")
TABLES_COLUMNS = ("method", "tokens", "column", "ours")  # eval.tables' long CSV
TABLES_RETENTION = "Avg %"  # its line per row with the row's average retention
BENCH_PATHS = {"vanilla": "vanilla", "ours": "visionzip"}  # the bench's VisionZip row is its path "ours"
VANILLA_RETENTION = 100.0


@dataclass(frozen=True)
class Point:
    """One method: its first-token time as a share of vanilla's and its retention (percent of vanilla)."""

    method: str
    time: float
    retention: float


def method_key(name: str) -> str:
    """``"VisionZip"``, ``"vision-zip"`` -> ``"visionzip"``: lower case, letters and digits only."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def read_retention(path: Path) -> dict[tuple[str, int], float]:
    """``{(method, budget): retention}`` from a CSV of :data:`CSV_COLUMNS` or eval.tables' long CSV
    (:data:`TABLES_COLUMNS`, its ``Avg %`` lines); ValueError naming the line."""
    table: dict[tuple[str, int], float] = {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        long = all(c in fields for c in TABLES_COLUMNS)
        missing = [c for c in CSV_COLUMNS if c not in fields]
        if missing and not long:
            raise ValueError(
                f"{path}: expected columns {CSV_COLUMNS} (or eval.tables' {TABLES_COLUMNS}), got {fields}"
            )  # fmt: skip
        budget, value = ("tokens", "ours") if long else ("budget", "retention")
        for number, line in enumerate(reader, start=2):
            if long and (line["column"] != TABLES_RETENTION or line["ours"] in ("", "None")):
                continue
            try:
                table[(method_key(line["method"]), int(line[budget]))] = float(line[value])
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"{path}:{number}: expected a method, a whole {budget} and a {value}, got {line}"
                ) from err
    return table


def bench_times(result: dict, model: str, budget: int) -> dict[str, float]:
    """``{method: first-token time / vanilla's}`` of ``model``'s full-weight rows at ``budget`` (``model``: the
    preset name; a scaled run's ``llava-1.5-7b@0.0625 (all layers)`` reads as ``llava-1.5-7b``)."""
    rows = [r for r in result["rows"] if r["model"].split("@")[0] == model and not r.get("quant")]
    vanilla = next((r for r in rows if r["path"] == "vanilla"), None)
    if vanilla is None:
        models = sorted({r["model"].split("@")[0] for r in result["rows"]})
        raise ValueError(f"no vanilla row of {model!r} in the bench results; it has {models}")
    times = {"vanilla": 1.0}
    for row in rows:
        if row["budget"] == budget and row["path"] not in ("vanilla", "released", "hf"):
            times[BENCH_PATHS.get(row["path"], row["path"])] = row["first_token_ms"] / vanilla["first_token_ms"]
    return times


def join(times: dict[str, float], retention: dict[tuple[str, int], float], budget: int) -> list[Point]:
    """The methods with both a time and a retention at ``budget`` (vanilla: at any budget, else 100)."""
    vanilla = [value for (method, _), value in retention.items() if method == "vanilla"]
    points = [Point("vanilla", 1.0, vanilla[0] if vanilla else VANILLA_RETENTION)]
    for method, time in times.items():
        if method != "vanilla" and (method, budget) in retention:
            points.append(Point(method, time, retention[(method, budget)]))
    return points


def pareto_front(points: list[Point]) -> list[Point]:
    """The points no other point dominates (time <= and retention >=, one strictly), fastest first."""
    front = []
    for p in points:
        beaten = any(
            q.time <= p.time and q.retention >= p.retention and (q.time < p.time or q.retention > p.retention)
            for q in points
        )  # fmt: skip
        if not beaten:
            front.append(p)
    return sorted(front, key=lambda p: (p.time, -p.retention))


def render_markdown(points: list[Point], front: list[Point], title: str) -> str:
    """The points as a table, fastest first, those on the front marked."""
    on_front = {p.method for p in front}
    lines = [f"{title}:", "", "| method | time to first token (x vanilla) | retention % | on the front |",
             "|---|---|---|---|"]  # fmt: skip
    for p in sorted(points, key=lambda p: p.time):
        lines.append(f"| {p.method} | {p.time:.3f} | {p.retention:.1f} | {'yes' if p.method in on_front else ''} |")
    return "\n".join(lines)


def plot(points: list[Point], front: list[Point], path: Path, title: str) -> None:
    """PNG: each method a labelled point, the front as a step line."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state

    figure = Figure(figsize=(6.5, 4.5), layout="constrained")
    axes = figure.subplots()
    for p in points:
        axes.plot(p.time, p.retention, "o", color="C1" if p in front else "C0")
        axes.annotate(p.method, (p.time, p.retention), textcoords="offset points", xytext=(4, 4), fontsize="small")
    axes.step([p.time for p in front], [p.retention for p in front], where="post", color="C1", label="Pareto front")
    axes.set(xlabel="time to first token (x vanilla's)", ylabel="retention (% of vanilla)", title=title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> list[Point]:
    """CLI entry point: the plot to ``--out``, the table printed; returns the points."""
    parser = argparse.ArgumentParser(prog="python -m eval.pareto", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", type=Path, required=True, help="results.json of python -m llava.bench")
    parser.add_argument("--retention", type=Path, required=True, help="CSV: method,budget,retention (module doc)")
    parser.add_argument("--model", default="llava-1.5-7b", help="the bench model (preset name)")
    parser.add_argument("--budget", type=int, default=64, help="the bench rows' budget")
    parser.add_argument("--retention-budget", type=int, default=None, help="the CSV rows' (default: --budget)")
    parser.add_argument("--out", type=Path, default=Path("playground/bench/pareto.png"))
    args = parser.parse_args(argv)
    times = bench_times(json.loads(args.bench.read_text()), args.model, args.budget)
    retention = read_retention(args.retention)
    budget = args.retention_budget if args.retention_budget is not None else args.budget
    points = join(times, retention, budget)
    if len(points) < 2:
        raise SystemExit(f"no method has both a bench time at {args.budget} and a retention at {budget}")
    front = pareto_front(points)
    title = f"{args.model}, {args.budget} tokens (retention at {budget})"
    plot(points, front, args.out, title)
    left = sorted(set(times) - {p.method for p in points})
    print(render_markdown(points, front, title) + (f"\n\nNo retention for: {', '.join(left)}." if left else ""))
    return points


if __name__ == "__main__":
    main()
