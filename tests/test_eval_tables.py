"""eval.tables and eval.grid: the paper's Avg recomputed from its rows, lmms-eval's results read, rendering."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from eval import grid, tables
from eval.options import ModelOptions
from eval.tables import __main__ as tables_cli
from eval.tables import build_table, collect, load_spec, markdown, plot, read_paper, resolve_spec_path, write_csv
from eval.tables.spec import Row
from eval.tables.turns import turn_rows
from visionzip.baselines import FastVConfig, SparseVLMConfig, layer_average, visual_counts
from visionzip.baselines.cdpruner import CDPrunerConfig
from visionzip.baselines.divprune import DivPruneConfig
from visionzip.baselines.vispruner import VisPrunerConfig

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _rows_by_key(table: list) -> dict[tuple[str, int], object]:
    return {(r.method, r.tokens): r for r in table}


def test_paper_avg_recomputed_from_the_papers_rows() -> None:
    table = _rows_by_key(build_table(load_spec(resolve_spec_path("1")), {}))
    assert round(table[("VisionZip", 64)].avg_paper, 1) == 94.0
    assert round(table[("VisionZip", 192)].avg_paper, 1) == 98.5
    assert round(table[("VisionZip", 128)].avg_paper, 1) == 97.6
    assert table[("vanilla", 576)].avg_paper == pytest.approx(100.0)
    fastv = table[("FastV", 128)]
    assert fastv.flagged and round(fastv.avg_paper, 1) == 84.4 and fastv.avg_published == 83.5
    assert [key for key, row in table.items() if row.flagged] == [("FastV", 128)]


def test_table2_recomputes_within_rounding() -> None:
    table = build_table(load_spec(resolve_spec_path("2")), {})
    assert len(table) == 10 and not any(r.flagged for r in table)
    assert round(_rows_by_key(table)[("VisionZip", 640)].avg_paper, 1) == 97.6


def test_markdown_shows_both_where_they_differ() -> None:
    spec = load_spec(resolve_spec_path("1"))
    text = markdown(spec, build_table(spec, {}))
    assert "84.4 ⚠ published 83.5" in text and "the paper publishes Avg 83.5" in text
    assert "| VisionZip | 64 |" in text and "94.0" in text
    assert "perception + cognition" in text  # the split notes come along


def _lmms_results(task_metrics: dict[str, dict[str, float]]) -> dict:
    """A results file as lmms-eval writes it (metric keys with the ``,none`` filter, stderr and alias beside)."""
    results = {}
    for task, metrics in task_metrics.items():
        entry = {"alias": task}
        for name, value in metrics.items():
            entry[f"{name},none"] = value
            entry[f"{name}_stderr,none"] = "N/A"
        results[task] = entry
    return {"results": results, "config": {"model": "llava_visionzip"}}


def _paper_as_results(values: dict[str, float]) -> dict[str, dict[str, float]]:
    """The paper's row as lmms-eval would report it (fractions, MME split in two, POPE as three F1s)."""
    pope = values["POPE"] / 100
    return {
        "gqa": {"exact_match": values["GQA"] / 100},
        "mmbench_en_dev": {"gpt_eval_score": values["MMB"]},
        "mme": {"mme_perception_score": values["MME"] - 300.0, "mme_cognition_score": 300.0},
        "pope_adv": {"pope_f1_score": pope - 0.01},
        "pope_pop": {"pope_f1_score": pope},
        "pope_random": {"pope_f1_score": pope + 0.01},
        "scienceqa_img": {"exact_match": values["SQA"] / 100},
        "vqav2_val": {"exact_match": values["VQAv2"] / 100},
        "textvqa_val_llava": {"exact_match": values["TextVQA"] / 100},
        "mmmu_val": {"mmmu_acc": values["MMMU"] / 100},
        "seedbench": {"seed_all": values["SEED"] / 100, "seed_image": 0.7},
        "mmvet": {"gpt_eval_score": values["MMVet"]},
        "llava_in_the_wild": {"gpt_eval_llava_all": values["LLaVA-B"]},
    }


