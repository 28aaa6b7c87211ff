"""eval.grid --in-process: every cell in one process gives what one lmms-eval CLI subprocess per cell gives.

A 2-row spec (vanilla + VisionZip) on a tiny checkpoint and a local task runs both ways into two folders; the
metrics, the answers and the per-question scores must agree, the vanilla answers must be the Python API's, a cell
whose checkpoint is missing fails alone, and a rerun plans only what is not done. Skipped without lmms-eval.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

from helpers.eval_items import write_llava_items

from eval import grid
from eval.local_task import SHORT_ANSWER_PROMPT, Question, doc_to_text, doc_to_visual, read_llava_items, write_task
from eval.options import ModelOptions
from eval.runner import LlavaRunner
from eval.tables import folder_results, load_spec
from visionzip.baselines import layer_average, visual_counts

MAX_NEW = 8  # the task's max_new_tokens (random weights never stop early)
LIMIT = 4  # questions evaluated of the task's six
ROWS = ["vanilla-64", "visionzip-10", "fastv-40"]
FASTV = "{method: fastv, budget: 40, fastv_layer: 1}"  # 2 layers, 64 tokens: keep 16 after layer 0 to average 40


def _task(root: Path, ckpt: Path) -> tuple[Path, list[str]]:
    """Write ``localvqa``: even questions' references are the vanilla model's greedy answers, odd ones never match.

    Returns the task folder and the vanilla answers of the first ``LIMIT`` questions (the Python API's).
    """
    questions = read_llava_items(write_llava_items(root / "data"))[:LIMIT]
    contexts = [doc_to_text(q.to_doc(), {"pre_prompt": "", "post_prompt": SHORT_ANSWER_PROMPT}) for q in questions]
    vanilla = LlavaRunner.load(ModelOptions(pretrained=str(ckpt)), "cpu")
    kwargs = {"max_new_tokens": MAX_NEW, "temperature": 0, "do_sample": False}
    answers = vanilla.generate(contexts, [doc_to_visual(q.to_doc()) for q in questions], kwargs)
    graded = [
        Question(q.question_id, q.images, q.question, answer if i % 2 == 0 else "never this")
        for i, (q, answer) in enumerate(zip(questions, answers, strict=True))
    ]
    write_task(graded, root / "tasks", "localvqa", max_new_tokens=MAX_NEW)
    return root / "tasks", answers


def _samples(folder: Path) -> dict[int, dict]:
    """The cell's ``*_samples_localvqa.jsonl`` lines by doc_id."""
    (path,) = folder.rglob("*_samples_localvqa.jsonl")
    return {s["doc_id"]: s for s in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_pair: dict[str, Path]) -> dict:
    """The spec in process (with a third row whose checkpoint was never written) and through the CLI."""
    root = tmp_path_factory.mktemp("grid_inprocess")
    ckpt = tiny_pair["v15"]
    _, answers = _task(root, ckpt)
    spec_path, zipped = root / "mini.yaml", "{dominant: 8, contextual: 2}"
    spec_path.write_text(
        "name: mini\ntitle: tiny LLaVA on a local task\ninclude_paths: [tasks]\n"
        f"model: {{pretrained: {ckpt}, device: cpu}}\nbaseline: {{method: vanilla, tokens: 64}}\n"
        f"rows:\n  - {{method: VisionZip, tokens: 10, model_args: {zipped}}}\n"
        f"  - {{method: FT, tokens: 10, pretrained: {root / 'not-trained-yet'}, model_args: {zipped}}}\n"
        f"  - {{method: FastV, tokens: 40, model_args: {FASTV}}}\n"
        "benchmarks:\n  - {column: VQA, task: localvqa, metric: exact_match, scale: 100}\n"
    )
    spec = load_spec(spec_path)
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf")}.items():
            env.setenv(name, value)
        env.chdir(root)  # whatever lmms-eval writes beside it stays in tmp
        inproc = grid.run_grid(spec, root / "inproc", batch_size=2, limit=LIMIT, in_process=True)
        rerun = grid.run_grid(spec, root / "inproc", batch_size=2, limit=LIMIT, in_process=True, rows=ROWS)
        plan_all = grid.run_grid(spec, root / "inproc", limit=LIMIT, in_process=True, dry_run=True)
        cli = grid.run_grid(spec, root / "cli", batch_size=2, limit=LIMIT, rows=ROWS)
    return {"root": root, "answers": answers, "runs": (inproc, rerun, plan_all, cli)}


def test_in_process_runs_the_cells_and_reports_the_failed_one(runs: dict) -> None:
    inproc, rerun, plan_all, cli = runs["runs"]
    assert [c.row.id for c in inproc["ran"]] == ROWS and [c.row.id for c in cli["ran"]] == ROWS
    assert [c.row.id for c in inproc["failed"]] == ["ft-10"] and not cli["failed"]
    log = (runs["root"] / "inproc/ft-10/localvqa/lmms_eval.log").read_text()
    assert "Traceback" in log and "FileNotFoundError" in log and "not-trained-yet" in log
    assert folder_results(runs["root"] / "inproc/ft-10") == {}
    assert rerun == {"ran": [], "failed": [], "planned": []}  # the two rows are done: nothing planned, nothing run
    assert [(c.row.id, c.task) for c in plan_all["planned"]] == [("ft-10", "localvqa")]  # only the failed cell
    assert "$ " in (runs["root"] / "inproc/vanilla-64/localvqa/lmms_eval.log").read_text()


def test_in_process_results_equal_the_cli_subprocess(runs: dict) -> None:
    root = runs["root"]
    for row in ROWS:
        ours, theirs = folder_results(root / "inproc" / row), folder_results(root / "cli" / row)
        assert ours["localvqa"] == pytest.approx(theirs["localvqa"]) and "exact_match" in ours["localvqa"]
        ours, theirs = _samples(root / "inproc" / row), _samples(root / "cli" / row)
        assert sorted(ours) == sorted(theirs) == list(range(LIMIT))
        assert {d: s["exact_match"] for d, s in ours.items()} == {d: s["exact_match"] for d, s in theirs.items()}
        assert {d: s["filtered_resps"] for d, s in ours.items()} == {d: s["filtered_resps"] for d, s in theirs.items()}
    (ours,) = (root / "inproc/visionzip-10/localvqa").rglob("*_results.json")
    (theirs,) = (root / "cli/visionzip-10/localvqa").rglob("*_results.json")
    assert ours.parent.name == theirs.parent.name  # the folder lmms-eval names after the model
    configs = [json.loads(path.read_text())["config"] for path in (ours, theirs)]
    keys = ("model", "model_args", "batch_size", "limit")
    assert [{k: c[k] for k in keys} for c in configs] == [{k: configs[1][k] for k in keys}] * 2


def test_in_process_records_the_python_apis_answers(runs: dict) -> None:
    samples = _samples(runs["root"] / "inproc/vanilla-64")
    assert [samples[d]["filtered_resps"] for d in range(LIMIT)] == runs["answers"]
    assert [samples[d]["exact_match"] for d in range(LIMIT)] == [1.0, 0.0] * (LIMIT // 2)


def test_in_process_takes_no_launcher(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(
        "name: s\ntitle: t\nmodel: {pretrained: x}\nbaseline: {method: vanilla, tokens: 64}\nrows: []\n"
        "benchmarks:\n  - {column: VQA, task: localvqa, metric: exact_match}\n"
    )
    argv = ["--spec", str(spec), "--out", str(tmp_path / "o"), "--in-process", "--launcher", "accelerate launch"]
    with pytest.raises(ValueError, match="in-process runs take no launcher"):
        grid.main(argv)


def test_the_achieved_visual_tokens_are_in_the_results_and_the_log(runs: dict) -> None:
    """The FastV row's results file records its nominal budget and the average it achieved, whichever way it ran;
    rows without an in-LLM method record none."""
    expected = layer_average(visual_counts(64, {0: 16}, 2))  # layers take in 64, 16 and put out 16, 16
    assert expected == (40.0, 16.0)
    for way in ("inproc", "cli"):
        (path,) = (runs["root"] / way / "fastv-40/localvqa").rglob("*_results.json")
        summary = json.loads(path.read_text())["config"]["visual_tokens"]
        assert (summary["method"], summary["nominal_budget"], summary["multiturn"]) == ("fastv", 40, "cache")
        assert summary["config"] == {"method": "fastv", "layer": 1, "budget": 40, "keep": None, "ratio": None,
                                     "positions": "original"}  # fmt: skip
        assert (summary["layer_average_inputs"], summary["layer_average_outputs"]) == expected
        assert summary["requests"] + summary["requests_without_image"] == LIMIT and summary["requests"] > 0
        log = (runs["root"] / way / "fastv-40/localvqa/lmms_eval.log").read_text()
        assert "llava_visionzip visual tokens: fastv: nominal 40 visual tokens (layer-average); achieved 40.0" in log
        (plain,) = (runs["root"] / way / "visionzip-10/localvqa").rglob("*_results.json")
        assert "visual_tokens" not in json.loads(plain.read_text())["config"]
