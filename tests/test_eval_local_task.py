"""eval.local_task: LLaVA-format JSON -> an lmms-eval task (YAML + JSONL), exact-match scoring, easy-VQA export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers.eval_items import SHAPES, write_llava_items
from PIL import Image

from eval import local_task
from eval.local_task import (
    SHORT_ANSWER_PROMPT,
    Question,
    doc_to_text,
    doc_to_visual,
    normalize_answer,
    process_results,
    read_llava_items,
    with_choices,
    write_task,
)


class _Loader(yaml.SafeLoader):
    """Reads lmms-eval's ``!function`` tags as plain strings."""


_Loader.add_constructor("!function", lambda loader, node: "!function " + loader.construct_scalar(node))


def test_items_become_questions(tmp_path: Path) -> None:
    questions = read_llava_items(write_llava_items(tmp_path / "data"))
    assert [q.question_id for q in questions[:2]] == ["red_0", "red_1"]
    assert questions[0].question == "What colour is the image?" and questions[0].answer == "red"
    assert questions[1].images == questions[0].images and Path(questions[0].images[0]).is_absolute()
    image = doc_to_visual(questions[0].to_doc())[0]
    assert image.mode == "RGB" and image.getpixel((0, 0)) == SHAPES["red"]


def test_task_yaml_names_the_hooks_and_the_local_file(tmp_path: Path) -> None:
    questions = read_llava_items(write_llava_items(tmp_path / "data"))
    path = write_task(questions, tmp_path / "task", "colours")
    config = yaml.load(path.read_text(), Loader=_Loader)
    assert config["task"] == "colours" and config["output_type"] == "generate_until"
    assert config["dataset_path"] == "json" and config["test_split"] == "test"
    docs = Path(config["dataset_kwargs"]["data_files"]["test"])
    answers = [json.loads(line)["answer"] for line in docs.read_text().splitlines()]
    assert answers == ["red", "no", "blue", "no", "green", "no"]
    assert config["process_results"] == "!function eval.local_task.process_results"
    for hook in ("doc_to_visual", "doc_to_text", "process_results"):
        assert callable(getattr(local_task, config[hook].split(".")[-1]))
    assert config["lmms_eval_specific_kwargs"]["default"]["post_prompt"] == SHORT_ANSWER_PROMPT


def test_multiple_choice_task(tmp_path: Path) -> None:
    questions = with_choices(read_llava_items(write_llava_items(tmp_path / "data")))
    assert questions[0].choices == ("red", "no", "blue", "green")
    path = write_task(questions, tmp_path / "task", "colours_mc", multiple_choice=True)
    config = yaml.load(path.read_text(), Loader=_Loader)
    assert config["output_type"] == "multiple_choice" and config["metric_list"][0]["metric"] == "acc"
    doc = questions[2].to_doc()
    assert local_task.doc_to_choice(doc)[local_task.doc_to_target_index(doc)] == "blue"
    with pytest.raises(ValueError, match="choices on every question"):
        write_task(read_llava_items(tmp_path / "data/items.json"), tmp_path / "t2", "x", multiple_choice=True)


def test_exact_match_normalisation() -> None:
    doc = {"answer": "Circle"}
    assert process_results(doc, ["The circle."]) == {"exact_match": 1.0}
    assert process_results(doc, [" a  CIRCLE "]) == {"exact_match": 1.0}
    assert process_results(doc, ["a red circle"]) == {"exact_match": 0.0}
    assert normalize_answer("Yes, it is!") == "yes it is"
    assert doc_to_text({"question": "Q?"}, {"pre_prompt": "> ", "post_prompt": " !"}) == "> Q? !"


def test_bad_items_are_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": 1, "image": "missing.png", "conversations": []}]))
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        read_llava_items(bad)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    bad.write_text(json.dumps([{"image": "x.png", "conversations": [{"from": "gpt", "value": "a"}]}]))
    with pytest.raises(ValueError, match="alternate"):
        read_llava_items(bad)
    with pytest.raises(ValueError, match="task name"):
        write_task([Question("q", (), "q", "a")], tmp_path, "bad name")


def test_easy_vqa_export_and_cli(tmp_path: Path) -> None:
    pytest.importorskip("easy_vqa")
    path = local_task.main(["easy-vqa", "--out", str(tmp_path), "--max-images", "2"])
    config = yaml.load(path.read_text(), Loader=_Loader)
    docs = [json.loads(line) for line in Path(config["dataset_kwargs"]["data_files"]["test"]).read_text().splitlines()]
    assert config["task"] == "easyvqa_test" and len({d["images"][0] for d in docs}) == 2
    assert all(Path(d["images"][0]).is_file() and d["answer"] for d in docs)
    items = json.loads((tmp_path / "easy_vqa_test.json").read_text())
    assert items[0]["conversations"][0]["value"].startswith("<image>\n")
