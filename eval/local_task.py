"""Local lmms-eval tasks from LLaVA-format JSON (image, question, answer), scored by exact match; easy-VQA export.

A task is a folder holding ``<task>.yaml`` and ``<task>.jsonl`` (one question per line, absolute image paths); the
YAML points lmms-eval's ``!function`` hooks at this module, so nothing is downloaded::

    python -m eval.local_task easy-vqa --out playground/eval/tasks/easyvqa --max-images 200
    python -m eval.local_task from-json --data items.json --image-folder images/ --out DIR --task mytask
    python -m lmms_eval --model llava_visionzip --model_args pretrained=P,budget=64 \
        --tasks easyvqa --include_path playground/eval/tasks/easyvqa --output_path playground/eval/runs/x

Input items follow LLaVA's training format: ``{"id", "image": "rel/path.png" (or a list of paths),
"conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}, ...]}``; each
(human, gpt) pair becomes one question about the item's image(s). An optional ``"choices"`` list (or
``--multiple-choice`` with the answers seen in the file) makes a multiple-choice task scored by log-likelihood.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from llava.constants import DEFAULT_IMAGE_TOKEN

logger = logging.getLogger(__name__)

SHORT_ANSWER_PROMPT = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's VQA prompt
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


# --- hooks named by the generated YAML (lmms-eval imports them by module path) --------------------------------------
def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The question's images, opened as RGB."""
    images = []
    for path in doc["images"]:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    """``pre_prompt + question + post_prompt`` (the prompts from the task's ``lmms_eval_specific_kwargs``)."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces: ``"The Circle."`` -> ``"circle"``."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def process_results(doc: dict[str, Any], results: Sequence[str]) -> dict[str, float]:
    """``exact_match``: 1.0 when the normalised answer equals the normalised reference, else 0.0."""
    return {"exact_match": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}


def doc_to_choice(doc: dict[str, Any]) -> list[str]:
    """The candidate answers of a multiple-choice question."""
    return list(doc["choices"])


def doc_to_target_index(doc: dict[str, Any]) -> int:
    """Index of the reference answer among the choices."""
    return list(doc["choices"]).index(doc["answer"])


# --- reading LLaVA-format items ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Question:
    """One question of a local task: absolute image paths, text without ``<image>`` tokens, reference answer."""

    question_id: str
    images: tuple[str, ...]
    question: str
    answer: str
    choices: tuple[str, ...] = ()

    def with_choices(self, choices: Sequence[str]) -> Question:
        """The same question, multiple choice among ``choices``."""
        return Question(self.question_id, self.images, self.question, self.answer, tuple(choices))

    def to_doc(self) -> dict[str, Any]:
        """The JSONL line lmms-eval loads (``choices`` only for multiple choice)."""
        doc = {"question_id": self.question_id, "images": list(self.images), "question": self.question}
        doc["answer"] = self.answer
        if self.choices:
            doc["choices"] = list(self.choices)
        return doc


def _item_questions(item: dict[str, Any], image_folder: Path, index: int) -> list[Question]:
    """The (human, gpt) pairs of one LLaVA item as questions."""
    images = item.get("image") or []
    images = [images] if isinstance(images, str) else list(images)
    paths = tuple(str((image_folder / p).resolve()) for p in images)
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"item {item.get('id', index)}: image {path} not found")
    turns = item.get("conversations") or []
    if len(turns) % 2 or any(t.get("from") != ("human", "gpt")[i % 2] for i, t in enumerate(turns)):
        raise ValueError(f"item {item.get('id', index)}: conversations must alternate human, gpt; got {turns!r}")
    choices = tuple(item.get("choices") or ())
    questions = []
    for k in range(0, len(turns), 2):
        text = turns[k]["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
        answer = turns[k + 1]["value"].strip()
        if choices and answer not in choices:
            raise ValueError(f"item {item.get('id', index)}: answer {answer!r} is not among its choices {choices}")
        questions.append(Question(f"{item.get('id', index)}_{k // 2}", paths, text, answer, choices))
    return questions


def read_llava_items(data: str | Path, image_folder: str | Path | None = None) -> list[Question]:
    """Questions from a LLaVA-format JSON list (or JSONL); image paths are relative to ``image_folder``."""
    data = Path(data)
    folder = Path(image_folder) if image_folder is not None else data.parent
    text = data.read_text()
    items = [json.loads(line) for line in text.splitlines() if line.strip()] if data.suffix == ".jsonl" else None
    items = items if items is not None else json.loads(text)
    if not isinstance(items, list):
        raise ValueError(f"{data}: expected a JSON list of LLaVA items, got {type(items).__name__}")
    return [q for i, item in enumerate(items) for q in _item_questions(item, folder, i)]


# --- writing the task -------------------------------------------------------------------------------------------------
class _Function(str):
    """A YAML ``!function`` reference."""


class _TaskDumper(yaml.SafeDumper):
    """SafeDumper that writes :class:`_Function` values as ``!function module.name`` (lmms-eval's tag)."""


_TaskDumper.add_representer(_Function, lambda dumper, value: dumper.represent_scalar("!function", str(value)))
# lmms-eval imports the module by name when no such .py file sits beside the YAML (not __name__: may be __main__)
_HOOKS = "eval.local_task"


def task_config(task: str, docs: Path, multiple_choice: bool, max_new_tokens: int, post_prompt: str) -> dict:
    """The lmms-eval task dictionary (generate_until + exact match, or multiple_choice + accuracy)."""
    config: dict[str, Any] = {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(docs.resolve())}},
        "test_split": "test",
        "doc_to_visual": _Function(f"{_HOOKS}.doc_to_visual"),
        "doc_to_text": _Function(f"{_HOOKS}.doc_to_text"),
        "lmms_eval_specific_kwargs": {"default": {"pre_prompt": "", "post_prompt": post_prompt}},
        "metadata": {"version": 0.0, "source": "eval.local_task"},
    }
    if multiple_choice:
        config |= {
            "output_type": "multiple_choice",
            "doc_to_choice": _Function(f"{_HOOKS}.doc_to_choice"),
            "doc_to_target": _Function(f"{_HOOKS}.doc_to_target_index"),
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
    else:
        config |= {
            "output_type": "generate_until",
            "doc_to_target": "answer",
            "process_results": _Function(f"{_HOOKS}.process_results"),
            "generation_kwargs": {"max_new_tokens": max_new_tokens, "temperature": 0, "do_sample": False},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        }
    return config


def write_task(
    questions: Sequence[Question], out_dir: str | Path, task: str, multiple_choice: bool = False,
    max_new_tokens: int = 16, post_prompt: str = SHORT_ANSWER_PROMPT,
) -> Path:  # fmt: skip
    """Write ``<task>.jsonl`` and ``<task>.yaml`` into ``out_dir``; return the YAML's path.

    With ``multiple_choice`` every question needs choices (give them in the items, or see :func:`with_choices`).
    """
    if multiple_choice and not all(q.choices for q in questions):
        raise ValueError(f"task {task}: multiple_choice needs choices on every question")
    return write_task_files(
        questions, out_dir, task, lambda docs: task_config(task, docs, multiple_choice, max_new_tokens, post_prompt)
    )


def write_task_files(
    questions: Sequence[Any], out_dir: str | Path, task: str, config_for: Callable[[Path], dict[str, Any]]
) -> Path:
    """Check ``task``'s name, write each question's ``to_doc()`` to ``<task>.jsonl`` and ``config_for(jsonl path)``
    to ``<task>.yaml`` in ``out_dir``; return the YAML's path. Image and video tasks are written through it."""
    if not questions:
        raise ValueError(f"task {task}: no questions to write")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", task):
        raise ValueError(f"task name must be letters, digits, _ or -; got {task!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = out / f"{task}.jsonl"
    docs.write_text("".join(json.dumps(q.to_doc()) + "\n" for q in questions))
    path = out / f"{task}.yaml"
    path.write_text(yaml.dump(config_for(docs), Dumper=_TaskDumper, sort_keys=False, allow_unicode=True))
    logger.info("task %s: %d questions -> %s", task, len(questions), path)
    return path


def with_choices(questions: Sequence[Question], choices: Sequence[str] | None = None) -> list[Question]:
    """Questions given ``choices`` (default: every distinct answer, in first-seen order) where they have none."""
    pool = tuple(choices) if choices else tuple(dict.fromkeys(q.answer for q in questions))
    return [q if q.choices else q.with_choices(pool) for q in questions]


# --- easy-VQA (a small real VQA set shipped in a package) -------------------------------------------------------------
def export_easy_vqa(out_dir: str | Path, split: str = "test", max_images: int | None = None) -> tuple[Path, Path]:
    """Write easy-VQA's ``split`` as LLaVA-format JSON (one item per image, its questions as turns).

    Returns ``(json path, image folder)``; the images stay in the installed ``easy_vqa`` package.
    """
    try:
        import easy_vqa
    except ImportError as err:
        raise ImportError("easy-VQA needs its package: pip install 'llava-visionzip[eval]' (or easy-vqa)") from err
    if split not in ("train", "test"):
        raise ValueError(f"easy-VQA split must be 'train' or 'test', got {split!r}")
    texts, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    folders = {Path(p).parent for p in paths.values()}
    if len(folders) != 1:
        raise ValueError(f"easy-VQA {split} images are not in one folder: {sorted(map(str, folders))}")
    turns: dict[int, list[dict[str, str]]] = {}
    for text, answer, image_id in zip(texts, answers, image_ids, strict=True):
        turn = turns.setdefault(int(image_id), [])
        prefix = DEFAULT_IMAGE_TOKEN + "\n" if not turn else ""
        turn += [{"from": "human", "value": prefix + text}, {"from": "gpt", "value": answer}]
    ids = sorted(turns)[:max_images]
    items = [{"id": f"easyvqa_{split}_{i}", "image": Path(paths[i]).name, "conversations": turns[i]} for i in ids]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"easy_vqa_{split}.json"
    path.write_text(json.dumps(items, indent=1))
    count = sum(len(item["conversations"]) // 2 for item in items)
    logger.info("easy-VQA %s: %d images, %d questions -> %s", split, len(items), count, path)
    return path, folders.pop()


def build_parser() -> argparse.ArgumentParser:
    """``from-json`` (any LLaVA-format file) and ``easy-vqa`` subcommands."""
    parser = argparse.ArgumentParser(prog="python -m eval.local_task", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    from_json = sub.add_parser("from-json", help="a task from a LLaVA-format JSON/JSONL file")
    from_json.add_argument("--data", type=Path, required=True)
    from_json.add_argument("--image-folder", type=Path, default=None, help="default: the data file's folder")
    from_json.add_argument("--task", required=True)
    easy = sub.add_parser("easy-vqa", help="easy-VQA (pip package easy-vqa) as a task")
    easy.add_argument("--split", choices=("train", "test"), default="test")
    easy.add_argument("--max-images", type=int, default=None)
    easy.add_argument("--task", default=None, help="default: easyvqa_<split> (+_mc)")
    for p in (from_json, easy):
        p.add_argument("--out", type=Path, required=True, help="folder for the task (pass it as --include_path)")
        p.add_argument("--multiple-choice", action="store_true", help="score choices by log-likelihood")
        p.add_argument("--max-new-tokens", type=int, default=16)
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    """Write the task; print and return its YAML path."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "easy-vqa":
        data, folder = export_easy_vqa(args.out, args.split, args.max_images)
        task = args.task or f"easyvqa_{args.split}" + ("_mc" if args.multiple_choice else "")
    else:
        data, folder, task = args.data, args.image_folder, args.task
    questions = read_llava_items(data, folder)
    if args.multiple_choice:
        questions = with_choices(questions)
    path = write_task(questions, args.out, task, args.multiple_choice, args.max_new_tokens)
    print(path)
    return path


if __name__ == "__main__":
    main()
