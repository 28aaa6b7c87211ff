"""eval.pareto: retention against time to first token from a bench results.json and a hand-made retention CSV."""

from __future__ import annotations

import json
import random

import pytest

from eval.pareto import Point, bench_times, main, method_key, pareto_front, read_retention


def _row(model: str, path: str, budget: int, ms: float, quant: str | None = None) -> dict:
    return {"model": model, "path": path, "budget": budget, "first_token_ms": ms, "quant": quant}


BENCH = {
    "rows": [
        _row("llava-1.5-7b@0.0625 (all layers)", "vanilla", 576, 100.0),
        _row("llava-1.5-7b@0.0625 (all layers)", "ours", 64, 25.0),
        _row("llava-1.5-7b@0.0625 (all layers)", "released", 64, 40.0),
        _row("llava-1.5-7b@0.0625 (all layers)", "divprune", 64, 30.0),
        _row("llava-1.5-7b@0.0625 (all layers)", "cdpruner", 64, 50.0),
        _row("llava-1.5-7b@0.0625 (all layers)", "fastv", 64, 40.0),
        _row("llava-1.5-7b@0.0625 (all layers)", "ours", 128, 35.0),
        _row("llava-1.5-7b@0.0625 (all layers)", "ours", 64, 90.0, quant="4bit"),
        _row("llava-next-7b", "vanilla", 2880, 500.0),
    ]
}
CSV = """method,budget,retention
Vanilla,576,100
VisionZip,64,94.4
divprune,64,94.7
CDPruner,64,97.0
FastV,64,85.4
visionzip,7,90.0
"""


def _front_by_sweep(points: list[Point]) -> set[str]:
    """Reference: sort by time (ties: better retention first) and keep each point that beats every faster one."""
    best, front = float("-inf"), set()
    for p in sorted(points, key=lambda p: (p.time, -p.retention)):
        if p.retention > best:
            front.add(p.method)
            best = p.retention
    return front


def test_front_equals_a_sorted_sweep() -> None:
    rng = random.Random(0)
    for _ in range(200):
        points = [Point(f"m{i}", rng.choice([0.2, 0.4, 0.6, 1.0]), rng.choice([80.0, 90.0, 95.0, 100.0]))
                  for i in range(rng.randint(1, 7))]  # fmt: skip
        unique = {(p.time, p.retention): p for p in points}  # the sweep keeps one of two identical points
        assert {p.method for p in pareto_front(list(unique.values()))} == _front_by_sweep(list(unique.values()))


def test_times_and_retention_read_as_documented(tmp_path) -> None:
    times = bench_times(BENCH, "llava-1.5-7b", 64)
    assert times == {"vanilla": 1.0, "visionzip": 0.25, "divprune": 0.3, "cdpruner": 0.5, "fastv": 0.4}
    (tmp_path / "r.csv").write_text(CSV)
    retention = read_retention(tmp_path / "r.csv")
    assert (
        retention[("visionzip", 64)] == 94.4
        and retention[("vanilla", 576)] == 100
        and method_key("Vision-Zip") == "visionzip"
    )
    (tmp_path / "bad.csv").write_text("method,budget,retention\nvisionzip,sixty,90\n")
    with pytest.raises(ValueError, match=r"bad.csv:2"):
        read_retention(tmp_path / "bad.csv")
    (tmp_path / "cols.csv").write_text("method,tokens,score\n")
    with pytest.raises(ValueError, match="expected columns"):
        read_retention(tmp_path / "cols.csv")
    with pytest.raises(ValueError, match=r"no vanilla row of 'llava-1\.5-13b'"):
        bench_times(BENCH, "llava-1.5-13b", 64)


def test_eval_tables_long_csv_reads_its_average_lines(tmp_path) -> None:
    """The miniature's mini.csv (python -m eval.tables): the "Avg %" line of each row is its retention."""
    (tmp_path / "mini.csv").write_text(
        "method,tokens,column,ours,paper,delta,paper_published,flag\n"
        "Vanilla,16,small,41.0,,,,\nVanilla,16,Avg %,100.0,,,,\n"
        "VisionZip,7,small,37.8,,,,\nVisionZip,7,Avg %,92.2,,,,\n"
        "DivPrune,7,Avg %,None,,,,\nFastV,7,Avg % (paper's harness),80.0,75.0,,75.0,src\n"
    )  # fmt: skip
    assert read_retention(tmp_path / "mini.csv") == {("vanilla", 16): 100.0, ("visionzip", 7): 92.2}


def test_cli_plots_and_marks_the_front(tmp_path, capsys) -> None:
    (tmp_path / "results.json").write_text(json.dumps(BENCH))
    (tmp_path / "r.csv").write_text(CSV)
    out = tmp_path / "pareto.png"
    points = main(
        ["--bench", str(tmp_path / "results.json"), "--retention", str(tmp_path / "r.csv"), "--out", str(out)]
    )
    assert {p.method: (p.time, p.retention) for p in points} == {
        "vanilla": (1.0, 100.0), "visionzip": (0.25, 94.4), "divprune": (0.3, 94.7), "cdpruner": (0.5, 97.0),
        "fastv": (0.4, 85.4),
    }  # fmt: skip
    text = capsys.readouterr().out
    marked = {line.split("|")[1].strip() for line in text.splitlines() if line.endswith("| yes |")}
    assert marked == {"vanilla", "visionzip", "divprune", "cdpruner"}  # FastV: slower and worse than VisionZip
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    main(["--bench", str(tmp_path / "results.json"), "--retention", str(tmp_path / "r.csv"), "--out", str(out),
          "--retention-budget", "7"])  # fmt: skip
    assert "No retention for: cdpruner, divprune, fastv." in capsys.readouterr().out
