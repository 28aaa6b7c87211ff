"""The instruction a text-conditioned selection (CDPruner) reads for a request: its question without the benchmark's
answer-format suffix; the suffixes are data (``eval/tasks/answer_formats.yaml``)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path

import yaml

from llava.constants import DEFAULT_IMAGE_TOKEN

ANSWER_FORMATS = Path(__file__).resolve().parent / "tasks" / "answer_formats.yaml"  # not a task: lmms-eval skips it


@cache
def answer_suffixes(path: Path = ANSWER_FORMATS) -> tuple[str, ...]:
    """The answer-format suffixes listed in ``path``, longest first (so a suffix is never cut before a longer one that
    ends with it)."""
    data = yaml.safe_load(path.read_text()) or {}
    texts = [str(entry["text"]) for entry in data.get("suffixes") or []]
    if not texts or any(not text.strip() for text in texts):
        raise ValueError(f"{path}: expected a non-empty list 'suffixes' of {{text, used_by}} entries with text")
    return tuple(sorted(texts, key=len, reverse=True))


def instruction_of(context: str, suffixes: Sequence[str] | None = None) -> str:
    """``context`` without ``<image>`` tokens and without the answer-format suffixes at its end (any number of them,
    in any order), stripped: ``"<image>\\nWhat colour?\\nAnswer the question using a single word or phrase."`` ->
    ``"What colour?"``. A context that is only a suffix stays as it is (the instruction is never empty)."""
    suffixes = answer_suffixes() if suffixes is None else tuple(suffixes)
    text = context.replace(DEFAULT_IMAGE_TOKEN, "").strip()
    cut = True
    while cut:
        cut = False
        for suffix in suffixes:
            stripped = suffix.strip()
            if text.endswith(stripped) and text[: -len(stripped)].strip():
                text, cut = text[: -len(stripped)].rstrip(), True
                break
    return text


def instructions_for(contexts: Sequence[str]) -> list[str]:
    """One instruction per request (per row of a batch), as :func:`instruction_of` makes it."""
    return [instruction_of(context) for context in contexts]
