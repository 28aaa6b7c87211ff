"""eval.tables.seeds: mean ± sd over seeds from lmms-eval folders; tests with seeds as the unit against exact
enumeration (sign flips, bootstrap resamples) and the seeds a real effect needs against simulated power."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from eval.tables.seeds import NotPerQuestion, compare, main, per_doc, summarize
from eval.tables.seedtest import seed_test, seeds_needed, sign_flip_floor_seeds
from eval.tables.spec import load_spec

MODEL = "llava_visionzip"
SEEDS = 3
DOCS = 200
TASKS = {"GQA": "gqa", "SQA": "scienceqa_img"}
ROWS = {"vanilla-576": 0.70, "visionzip-64": 0.62, "random-patches-64": 0.50}  # each row's chance of a right answer
SPEC = """\
name: tiny
title: Tiny table
model: {pretrained: some/llava}
baseline: {method: vanilla, tokens: 576}
rows:
  - {method: vanilla, tokens: 576}
  - {method: VisionZip, tokens: 64, model_args: {budget: 64}}
  - {method: Random patches, tokens: 64, model_args: {budget: 64}}
benchmarks:
  - {column: GQA, task: gqa, metric: exact_match, scale: 100}
  - {column: SQA, task: scienceqa_img, metric: exact_match, scale: 100}
