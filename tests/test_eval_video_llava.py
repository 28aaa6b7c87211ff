"""video_llava_visionzip through the real lmms-eval CLI, offline, on a generated local video task.

The videos are random frames written losslessly with PyAV (PNG in AVI), so the frames lmms-eval's run decodes are
the ones written; the reference answers come from the VisionZip class called directly on those frames (picked by
index, one prompt at a time), the CLI run batches two requests with left padding. Skipped without lmms-eval.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lmms_eval")
pytest.importorskip("av")

from helpers.video_llava import write_tiny_video_llava

from eval.local_task import SHORT_ANSWER_PROMPT
from eval.local_video_task import VideoQuestion, write_video, write_video_task
from eval.options import ModelOptions
from eval.video_runner import VideoOptions
from visionzip import VisionZipConfig
from visionzip.hf.video_llava import (
    VisionZipVideoLlavaForConditionalGeneration,
    VisionZipVideoLlavaProcessor,
)
from visionzip.video import VideoBudget

MAX_NEW, WRITTEN, SAMPLED = 6, 6, 4
PICKED = [0, 1, 3, 5]  # np.linspace(0, 5, 4) rounded down: lmms-eval's uniform sampling of 4 of 6 frames
BUDGET = VideoBudget(VisionZipConfig(dominant=4, contextual=2), split="proportional", total=20)
MODEL_ARGS = "video_dominant=4,video_contextual=2,video_split=proportional,video_total=20,num_frames=4"


def _reference(ckpt: Path, clips: list[np.ndarray], questions: list[str]) -> list[str]:
    """Greedy answers of the VisionZip class with ``BUDGET``, one prompt at a time, on the sampled frames."""
    model = VisionZipVideoLlavaForConditionalGeneration.from_pretrained(ckpt, visionzip_video=BUDGET).eval()
    processor = VisionZipVideoLlavaProcessor.from_pretrained(ckpt, visionzip_video=BUDGET)
    answers = []
    for clip, question in zip(clips, questions, strict=True):
        prompt = f"USER: <video>\n{question}{SHORT_ANSWER_PROMPT} ASSISTANT:"
        inputs = processor(text=[prompt], videos=[clip[PICKED]], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0)
        answers.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return [a.strip() for a in answers]


def test_lmms_eval_cli_runs_a_local_video_task(tmp_path: Path) -> None:
    ckpt = write_tiny_video_llava(tmp_path / "ckpt")
    rng = np.random.default_rng(3)
    clips = [rng.integers(0, 256, (WRITTEN, 40, 48, 3), dtype=np.uint8) for _ in range(3)]
    paths = [write_video(tmp_path / f"clip{i}.avi", clip) for i, clip in enumerate(clips)]
    texts = ["What moves?", "What colour is the ball in the middle of the clip?", "Why?"]
    answers = _reference(ckpt, clips, texts)
    assert all(answers)  # random weights, but something is generated
    graded = [a if i != 1 else "never this" for i, a in enumerate(answers)]
    rows = enumerate(zip(paths, texts, graded, strict=True))
    questions = [VideoQuestion(f"q{i}", str(p), t, g) for i, (p, t, g) in rows]
    write_video_task(questions, tmp_path / "tasks", "localvideo", max_new_tokens=MAX_NEW)
    env = os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    command = [
        sys.executable, "-m", "lmms_eval", "--model", "video_llava_visionzip", "--model_args",
        f"pretrained={ckpt},device=cpu,{MODEL_ARGS}", "--tasks", "localvideo", "--include_path",
        str(tmp_path / "tasks"), "--batch_size", "2", "--output_path", str(tmp_path / "out"), "--log_samples",
    ]  # fmt: skip
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    samples_file = next((tmp_path / "out").rglob("*_samples_localvideo.jsonl"))
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert [s["filtered_resps"] for s in samples] == answers
    results = json.loads(next((tmp_path / "out").rglob("*_results.json")).read_text())
    assert results["results"]["localvideo"]["exact_match,none"] == pytest.approx(2 / 3)


def test_video_options_parse_and_give_the_budget() -> None:
    args = {"video_dominant": 14, "video_contextual": 3, "num_frames": 8.0, "merge": "mean"}
    video, rest = VideoOptions.split_kwargs(args)
    options = ModelOptions.from_kwargs(pretrained="x", **rest)
    budget = video.budget(options, layer=-2)
    assert budget == VideoBudget(VisionZipConfig(dominant=14, contextual=3, merge="mean"))
    assert budget.tokens(8) == 136
    total = VideoOptions(video_split="proportional", video_total=136).budget(ModelOptions(pretrained="x"), -2)
    assert total is not None and total.tokens(8) == 136 and total.split == "proportional"
    assert VideoOptions().budget(ModelOptions(pretrained="x"), -2) is None  # nothing asked: the checkpoint's
    assert VideoOptions(video_dominant=14, video_contextual=3).budget(ModelOptions("x", visionzip="off"), -2) is None
    with pytest.raises(ValueError, match="together"):
        VideoOptions(video_dominant=14)
    with pytest.raises(ValueError, match="video_split"):
        VideoOptions(video_split="random")


def test_table3_spec_names_lmms_eval_tasks_and_renders_retention() -> None:
    """Every column's task is an lmms-eval 0.7.3 task; the render puts our retention beside the paper's 93.2."""
    import re

    import lmms_eval

    from eval.tables import build_table, load_spec, resolve_spec_path

    spec = load_spec(resolve_spec_path("3"))
    assert spec.lmms_model == "video_llava_visionzip" and spec.baseline == ("vanilla", 2048)
    declared = set()
    for path in (Path(lmms_eval.__file__).parent / "tasks").rglob("*.yaml"):
        declared |= set(re.findall(r"^task:\s*\"?([\w\-]+)\"?\s*$", path.read_text(errors="ignore"), flags=re.M))
    assert set(spec.tasks) <= declared
    video, rest = VideoOptions.split_kwargs({**spec.model, **spec.row("VisionZip", 136).model_args})
    assert video.budget(ModelOptions.from_kwargs(**rest), -2).tokens(video.num_frames) == 136
    ours = {"vanilla-2048": {"TGIF": 50.0, "ActivityNet": 40.0}, "visionzip-136": {"TGIF": 45.0, "ActivityNet": 40.0}}
    rows = {(r.method, r.tokens): r for r in build_table(spec, ours)}
    zipped = rows[("VisionZip", 136)]
    assert zipped.avg_ours == pytest.approx(95.0) and zipped.avg_paper == pytest.approx(93.2, abs=0.05)
