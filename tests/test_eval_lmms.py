"""llava_visionzip through the real lmms-eval CLI on a tiny checkpoint and a local task, with and without VisionZip.

The grid runner launches ``python -m lmms_eval`` once per (row, task) on a generated task (no hub, no network); the
answers lmms-eval records must be the ones the Python API gives, and the renderer must read its results files.
Skipped where lmms-eval is not installed (``pip install -e '.[eval]'``; CI installs it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

from helpers.eval_items import write_llava_items

from eval import grid
from eval.local_task import (
    SHORT_ANSWER_PROMPT,
    Question,
    doc_to_text,
    doc_to_visual,
    read_llava_items,
    write_task,
)
from eval.options import ModelOptions
from eval.runner import LlavaRunner
from eval.tables import build_table, collect, folder_results, load_spec, markdown
from llava.tiny import write_tiny_llava

MAX_NEW = 8  # the local task's max_new_tokens (random weights never stop early)
CHOICES = ("red", "blue", "green", "no")


def _tasks(root: Path, ckpt: Path) -> tuple[Path, list[str], list[list[float]]]:
    """Write the local tasks; half the references are the vanilla model's own greedy answers, half never match.

    Returns the task folder, the vanilla answers, and the VisionZip model's loss on each choice (lmms-eval's llava's).
    """
    questions = read_llava_items(write_llava_items(root / "data"))
    contexts = [doc_to_text(q.to_doc(), {"pre_prompt": "", "post_prompt": SHORT_ANSWER_PROMPT}) for q in questions]
    visuals = [doc_to_visual(q.to_doc()) for q in questions]
    vanilla = LlavaRunner.load(ModelOptions(pretrained=str(ckpt)), "cpu")
    answers = vanilla.generate(contexts, visuals, {"max_new_tokens": MAX_NEW, "temperature": 0, "do_sample": False})
    graded = [
        Question(q.question_id, q.images, q.question, answer if i % 2 == 0 else "never this")
        for i, (q, answer) in enumerate(zip(questions, answers, strict=True))
    ]
    folder = root / "tasks"
    write_task(graded, folder, "localvqa", max_new_tokens=MAX_NEW)
    write_task([q.with_choices(CHOICES) for q in questions], folder, "localvqa_mc", multiple_choice=True)
    zipped = LlavaRunner.load(ModelOptions(pretrained=str(ckpt), dominant=8, contextual=2), "cpu")
    n = len(CHOICES)
    scores = [
        [score.loss for score in zipped.loglikelihood([c] * n, [f" {k}" for k in CHOICES], [v] * n)]
        for c, v in zip(contexts, visuals, strict=True)
    ]
    return folder, answers, scores


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The VisionZip row on both tasks (one run), vanilla on the generation task, through lmms-eval's CLI."""
    root = tmp_path_factory.mktemp("lmms")
    ckpt = write_tiny_llava(root / "tiny")
    _, answers, scores = _tasks(root, ckpt)
    spec_path = root / "mini.yaml"
    spec_path.write_text(
        "name: mini\ntitle: tiny LLaVA on a local task\ninclude_paths: [tasks]\n"
        f"model: {{pretrained: {ckpt}, device: cpu}}\nbaseline: {{method: vanilla, tokens: 64}}\n"
        "rows:\n  - {method: VisionZip, tokens: 10, model_args: {dominant: 8, contextual: 2}}\n"
        "benchmarks:\n  - {column: VQA, task: localvqa, metric: exact_match, scale: 100}\n"
        "  - {column: MC, task: localvqa_mc, metric: acc, scale: 100}\n"
    )
    spec, out = load_spec(spec_path), root / "results"
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf")}.items():
            env.setenv(name, value)
        env.chdir(root)  # whatever lmms-eval writes beside it stays in tmp
        first = grid.run_grid(spec, out, batch_size=8, rows=["visionzip-10"], group=True)  # both tasks, one run
        second = grid.run_grid(spec, out, batch_size=4, rows=["vanilla-64"], tasks=["localvqa"])
        again = grid.run_grid(spec, out, dry_run=True)
    return {"spec": spec, "out": out, "answers": answers, "scores": scores, "runs": (first, second, again)}