@pytest.fixture
def table1_results(tmp_path: Path) -> Path:
    """Results in the grid runner's layout for vanilla-576 and visionzip-64, equal to the paper's rows."""
    paper = read_paper(ROOT / "eval/paper/table1_llava15_7b.csv")
    for row_id, key in (("vanilla-576", ("vanilla", 576)), ("visionzip-64", ("VisionZip", 64))):
        for task, metrics in _paper_as_results(paper[key].values).items():
            folder = tmp_path / row_id / task / "llava-v1.5-7b"
            folder.mkdir(parents=True)
            (folder / "20260101_000000_results.json").write_text(json.dumps(_lmms_results({task: metrics})))
    return tmp_path


def test_results_read_combined_and_scaled(table1_results: Path) -> None:
    spec = load_spec(resolve_spec_path("1"))
    ours = collect(spec, table1_results)
    paper = read_paper(ROOT / "eval/paper/table1_llava15_7b.csv")
    assert set(ours) == {"vanilla-576", "visionzip-64"}
    for column, value in paper[("VisionZip", 64)].values.items():
        assert ours["visionzip-64"][column] == pytest.approx(value), column
    row = _rows_by_key(build_table(spec, ours))[("VisionZip", 64)]
    assert round(row.avg_ours, 1) == 94.0 and row.avg_delta == pytest.approx(0.0, abs=1e-9)
    assert row.avg_ours_count == 11


def test_cli_writes_markdown_csv_and_png(table1_results: Path, capsys: pytest.CaptureFixture) -> None:
    out = table1_results / "rendered"
    text = tables_cli.main(["--table", "1", "--results", str(table1_results), "--out", str(out)])
    assert "55.1 / 55.1" in text and text in capsys.readouterr().out
    assert (out / "table1.png").read_bytes().startswith(PNG_SIGNATURE)
    with open(out / "table1.csv") as handle:
        records = list(csv.DictReader(handle))
    avg = next(r for r in records if r["method"] == "FastV" and r["tokens"] == "128" and r["column"] == "Avg %")
    assert avg["flag"] and float(avg["paper_published"]) == 83.5 and avg["ours"] == ""
    gqa = next(r for r in records if r["method"] == "VisionZip" and r["tokens"] == "64" and r["column"] == "GQA")
    assert float(gqa["delta"]) == pytest.approx(0.0, abs=1e-9)


def test_generic_spec_without_paper(tmp_path: Path) -> None:
    spec_path = tmp_path / "mini.yaml"
    spec_path.write_text(
        "name: mini\ntitle: Mini\nmodel: {pretrained: ckpt}\nbaseline: {method: vanilla, tokens: 64}\n"
        "rows:\n  - {method: VisionZip, tokens: 10, model_args: {dominant: 8, contextual: 2}}\n"
        "benchmarks:\n  - {column: VQA, task: localvqa, metric: exact_match, scale: 100}\n"
        "  - {column: MC, task: localvqa_mc, metric: acc, scale: 100}\n"
    )
    spec = load_spec(spec_path)
    assert [r.id for r in spec.rows] == ["vanilla-64", "visionzip-10"]  # the baseline row is added
    ours = {"vanilla-64": {"VQA": 50.0, "MC": 40.0}, "visionzip-10": {"VQA": 25.0}}
    table = build_table(spec, ours)
    assert [(r.method, r.tokens) for r in table] == [("vanilla", 64), ("VisionZip", 10)]
    assert table[1].avg_ours == pytest.approx(50.0) and table[1].avg_ours_count == 1
    assert "| VisionZip | 10 | 25.0 | — | 50.0 (1/2) |" in markdown(spec, table)  # no paper: ours alone
    assert plot(spec, table, tmp_path / "mini.png").read_bytes().startswith(PNG_SIGNATURE)
    assert write_csv(spec, table, tmp_path / "mini.csv").is_file()


