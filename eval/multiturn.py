"""Multi-turn local lmms-eval tasks: questions about one image asked in turn, the earlier ones answered by their
ground truth, the last one scored; the model plugin answers them as one chat in the run's ``multiturn`` mode.

The task format (what :func:`write_multiturn_task` writes; the miniature's generator writes the same). A task is a
folder holding ``<task>.yaml`` and ``<task>.jsonl``, one scored question per line::

    {"question_id": "shapes_17_1",
     "images": ["/abs/path/shapes_17.png"],
     "history": [{"question": "What colour is the circle?\\nAnswer the question using a single word or phrase.",
                  "answer": "red"}],
     "question": "What shape is in the bottom left corner?",
     "answer": "triangle"}

- ``images``: absolute paths; they belong to the first turn (the chat puts the ``<image>`` tokens before its text).
- ``history``: the earlier turns in order, each ``question`` as the user asked it (its answer-format suffix written
  out) and its ``answer``, the ground truth: the model's own earlier answers are never used, so turn 2 is scored on
  the same conversation for every method. Two-turn tasks have one entry; more are allowed.
- ``question`` and ``answer``: the scored turn, as in :mod:`eval.local_task` (the YAML's ``post_prompt`` is appended
  by ``doc_to_text``; scored by exact match after normalisation). A doc without ``history`` is a single-turn question.
- Beside it, ``<task>_single`` (same folder) holds the same scored questions without their history: each method's
  own single-turn accuracy on them, against which the turn-2 drop is measured.

How a conversation runs (``--model llava_visionzip``, :func:`answer_requests`): one
:class:`llava.serve.chat.ChatSession` per doc in the run's ``multiturn`` model arg. ``cache``: each earlier turn's
prompt is prefilled (a method chooses its tokens then, as when answering it), and the scored turn continues on that
KV cache, so in-LLM methods (FastV, PDrop, SparseVLM) and CDPruner keep the first turn's selection (CDPruner with
turn 1's question as its instruction). ``reprefill``: the scored turn runs the whole conversation again, so they
choose again for the latest question. VisionZip, DivPrune, VisPruner and no method answer the same in both modes.

Writing a task from LLaVA-format items (``{"id", "image", "conversations": [human, gpt, human, gpt, ...]}``; each
later (human, gpt) pair is scored with every pair before it as its history)::

    python -m eval.multiturn --data items.json --out playground/eval/tasks/pairs --task pairs
    python -m eval.multiturn --data vqa.json --pair-by-image --out ...   # a VQA set, its questions paired by image
    python -m lmms_eval --model llava_visionzip --model_args pretrained=P,method=fastv,budget=64,multiturn=cache \\
        --tasks pairs,pairs_single --include_path playground/eval/tasks/pairs --batch_size 1
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from eval.instructions import instruction_of
from eval.local_task import SHORT_ANSWER_PROMPT, Question, read_llava_items, task_config, write_task_files
from eval.runner import LlavaRunner, Visuals, cut_at_stops, generation_settings
from llava.conversation import get_conv_template
from llava.inference import stop_string
from llava.serve.chat import ChatSession

logger = logging.getLogger(__name__)

SINGLE_SUFFIX = "_single"  # the single-turn twin task's name: <task>_single
Turn = tuple[str, str]  # (question as asked, its ground-truth answer)


@dataclass(frozen=True)
class MultiTurnQuestion:
    """A scored question after earlier turns about the same images.

    Attributes:
        question_id: unique id; images: absolute paths (the first turn's).
        history: the earlier turns, (question as asked with its answer-format suffix, ground-truth answer).
        question, answer: the scored turn (the task's post_prompt is appended when asked).
    """

    question_id: str
    images: tuple[str, ...]
    history: tuple[Turn, ...]
    question: str
    answer: str

    def to_doc(self) -> dict[str, Any]:
        """The JSONL line lmms-eval loads (the format in the module docstring)."""
        doc = self.single().to_doc()
        doc["history"] = [{"question": q, "answer": a} for q, a in self.history]
        return doc

    def single(self) -> Question:
        """The scored question alone (its single-turn twin)."""
        return Question(self.question_id, self.images, self.question, self.answer)


def conversations(questions: Sequence[Question], post_prompt: str = SHORT_ANSWER_PROMPT) -> list[MultiTurnQuestion]:
    """From :func:`eval.local_task.read_llava_items`' questions (ids ``<item>_<k>``, in order): each item's question
    k >= 1 scored after its questions 0..k-1 answered by their ground truth (asked with ``post_prompt``)."""
    items: dict[str, list[Question]] = {}
    for question in questions:
        items.setdefault(question.question_id.rsplit("_", 1)[0], []).append(question)
    out = []
    for item, asked in items.items():
        if len(asked) < 2:
            raise ValueError(f"item {item}: a multi-turn question needs at least 2 (human, gpt) pairs, got 1")
        if any(q.choices for q in asked):
            raise ValueError(f"item {item}: multi-turn tasks are generated answers; got choices")
        history = tuple((q.question + post_prompt, q.answer) for q in asked)
        out += [
            MultiTurnQuestion(q.question_id, q.images, history[:k], q.question, q.answer)
            for k, q in enumerate(asked)
            if k
        ]
    return out


def pair_by_image(questions: Sequence[Question], post_prompt: str = SHORT_ANSWER_PROMPT) -> list[MultiTurnQuestion]:
    """Questions about the same images (any items, e.g. a VQA set with one question per item), paired in the order
    they come: the 1st and 2nd about an image make one conversation (the 2nd scored), the 3rd and 4th the next; an
    image's odd one out is left out. Nothing checks that a pair's questions ask about different parts of the image."""
    by_image: dict[tuple[str, ...], list[Question]] = {}
    for question in questions:
        by_image.setdefault(question.images, []).append(question)
    out = []
    for asked in by_image.values():
        for first, second in zip(asked[0::2], asked[1::2], strict=False):
            if first.choices or second.choices:
                raise ValueError(f"question {second.question_id}: multi-turn tasks are generated answers; got choices")
            history = ((first.question + post_prompt, first.answer),)
            out.append(MultiTurnQuestion(second.question_id, second.images, history, second.question, second.answer))
    if not out:
        raise ValueError(f"no two of the {len(questions)} questions share their images: nothing to pair")
    return out


def write_multiturn_task(
    questions: Sequence[MultiTurnQuestion], out_dir: str | Path, task: str, post_prompt: str = SHORT_ANSWER_PROMPT,
    max_new_tokens: int = 16,
) -> tuple[Path, Path]:  # fmt: skip
    """Write ``<task>`` (with history) and ``<task>_single`` (the scored questions alone) into ``out_dir``; return
    both YAML paths. Both are generated answers scored by exact match (:func:`eval.local_task.task_config`)."""
    if any(not q.history for q in questions):
        raise ValueError(f"task {task}: every multi-turn question needs a history (earlier turns); some have none")
    paths = []
    for name, docs in ((task, questions), (task + SINGLE_SUFFIX, [q.single() for q in questions])):
        config = lambda path, name=name: task_config(name, path, False, max_new_tokens, post_prompt)  # noqa: E731
        paths.append(write_task_files(docs, out_dir, name, config))
    return paths[0], paths[1]


def history_of(doc: dict[str, Any]) -> list[Turn]:
    """A doc's earlier turns (empty for a single-turn doc); ValueError for a malformed ``history``."""
    history = doc.get("history") or []
    if not isinstance(history, list) or any(
        not isinstance(t, dict) or {"question", "answer"} - set(t) for t in history
    ):
        raise ValueError(
            f"doc {doc.get('question_id')}: history must be a list of {{question, answer}}, got {history!r}"
        )
    return [(str(t["question"]), str(t["answer"])) for t in history]


def answer_conversation(
    runner: LlavaRunner, images: Visuals, history: Sequence[Turn], question: str, task_kwargs: dict[str, Any],
    multiturn: str,
) -> tuple[str, ChatSession]:  # fmt: skip
    """The answer to ``question`` after ``history`` (answered by its ground truth) about ``images``, as one chat in
    ``multiturn`` mode; the task's ``generation_kwargs`` decode it. Returns (answer cut at the stops, the session)."""
    settings = generation_settings(task_kwargs, runner.greedy, runner.max_new_tokens)
    if settings.kwargs.get("num_beams", 1) != 1:
        raise ValueError(
            f"multi-turn tasks decode one sequence: expected num_beams 1, got {settings.kwargs['num_beams']}"
        )
    conv = get_conv_template(runner.conv_template)
    rgb = [image.convert("RGB") for image in images if isinstance(image, Image.Image)]
    if len(rgb) != len(images):
        raise ValueError("multi-turn tasks take PIL images")
    session = ChatSession(runner.model, runner.tokenizer, runner.image_processor, conv, rgb, multiturn=multiturn)
    for asked, truth in history:  # CDPruner reads each question without its answer-format suffix
        session.ask(asked, answer=truth, instruction=instruction_of(asked))
    temperature = float(settings.kwargs.get("temperature") or 0.0)
    top_p, most = settings.kwargs.get("top_p"), settings.kwargs["max_new_tokens"]
    answer = session.ask(question, temperature, top_p, most, instruction=instruction_of(question))
    return cut_at_stops(answer, [*settings.stops, stop_string(conv)]), session


def answer_requests(
    runner: LlavaRunner, contexts: Sequence[str], visuals: Sequence[Visuals], histories: Sequence[Sequence[Turn]],
    task_kwargs: dict[str, Any], multiturn: str,
) -> list[str]:  # fmt: skip
    """Answers in order: requests with a history one chat each (:func:`answer_conversation`, recorded in the
    runner's tally), the others as one batch (:meth:`LlavaRunner.generate`)."""
    answers: list[str | None] = [None] * len(contexts)
    single = [i for i, history in enumerate(histories) if not history]
    if single:
        batch = runner.generate([contexts[i] for i in single], [visuals[i] for i in single], dict(task_kwargs))
        for i, answer in zip(single, batch, strict=True):
            answers[i] = answer
    for i, history in enumerate(histories):
        if history:
            answers[i], session = answer_conversation(runner, visuals[i], history, contexts[i], task_kwargs, multiturn)
            record_session(runner, session)
    return [a or "" for a in answers]


def record_session(runner: LlavaRunner, session: ChatSession) -> None:
    """Add a chat's visual tokens to the runner's tally: an in-LLM method's layer-average of its (last pruning)
    prefill, a selection's kept tokens."""
    if runner.tally is None:
        return
    if runner.tally.kind == "kept":
        runner.tally.add([(float(session.tokens_after), float(session.tokens_after)) if session.num_images else None])
    else:
        runner.tally.add([session.layer_average])


def build_parser() -> argparse.ArgumentParser:
    """``--data`` (LLaVA-format items), ``--out``, ``--task``."""
    parser = argparse.ArgumentParser(prog="python -m eval.multiturn", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="LLaVA-format JSON/JSONL, >= 2 pairs per item")
    parser.add_argument(
        "--pair-by-image", action="store_true", help="pair the questions about the same image(s) across items instead"
    )
    parser.add_argument("--image-folder", type=Path, default=None, help="default: the data file's folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for both tasks (pass it as --include_path)")
    parser.add_argument("--task", required=True, help="the multi-turn task's name; its twin is <task>_single")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    return parser


def main(argv: Sequence[str] | None = None) -> tuple[Path, Path]:
    """Write both tasks; print and return their YAML paths."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    asked = read_llava_items(args.data, args.image_folder)
    questions = pair_by_image(asked) if args.pair_by_image else conversations(asked)
    paths = write_multiturn_task(questions, args.out, args.task, max_new_tokens=args.max_new_tokens)
    print(*paths, sep="\n")
    return paths


if __name__ == "__main__":
    main()