def test_plugin_is_found_through_the_entry_point() -> None:
    from importlib.metadata import entry_points

    from lmms_eval.models import get_model

    from eval.llava_visionzip import LlavaVisionZip

    assert "llava_visionzip" in {ep.name for ep in entry_points(group="lmms_eval.models")}
    assert get_model("llava_visionzip") is LlavaVisionZip


def test_grid_runs_then_resumes(run: dict) -> None:
    first, second, again = run["runs"]
    assert [c.tasks for c in first["ran"]] == [("localvqa", "localvqa_mc")] and not first["failed"]
    assert [c.tasks for c in second["ran"]] == [("localvqa",)] and not second["failed"]
    assert [(c.row.id, c.task) for c in again["planned"]] == [("vanilla-64", "localvqa_mc")]  # the rest is done
    assert (run["out"] / "visionzip-10" / "localvqa+localvqa_mc" / "lmms_eval.log").is_file()


def test_lmms_eval_records_the_python_apis_answers(run: dict) -> None:
    samples_file = next((run["out"] / "vanilla-64" / "localvqa").rglob("*_samples_localvqa.jsonl"))
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert [s["filtered_resps"] for s in samples] == run["answers"]
    assert folder_results(run["out"] / "vanilla-64")["localvqa"]["exact_match"] == pytest.approx(0.5)
    results_file = next((run["out"] / "visionzip-10").rglob("*_results.json"))
    assert "dominant=8" in json.loads(results_file.read_text())["config"]["model_args"]


def test_multiple_choice_goes_through_loglikelihood(run: dict) -> None:
    samples_file = next((run["out"] / "visionzip-10").rglob("*_samples_localvqa_mc.jsonl"))
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    nll = [[float(value) for value, _ in s["filtered_resps"]] for s in samples]
    assert all(len(row) == len(CHOICES) and min(row) > 0 for row in nll)  # mean negative log-likelihoods
    assert nll == [[pytest.approx(loss, rel=1e-4) for loss in row] for row in run["scores"]]
    accuracy = folder_results(run["out"] / "visionzip-10")["localvqa_mc"]["acc"]
    gold = [int(s["target"]) for s in samples]  # lmms-eval records the reference's index among the choices
    expected = sum(min(range(len(row)), key=row.__getitem__) == g for row, g in zip(nll, gold, strict=True))
    assert accuracy == pytest.approx(expected / len(samples))


def test_renderer_reads_the_runs(run: dict) -> None:
    spec = run["spec"]
    ours = collect(spec, run["out"])
    assert ours["vanilla-64"] == {"VQA": pytest.approx(50.0)}
    assert set(ours["visionzip-10"]) == {"VQA", "MC"}
    table = build_table(spec, ours)
    assert [(r.method, r.tokens) for r in table] == [("vanilla", 64), ("VisionZip", 10)]
    assert table[0].avg_ours == pytest.approx(100.0)
    assert table[1].avg_ours == pytest.approx(ours["visionzip-10"]["VQA"] * 2) and table[1].avg_ours_count == 1
    assert "| VisionZip | 10 |" in markdown(spec, table)


def test_textvqa_task_with_ocr_tokens_loads() -> None:
    from lmms_eval.utils import load_yaml_config

    config = load_yaml_config(str(Path(__file__).resolve().parents[1] / "eval/tasks/textvqa_val_llava.yaml"))
    doc = {"question": "what is written?", "ocr_tokens": ["stop", "sign"]}
    text = config["doc_to_text"](doc, config["lmms_eval_specific_kwargs"]["default"])
    assert text == f"What is written?\nReference OCR token: stop, sign{SHORT_ANSWER_PROMPT}"
    assert config["task"] == "textvqa_val_llava" and callable(config["process_results"])