"""


def write_run(folder: Path, task: str, scores: np.ndarray, date: str = "20250101_120000", order_seed: int = 0) -> Path:
    """One lmms-eval run as its CLI writes it: ``<folder>/<model>/<date>_results.json`` and the samples file.

    ``scores``: (docs,) exact_match per doc_id, written in a shuffled order (lmms-eval's is not doc order either).
    """
    out = folder / MODEL
    out.mkdir(parents=True, exist_ok=True)
    value = float(np.mean(scores))
    results = {task: {"alias": task, "exact_match,none": value, "exact_match_stderr,none": "N/A"}}
    (out / f"{date}_results.json").write_text(json.dumps({"results": results, "config": {"model": MODEL}}))
    lines = []
    for doc in np.random.default_rng(order_seed).permutation(len(scores)):
        record = {"doc_id": int(doc), "target": "no", "filtered_resps": ["no"], "exact_match": float(scores[doc])}
        lines.append(json.dumps(record | {"doc_hash": "h", "input": "Is it? Answer briefly."}))
    path = out / f"{date}_samples_{task}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three seed folders of the tiny spec; the scores written, ``{(seed, row id, column): (docs,)}``."""
    root = tmp_path_factory.mktemp("seeds")
    spec_path = root / "tiny.yaml"
    spec_path.write_text(SPEC)
    rng = np.random.default_rng(1234)
    scores = {}
    for seed, (row, chance), (column, task) in itertools.product(range(SEEDS), ROWS.items(), TASKS.items()):
        drawn = (rng.random(DOCS) < chance + rng.normal(0, 0.03)).astype(float)
        write_run(root / f"seed{seed}" / row / task, task, drawn, order_seed=seed)
        scores[seed, row, column] = drawn
    return {"spec": spec_path, "dirs": [root / f"seed{s}" for s in range(SEEDS)], "scores": scores, "root": root}


def _values(grid: dict, row: str, column: str) -> np.ndarray:
    """(seeds,) the column's value per seed, in points, straight from the numbers written."""
    return np.array([100.0 * grid["scores"][s, row, column].mean() for s in range(SEEDS)])


def test_summary_matches_numpy(grid: dict) -> None:
    spec = load_spec(grid["spec"])
    rows = {(r.method, r.tokens): r for r in summarize(spec, grid["dirs"])}
    assert list(rows) == [("vanilla", 576), ("VisionZip", 64), ("Random patches", 64)]
    for row in spec.rows:
        for column in TASKS:
            stat, expected = rows[row.method, row.tokens].values[column], _values(grid, row.id, column)
            assert stat.n == SEEDS
            assert stat.mean == pytest.approx(expected.mean(), abs=1e-9)
            assert stat.sd == pytest.approx(expected.std(ddof=1), abs=1e-9)


def test_retention_per_seed_then_mean_and_sd(grid: dict) -> None:
    spec = load_spec(grid["spec"])
    row = next(r for r in summarize(spec, grid["dirs"]) if r.method == "VisionZip")
    ratios = {c: 100.0 * _values(grid, "visionzip-64", c) / _values(grid, "vanilla-576", c) for c in TASKS}
    for column, ratio in ratios.items():
        assert row.retention[column].mean == pytest.approx(ratio.mean())
        assert row.retention[column].sd == pytest.approx(ratio.std(ddof=1))
    avg = np.mean(list(ratios.values()), axis=0)  # (seeds,): the Avg of each seed
    assert row.avg.mean == pytest.approx(avg.mean()) and row.avg.sd == pytest.approx(avg.std(ddof=1))
    assert row.avg_columns == len(TASKS)
    baseline = next(r for r in summarize(spec, grid["dirs"]) if r.method == "vanilla")
    assert baseline.avg.mean == pytest.approx(100.0) and baseline.avg.sd == pytest.approx(0.0)


def test_per_doc_reads_the_newest_samples_file_scaled(grid: dict, tmp_path: Path) -> None:
    spec = load_spec(grid["spec"])
    row, gqa = spec.rows[1], spec.benchmarks[0]
    got = per_doc(grid["dirs"][0], row, gqa)
    assert got == {d: 100.0 * v for d, v in enumerate(grid["scores"][0, row.id, "GQA"])}
    # an older run of the same task (earlier date and mtime) is ignored; a newer one wins
    folder = tmp_path / row.id / "gqa"
    old = write_run(folder, "gqa", np.zeros(DOCS), date="20240101_000000")
    os.utime(old, (1_000_000, 1_000_000))
    write_run(folder, "gqa", np.ones(DOCS), date="20250101_000000")
    assert set(per_doc(tmp_path, row, gqa).values()) == {100.0}
    with pytest.raises(FileNotFoundError, match=str(tmp_path / spec.rows[2].id)):
        per_doc(tmp_path, spec.rows[2], gqa)


def test_per_doc_refuses_metrics_without_a_number_per_question(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text(SPEC)
    spec = load_spec(tmp_path / "t.yaml")
    out = tmp_path / spec.rows[0].id / "gqa" / MODEL
    out.mkdir(parents=True)
    (out / "20250101_000000_samples_gqa.jsonl").write_text(json.dumps({"doc_id": 0, "exact_match": {"a": 1}}) + "\n")
    with pytest.raises(NotPerQuestion, match="dict"):
        per_doc(tmp_path, spec.rows[0], spec.benchmarks[0])


def _exact_p(d: np.ndarray) -> float:
    """Two-sided p of mean(d) = 0 from all 2^n sign flips (the permutation distribution itself)."""
    observed = abs(d.mean())
    flips = np.array(list(itertools.product((-1.0, 1.0), repeat=d.size)))  # (2^n, n)
    return float(np.mean(np.abs(flips @ d / d.size) >= observed - 1e-12))


def test_identical_rows_give_p_one_and_no_difference() -> None:
    a = np.random.default_rng(0).random(5) * 100.0
    test = seed_test(a, a.copy(), n_docs=50)
    assert test.diff == 0.0 and test.p == 1.0 and test.verdict == "indistinguishable"
    assert test.ci_low == 0.0 and test.ci_high == 0.0 and (test.n_seeds, test.n_docs) == (5, 50)
    assert test.per_seed == (0.0,) * 5 and test.sd == 0.0


def test_p_is_the_exact_sign_flip_distribution_over_seeds() -> None:
    d = np.array([0.9, 0.5, 0.7, -0.3, 0.2, 0.6, -0.4, 0.1])  # 8 seeds: 256 flips, enumerated by scipy too
    b = np.random.default_rng(2).random(d.size) * 50
    exact = _exact_p(d)
    assert 0.05 < exact < 0.5  # a p that is neither 1 nor its floor
    assert seed_test(b + d, b).p == pytest.approx(exact, abs=1e-9)
    many = np.random.default_rng(3).normal(0.4, 1.0, 16)  # 2^16 flips > the draws: Monte Carlo, near the exact p
    assert seed_test(b[0] + many, np.full(16, b[0])).p == pytest.approx(_exact_p(many), abs=0.01)


def test_three_seeds_can_never_be_significant_six_can() -> None:
    three = seed_test(np.array([60.0, 61.0, 62.0]), np.array([50.0, 50.0, 50.0]))
    assert three.p == pytest.approx(0.25) and three.p_floor == pytest.approx(0.25)
    assert three.verdict == "indistinguishable" and three.per_seed == pytest.approx((10.0, 11.0, 12.0))
    assert sign_flip_floor_seeds(0.05) == 6 and sign_flip_floor_seeds(0.25) == 3
    six = seed_test(np.arange(6) + 60.0, np.full(6, 50.0))
    assert six.p == pytest.approx(2 / 64) and six.significant and six.verdict == "better"
    assert seed_test(np.full(6, 50.0), np.arange(6) + 60.0).verdict == "worse"


def test_bootstrap_interval_matches_the_enumerated_bootstrap() -> None:
    d = np.array([7.2, 1.4, -0.4, 3.0])
    resamples = np.array(list(itertools.product(d, repeat=d.size))).mean(axis=1)  # all 4^4 equally likely resamples
    low, high = np.percentile(resamples, [2.5, 97.5])
    test = seed_test(d, np.zeros(d.size))
    assert test.ci_low == pytest.approx(low, abs=0.3) and test.ci_high == pytest.approx(high, abs=0.3)
    assert test.ci_low <= test.diff <= test.ci_high and test.sd == pytest.approx(d.std(ddof=1))


def test_swapping_rows_negates_the_difference_and_keeps_p() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.random(7) * 100, rng.random(7) * 100
    ab, ba = seed_test(a, b), seed_test(b, a)
    assert ba.diff == pytest.approx(-ab.diff) and ba.p == pytest.approx(ab.p)
    assert (ba.ci_low, ba.ci_high) == pytest.approx((-ab.ci_high, -ab.ci_low))


def test_seed_test_refuses_mismatched_arrays() -> None:
    with pytest.raises(ValueError, match=r"\(seeds,\)"):
        seed_test(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="finite"):
        seed_test(np.array([1.0, np.nan]), np.zeros(2))


def _simulated_power(n: int, sd: float, effect: float, draws: int = 20_000) -> float:
    """How often a t-test over n normal per-seed differences (mean ``effect``) rejects at 5 %: by simulation."""
    d = np.random.default_rng(n).normal(effect, sd, (draws, n))
    t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / np.sqrt(n))
    return float(np.mean(np.abs(t) > stats.t.ppf(0.975, n - 1)))


@pytest.mark.parametrize("sd", [4.0, 7.0])
def test_seeds_needed_reaches_the_power_and_one_fewer_does_not(sd: float) -> None:
    n = seeds_needed(sd, effect=3.0)
    assert n is not None and _simulated_power(n, sd, 3.0) >= 0.78 and _simulated_power(n - 1, sd, 3.0) < 0.82
    normal = ((stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * sd / 3.0) ** 2  # the large-sample approximation
    assert normal <= n <= normal + 3


def test_seeds_needed_floor_and_unknown_spread() -> None:
    assert seeds_needed(0.01, effect=3.0) == 6  # any spread this small: the sign-flip test's floor decides
    assert seeds_needed(math.nan) is None and seeds_needed(1000.0, most=50) is None
    assert seed_test(np.array([3.0]), np.array([1.0])).seeds_needed is None  # one seed: no spread measured


def test_compare_averages_each_question_over_seeds(grid: dict) -> None:
    spec = load_spec(grid["spec"])
    comparisons, skipped = compare(spec, grid["dirs"], [("VisionZip", "Random patches"), ("VisionZip", "vanilla")])
    assert not skipped
    assert [(c.a, c.b, c.tokens, c.column) for c in comparisons] == [
        ("VisionZip", "Random patches", 64, "GQA"),
        ("VisionZip", "Random patches", 64, "SQA"),
    ]  # no tokens value is shared with vanilla (576 only)
    for c in comparisons:
        per_seed = _values(grid, "visionzip-64", c.column) - _values(grid, "random-patches-64", c.column)
        assert c.test.per_seed == pytest.approx(tuple(per_seed))
        assert c.test.diff == pytest.approx(per_seed.mean()) and c.test.sd == pytest.approx(per_seed.std(ddof=1))
        assert (c.test.n_docs, c.test.n_seeds) == (DOCS, SEEDS)
    with pytest.raises(ValueError, match="not rows"):
        compare(spec, grid["dirs"], [("VisionZip", "FastV")])


def test_compare_raises_when_questions_differ(grid: dict, tmp_path: Path) -> None:
    spec = load_spec(grid["spec"])
    copies = []
    for seed in range(SEEDS):  # a copy where seed 1 of VisionZip lacks doc 5 on SQA
        for row, column in itertools.product(ROWS, TASKS):
            scores = grid["scores"][seed, row, column]
            drop = seed == 1 and row == "visionzip-64" and column == "SQA"
            path = write_run(tmp_path / f"s{seed}" / row / TASKS[column], TASKS[column], scores)
            if drop:
                path.write_text(
                    "".join(line for line in path.read_text().splitlines(True) if '"doc_id": 5,' not in line)
                )
        copies.append(tmp_path / f"s{seed}")
    with pytest.raises(ValueError, match="question sets differ"):
        compare(spec, copies, [("VisionZip", "Random patches")])
    other = [tmp_path / "other"]  # one seed where the two rows hold different questions
    write_run(other[0] / "visionzip-64" / "gqa", "gqa", np.ones(DOCS))
    write_run(other[0] / "random-patches-64" / "gqa", "gqa", np.ones(DOCS + 1))
    with pytest.raises(ValueError, match="visionzip-64 vs random-patches-64"):
        compare(spec, other, [("VisionZip", "Random patches")])


def test_cli_writes_markdown_and_csv(grid: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dirs = [str(d) for d in grid["dirs"]]
    argv = ["--spec", str(grid["spec"]), "--results", *dirs, "--compare", "VisionZip|Random patches"]
    text = main([*argv, "--out", str(tmp_path), "--name", "tiny3"])
    assert (tmp_path / "tiny3.md").read_text() == text and text in capsys.readouterr().out
    assert "mean ± sd over 3 seeds" in text and "| Method | Tokens | GQA | SQA | Avg % |" in text
    assert f"Seeds as the unit: each training seed's A - B in points on the same {DOCS} questions" in text
    assert "smallest p it can give is 0.25, so no difference can reach 5%" in text
    assert "No correction for multiple comparisons" in text and "a real 3-point effect needs" in text
    assert "| VisionZip | Random patches | 64 | GQA |" in text and "| VisionZip | Random patches | 64 | SQA |" in text
    gqa = _values(grid, "visionzip-64", "GQA")
    assert f"| VisionZip | 64 | {gqa.mean():.1f} ± {gqa.std(ddof=1):.1f} |" in text
    with open(tmp_path / "tiny3.csv", newline="") as handle:
        records = list(csv.DictReader(handle))
    assert sum(r["table"] == "summary" for r in records) == 3 * (len(TASKS) + 1)
    tests = [r for r in records if r["table"] == "comparison"]
    assert [r["column"] for r in tests] == ["GQA", "SQA"]
    for r in tests:
        per_seed = _values(grid, "visionzip-64", r["column"]) - _values(grid, "random-patches-64", r["column"])
        assert [float(x) for x in r["per_seed"].split(";")] == pytest.approx(list(per_seed), abs=1e-4)
        assert float(r["p_floor"]) == pytest.approx(0.25) and r["verdict"] == "indistinguishable"