@pytest.mark.parametrize(
    "name", ["1", "2", "10", str(ROOT / "configs/eval/sweep.yaml"), str(ROOT / "eval/tables/table2_hf.yaml")]
)
def test_every_spec_row_has_valid_model_args(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_spec(resolve_spec_path(name))
    for row in spec.rows:
        if row.pretrained:
            monkeypatch.delenv(row.pretrained.strip("${}"), raising=False)
        args = grid.model_args_string(spec, row, {})
        assert args is None if row.optional else args.startswith("pretrained=")
    optional = [r for r in spec.rows if r.optional]
    if optional:
        monkeypatch.setenv(optional[0].pretrained.strip("${}"), "/ckpt/ft")
        assert "pretrained=/ckpt/ft" in grid.model_args_string(spec, optional[0], {})


def test_sweep_expands_its_grid() -> None:
    spec = load_spec(ROOT / "configs/eval/sweep.yaml")
    assert len(spec.rows) == 1 + 3 + 6 * 2 and spec.rows[0].id == "vanilla-576"
    original = [r for r in spec.rows if r.model_args.get("positions") == "original"]
    assert [(r.model_args["dominant"], r.model_args["contextual"], r.tokens) for r in original] == [
        (54, 10, 64), (108, 20, 128), (162, 30, 192)
    ]  # fmt: skip
    row = next(r for r in spec.rows if r.model_args == {"dominant": 44, "contextual": 20, "merge": "mean"})
    assert row.tokens == 64 and row.method == "VisionZip 44+20 merge=mean"
    assert [b.column for b in spec.benchmarks] == ["GQA", "MME", "POPE", "TextVQA", "SQA"]


def test_grid_skips_cells_already_done(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = load_spec(resolve_spec_path("1"))
    done = tmp_path / "visionzip-64" / "gqa" / "model"
    done.mkdir(parents=True)
    (done / "x_results.json").write_text(json.dumps(_lmms_results({"gqa": {"exact_match": 0.5}})))
    outcome = grid.run_grid(spec, tmp_path, rows=["visionzip-64"], tasks=["gqa", "mme"], dry_run=True)
    assert [c.task for c in outcome["planned"]] == ["mme"]  # gqa is done
    grouped = grid.plan(spec, tmp_path, {}, rows=["visionzip-64", "vanilla-576"], tasks=["gqa", "mme"], group=True)
    assert [(c.row.id, c.task) for c in grouped] == [("vanilla-576", "gqa,mme"), ("visionzip-64", "mme")]
    command = capsys.readouterr().out
    assert "--model llava_visionzip" in command and "budget=64" in command and "--include_path" in command
    with pytest.raises(ValueError, match="unknown rows or tasks"):
        grid.plan(spec, tmp_path, {}, rows=["visionzip-65"])
    with pytest.raises(ValueError, match="baseline"):
        type(spec)(spec.name, spec.title, spec.model, (Row("x", 1),), spec.benchmarks, spec.baseline)


def test_table2_hf_runs_transformers_class_at_the_papers_budgets(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    """The llava-hf spec: table 2's columns and budgets, every command on ``--model llava_hf_visionzip``."""
    spec, table2 = load_spec(ROOT / "eval/tables/table2_hf.yaml"), load_spec(resolve_spec_path("2"))
    assert (spec.lmms_model, table2.lmms_model) == ("llava_hf_visionzip", "llava_visionzip")
    assert spec.benchmarks == table2.benchmarks and spec.paper == table2.paper
    # table 2's rows, the in-LLM methods' too (visionzip.hf.inllm runs them in transformers' classes)
    assert [r.id for r in spec.rows] == [r.id for r in table2.rows]
    unset = ("VISIONZIP_FT_NEXT_640_HF", "VISIONZIP_FT_NEXT_320_HF", "VISIONZIP_FT_NEXT_160_HF")
    for name in (*unset, "SPARSEVLM_NEXT_SCALE_640", "SPARSEVLM_NEXT_SCALE_320"):
        monkeypatch.delenv(name, raising=False)
    outcome = grid.run_grid(spec, tmp_path, dry_run=True)
    commands = capsys.readouterr().out.splitlines()
    # vanilla + 3 budgets of VisionZip and of each selection, FastV's 3 and PDrop's 2; no FT checkpoint, no SparseVLM
    # (its NeXT scales are unset here)
    assert len(commands) == len(outcome["planned"]) == 18 * len(spec.tasks)
    assert all(
        "--model llava_hf_visionzip --model_args pretrained=llava-hf/llava-v1.6-vicuna-7b-hf" in c for c in commands
    )
    budgets = {
        c.row.id: c.model_args.removeprefix("pretrained=llava-hf/llava-v1.6-vicuna-7b-hf") for c in outcome["planned"]
    }
    others = ("divprune", "vispruner", "cdpruner", "fastv", "pdrop")
    assert {k: v for k, v in budgets.items() if not k.startswith(others)} == {
        "vanilla-2880": "", "visionzip-640": ",budget=128", "visionzip-320": ",budget=64", "visionzip-160": ",budget=32"
    }  # fmt: skip
    assert budgets["divprune-160"] == ",method=divprune,budget=32"
    assert budgets["pdrop-320"] == ",method=pdrop,pdrop_layers=2/8/16,pdrop_ratio=0.19"
    assert budgets["cdpruner-320"] == ",method=cdpruner,budget=64,clip_text=openai/clip-vit-large-patch14-336"
    assert len(build_table(spec, {})) == len(build_table(table2, {}))  # the paper's rows come along
    with pytest.raises(ValueError, match="llava_visionzip"):  # our LLaVA's template option is not theirs
        grid.model_args_string(spec, spec.rows[0], {"conv_template": "vicuna_v1"})
    with pytest.raises(ValueError, match="lmms_model"):
        type(spec)(spec.name, spec.title, spec.model, spec.rows, spec.benchmarks, spec.baseline, lmms_model="llava")


# --- our in-LLM comparison rows (method=fastv|sparsevlm|pdrop) -----------------------------------------------------
def _row_config(spec, row):
    """The config a row's model args build, read back from the model args string lmms-eval is given."""
    args = grid.model_args_string(spec, row, {})
    return ModelOptions.from_kwargs(**dict(pair.split("=", 1) for pair in args.split(","))).requested_method()


def _average(cfg, tokens: int, layers: int = 32) -> float:
    """The layer-average (over layer inputs) of a fixed-count method on an image of ``tokens`` tokens."""
    return layer_average(visual_counts(tokens, cfg.kept_after(tokens, layers), layers))[0]


def test_table1_has_our_methods_at_the_papers_budgets() -> None:
    spec = load_spec(resolve_spec_path("1"))
    configs = {(r.method, r.tokens): _row_config(spec, r) for r in spec.rows if "method" in r.model_args}
    methods = ("FastV", "PDrop", "SparseVLM", "DivPrune", "VisPruner", "CDPruner")
    assert sorted(configs) == sorted((m, t) for m in methods for t in (64, 128, 192))
    for method, cls in (("DivPrune", DivPruneConfig), ("VisPruner", VisPrunerConfig), ("CDPruner", CDPrunerConfig)):
        assert all(type(configs[(method, t)]) is cls and configs[(method, t)].tokens == t for t in (64, 128, 192))
    assert [configs[("VisPruner", t)].important_ratio for t in (192, 128, 64)] == [0.5, 0.5, 0.75]
    # FastV's kept count from T = (K N + (L - K) k) / L on LLaVA-1.5's 576 tokens and 32 layers, K = 2
    assert {t: configs[("FastV", t)].kept_after(576, 32) for t in (192, 128, 64)} == {
        192: {1: 166}, 128: {1: 98}, 64: {1: 30}
    }  # fmt: skip
    assert [configs[("SparseVLM", t)] for t in (192, 128, 64)] == [
        SparseVLMConfig(scale=13.5, bias=0.0), SparseVLMConfig(scale=9.0, bias=6.0), SparseVLMConfig(scale=0.8)
    ]  # fmt: skip
    for t in (192, 128, 64):  # PDrop's presets reach the budget on 576 tokens (int truncation aside)
        assert _average(configs[("PDrop", t)], 576) == pytest.approx(t, rel=0.02)
        assert _average(configs[("FastV", t)], 576) == pytest.approx(t, abs=0.5)


def test_table2_rows_and_the_budgets_they_cannot_reach(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_spec(resolve_spec_path("2"))
    for name in ("SPARSEVLM_NEXT_SCALE_640", "SPARSEVLM_NEXT_SCALE_320"):
        monkeypatch.delenv(name, raising=False)
    planned = {c.row.id for c in grid.plan(spec, Path("/nonexistent"), {}, group=True)}
    ours = {"fastv-640", "fastv-320", "fastv-keep-160-after-layer-2-160", "pdrop-640", "pdrop-320"}
    assert ours <= planned and not {i for i in planned if i.startswith("sparsevlm")}  # scale not calibrated yet
    rows = {r.id: r for r in spec.rows}
    fastv = {t: _row_config(spec, rows[f"fastv-{t}"]) for t in (640, 320)}
    assert {t: cfg.kept_after(2880, 32) for t, cfg in fastv.items()} == {640: {1: 491}, 320: {1: 149}}
    with pytest.raises(ValueError, match=r"cannot average 160 visual tokens over 32 layers on 2880 tokens: .* 180"):
        FastVConfig(budget=160).kept_after(2880, 32)  # why the 160 row keeps 160 after layer 2 instead
    kept = _row_config(spec, rows["fastv-keep-160-after-layer-2-160"])
    assert kept == FastVConfig(keep=160) and _average(kept, 2880) == (2 * 2880 + 30 * 160) / 32
    for t in (640, 320):  # LLaVA-1.5's PDrop presets as fractions of the tokens: 128/576 = 640/2880, 64/576
        assert _average(_row_config(spec, rows[f"pdrop-{t}"]), 2880) == pytest.approx(t, rel=0.01)
    monkeypatch.setenv("SPARSEVLM_NEXT_SCALE_640", "3.5")
    assert _row_config(spec, rows["sparsevlm-640"]) == SparseVLMConfig(scale=3.5, bias=0.0)


def test_our_rows_render_beside_the_published_ones(tmp_path: Path) -> None:
    spec = load_spec(resolve_spec_path("1"))
    tokens = {"requests": 10, "layer_average_inputs": 64.0, "layer_average_outputs": 62.2}
    for row_id, gqa, achieved in (("vanilla-576", 0.62, None), ("fastv-64", 0.5, tokens), ("pdrop-64", 0.55, tokens)):
        folder = tmp_path / row_id / "gqa" / "llava-v1.5-7b"
        folder.mkdir(parents=True)
        results = _lmms_results({"gqa": {"exact_match": gqa}})
        if achieved:
            results["config"]["visual_tokens"] = achieved
        (folder / "20260101_000000_results.json").write_text(json.dumps(results))
    achieved = tables.collect_visual_tokens(spec, tmp_path)
    assert achieved == {"fastv-64": (64.0, 62.2), "pdrop-64": (64.0, 62.2)}
    table = _rows_by_key(build_table(spec, collect(spec, tmp_path), achieved=achieved))
    assert table[("FastV", 64)].ours == {"GQA": pytest.approx(50.0)} and table[("FastV", 64)].paper["GQA"] == 46.1
    assert table[("PDrop", 64)].paper == {} and table[("PDrop", 64)].avg_ours == pytest.approx(100 * 0.55 / 0.62)
    text = markdown(spec, list(table.values()))
    assert "| FastV | 64 (64.0 in, 62.2 out) | 50.0 / 46.1 |" in text
    assert "| PDrop | 64 (64.0 in, 62.2 out) | 55.0 / — |" in text  # the paper has no PDrop row: ours alone
    assert "ours / the paper's published number" in text and "FastV, SparseVLM and PDrop rows: ours are" in text


def test_a_sweep_grid_of_methods_budgets_and_options(tmp_path: Path) -> None:
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(
        "name: s\ntitle: t\nmodel: {pretrained: ckpt}\nbaseline: {method: vanilla, tokens: 576}\n"
        "grid:\n  method: [fastv, pdrop]\n  budget: [64, 128]\n  fastv_layer: [2, 3]\n"
        "rows:\n  - {method: PDrop custom, tokens: 64, model_args: {method: pdrop, pdrop_layers: [2, 8], "
        "pdrop_ratio: 0.3}}\n"
        "benchmarks:\n  - {column: VQA, task: localvqa, metric: exact_match}\n"
    )
    spec = load_spec(spec_path)
    args = {r.id: grid.model_args_string(spec, r, {}) for r in spec.rows}
    assert args == {
        "vanilla-576": "pretrained=ckpt",
        "pdrop-custom-64": "pretrained=ckpt,method=pdrop,pdrop_layers=2/8,pdrop_ratio=0.3",
        "fastv-64-fastv-layer-2-64": "pretrained=ckpt,method=fastv,budget=64,fastv_layer=2",
        "fastv-64-fastv-layer-3-64": "pretrained=ckpt,method=fastv,budget=64,fastv_layer=3",
        "fastv-128-fastv-layer-2-128": "pretrained=ckpt,method=fastv,budget=128,fastv_layer=2",
        "fastv-128-fastv-layer-3-128": "pretrained=ckpt,method=fastv,budget=128,fastv_layer=3",
        "pdrop-64-64": "pretrained=ckpt,method=pdrop,budget=64",  # FastV's option is not a PDrop row's: one row each
        "pdrop-128-128": "pretrained=ckpt,method=pdrop,budget=128",
    }
    assert next(r for r in spec.rows if r.id == "fastv-64-fastv-layer-3-64").method == "FastV 64 fastv_layer=3"
    spec_path.write_text(spec_path.read_text().replace("budget: [64, 128]", "budget: [100]"))
    with pytest.raises(ValueError, match="method=pdrop,budget=100: PDrop presets are"):
        grid.plan(load_spec(spec_path), tmp_path, {})


def test_table2_selection_rows_keep_their_budget_per_view() -> None:
    spec = load_spec(resolve_spec_path("2"))
    rows = {r.id: r for r in spec.rows}
    for name, cls in (("divprune", DivPruneConfig), ("vispruner", VisPrunerConfig), ("cdpruner", CDPrunerConfig)):
        per_view = {t: _row_config(spec, rows[f"{name}-{t}"]) for t in (640, 320, 160)}
        assert {t: (type(c), 5 * c.tokens) for t, c in per_view.items()} == {t: (cls, t) for t in (640, 320, 160)}


def test_figures_published_elsewhere_render_as_ours_over_published(tmp_path: Path) -> None:
    spec = load_spec(resolve_spec_path("1"))
    assert {(f.method, f.tokens, f.avg, f.harness) for f in spec.published} == {
        ("CDPruner", 64, 97.0, "CDPruner"), ("DivPrune", 64, 94.7, "CDPruner"), ("VisionZip", 64, 94.4, "CDPruner"),
        ("VisPruner", 64, 96.6, "VisPruner"),
    }  # fmt: skip
    for row_id, gqa in (("vanilla-576", 0.62), ("cdpruner-64", 0.6), ("visionzip-64", 0.55)):
        folder = tmp_path / row_id / "gqa" / "llava-v1.5-7b"
        folder.mkdir(parents=True)
        (folder / "20260101_000000_results.json").write_text(json.dumps(_lmms_results({"gqa": {"exact_match": gqa}})))
    table = _rows_by_key(build_table(spec, collect(spec, tmp_path)))
    ours = {key: 100 * gqa / 0.62 for key, gqa in ((("CDPruner", 64), 0.6), (("VisionZip", 64), 0.55))}
    marks = {f.method: tables.render.mark(spec, f) for f in spec.published}
    text = markdown(spec, list(table.values()))
    assert f"| {ours[('CDPruner', 64)]:.1f} (1/11) / 97.0{marks['CDPruner']} |" in text  # ours / published
    assert f"| {ours[('VisionZip', 64)]:.1f} (1/11) / 94.0; 94.4{marks['VisionZip']} |" in text  # the paper's, then
    assert f"| DivPrune | 64 | {' | '.join(['— / —'] * 11)} | — / 94.7{marks['DivPrune']} |" in text  # not run yet
    assert f"- {marks['VisPruner']} VisPruner at 64 tokens: Avg 96.6 % in VisPruner's harness" in text
    with open(write_csv(spec, list(table.values()), tmp_path / "t.csv"), newline="") as handle:
        lines = [line for line in csv.DictReader(handle) if line["column"] == "Avg % (CDPruner's harness)"]
    cdpruner = next(line for line in lines if line["method"] == "CDPruner")
    assert float(cdpruner["ours"]) == pytest.approx(ours[("CDPruner", 64)]) and float(cdpruner["paper"]) == 97.0
    assert float(cdpruner["delta"]) == pytest.approx(ours[("CDPruner", 64)] - 97.0)
    assert len(lines) == 3 and "issue 27" in cdpruner["flag"]
    plot(spec, list(table.values()), tmp_path / "t.png")


def test_a_published_figure_needs_its_source(tmp_path: Path) -> None:
    spec_path = tmp_path / "s.yaml"
    base = (
        "name: s\ntitle: t\nmodel: {pretrained: ckpt}\nbaseline: {method: vanilla, tokens: 576}\n"
        "benchmarks:\n  - {column: VQA, task: localvqa, metric: exact_match}\npublished:\n"
    )
    spec_path.write_text(base + "  - {method: X, tokens: 64, avg: 95.0, harness: X}\n")
    with pytest.raises(ValueError, match=r"lacks \['source'\]"):
        load_spec(spec_path)
    spec_path.write_text(base + "  - {method: X, tokens: 64, avg: 0.95, harness: X, source: ''}\n")
    with pytest.raises(ValueError, match="needs its harness and source"):
        load_spec(spec_path)
    spec_path.write_text(base + "  - {method: X, tokens: 64, avg: 195, harness: X, source: a paper}\n")
    with pytest.raises(ValueError, match=r"Avg is a % in \(0, 100\], got 195.0"):
        load_spec(spec_path)


def test_the_multiturn_spec_and_its_drop_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_spec(ROOT / "eval/tables/multiturn.yaml")
    assert spec.multiturn == ("Turn 2", "Alone") and spec.tasks == ("pairs", "pairs_single")
    modes = {r.id: ModelOptions.from_kwargs(**{"pretrained": "p", **r.model_args}).multiturn for r in spec.rows}
    assert modes["fastv-cache-64"] == "cache" and modes["cdpruner-reprefill-64"] == "reprefill"
    assert {_row_config(spec, r).name for r in spec.rows if r.model_args.get("method") not in (None, "visionzip")} == {
        "fastv", "pdrop", "sparsevlm", "divprune", "vispruner", "cdpruner"
    }  # fmt: skip
    for row_id, turn2, alone in (("fastv-cache-64", 0.5, 0.625), ("fastv-reprefill-64", 0.6, 0.625)):
        for task, value in (("pairs", turn2), ("pairs_single", alone)):
            folder = tmp_path / row_id / task / "llava-v1.5-7b"
            folder.mkdir(parents=True)
            results = _lmms_results({task: {"exact_match": value}})
            (folder / "20260101_000000_results.json").write_text(json.dumps(results))
    rows = {r.method: r for r in turn_rows(spec, collect(spec, tmp_path))}
    assert rows["FastV (cache)"].drop == pytest.approx(-12.5) and rows["FastV (reprefill)"].mode == "reprefill"
    assert rows["VisionZip"].drop is None  # not run
    text = tables_cli.main(["--spec", str(ROOT / "eval/tables/multiturn.yaml"), "--results", str(tmp_path)])
    assert "| FastV (cache) | 64 | cache | 62.5 | 50.0 | -12.5 |" in text
    assert "| FastV (reprefill) | 64 | reprefill | 62.5 | 60.0 | -2.5 |" in text
    broken = tmp_path / "broken.yaml"
    broken.write_text((ROOT / "eval/tables/multiturn.yaml").read_text().replace("alone: Alone", "alone: Single"))
    with pytest.raises(ValueError, match=r"must name two of the columns \['Turn 2', 'Alone'\]"):
        load_spec(broken)
