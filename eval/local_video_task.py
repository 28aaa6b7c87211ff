"""Local lmms-eval video tasks (video file, question, answer), scored by exact match; nothing is downloaded.

A task is a folder holding ``<task>.yaml`` and ``<task>.jsonl`` (one question per line, an absolute video path); the
YAML names this module's ``doc_to_visual`` (the video path, as lmms-eval's video tasks give it) and
:mod:`eval.local_task`'s text and scoring hooks::

    write_video_task([VideoQuestion("q0", "/data/clip.mp4", "What moves?", "ball")], "tasks/clips", "clipqa")
    python -m lmms_eval --model video_llava_visionzip --model_args pretrained=P,video_dominant=14,video_contextual=3 \
        --tasks clipqa --include_path tasks/clips --output_path runs/x
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eval.local_task import SHORT_ANSWER_PROMPT, _Function, task_config, write_task_files

_HOOKS = "eval.local_video_task"


def doc_to_visual(doc: dict[str, Any]) -> list[str]:
    """The question's video paths (the model reads the frames)."""
    return list(doc["videos"])


@dataclass(frozen=True)
class VideoQuestion:
    """One question about one video: absolute path, question text, reference answer."""

    question_id: str
    video: str
    question: str
    answer: str

    def to_doc(self) -> dict[str, Any]:
        """The JSONL line lmms-eval loads."""
        doc = {"question_id": self.question_id, "videos": [self.video], "question": self.question}
        return doc | {"answer": self.answer}


def write_video_task(
    questions: Sequence[VideoQuestion], out_dir: str | Path, task: str, max_new_tokens: int = 16,
    post_prompt: str = SHORT_ANSWER_PROMPT,
) -> Path:  # fmt: skip
    """Write ``<task>.jsonl`` and ``<task>.yaml`` (generate_until, exact match) into ``out_dir``; return the YAML."""
    missing = [q.video for q in questions if not Path(q.video).is_file()]
    if missing:
        raise FileNotFoundError(f"task {task}: videos not found: {missing[:3]}")

    def config_for(docs: Path) -> dict[str, Any]:
        config = task_config(task, docs, False, max_new_tokens, post_prompt)
        return config | {"doc_to_visual": _Function(f"{_HOOKS}.doc_to_visual")}

    return write_task_files(questions, out_dir, task, config_for)


def write_video(path: str | Path, frames: np.ndarray, fps: int = 4) -> Path:
    """Write (F, H, W, 3) uint8 RGB frames to ``path`` losslessly (PNG frames in an AVI file, decoded back
    exactly), with PyAV."""
    try:
        import av
    except ImportError as err:
        raise ImportError("writing videos needs PyAV: pip install 'llava-visionzip[eval]' (or av)") from err
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (F, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    path = Path(path)
    with av.open(str(path), mode="w", format="avi") as container:
        stream = container.add_stream("png", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "rgb24"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path
