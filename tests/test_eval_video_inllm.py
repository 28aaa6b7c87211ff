"""video_llava_visionzip's method=fastv|pdrop|sparsevlm: the runner answers as the Video-LLaVA class with the same
method does one prompt at a time (that class is checked against a hand-built reference in
tests/test_inllm_pruning_video.py); Table 3's FastV and SparseVLM rows build the paper's settings; refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("av")

from helpers.video_llava import write_tiny_video_llava

from eval.local_video_task import write_video
from eval.options import ModelOptions
from eval.video_runner import VideoLlavaRunner, VideoOptions, read_frames
from visionzip.baselines import FastVConfig, SparseVLMConfig
from visionzip.hf.video_llava import VisionZipVideoLlavaForConditionalGeneration, VisionZipVideoLlavaProcessor

FRAMES = 4
GEN = {"max_new_tokens": 4, "temperature": 0, "do_sample": False}
QUESTIONS = ["What moves?", "What colour is the ball in the middle of the clip?"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_video_llava(tmp_path_factory.mktemp("video_llava_eval_inllm"))


@pytest.mark.parametrize(
    "args",
    [
        {"method": "fastv", "fastv_layer": 1, "fastv_keep": 5},
        {"method": "sparsevlm", "sparsevlm_layers": "0", "sparsevlm_scale": 1, "sparsevlm_bias": 0},
    ],
)
def test_runner_answers_as_the_class(args: dict, checkpoint: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    clips = [rng.integers(0, 256, (FRAMES, 40, 48, 3), dtype=np.uint8) for _ in QUESTIONS]
    paths = [str(write_video(tmp_path / f"clip{i}.avi", clip)) for i, clip in enumerate(clips)]
    video, rest = VideoOptions.split_kwargs({"num_frames": FRAMES, **args})
    options = ModelOptions.from_kwargs(pretrained=str(checkpoint), **rest)
    options.refuse_llm_method("video_llava_visionzip")  # runs it now
    runner = VideoLlavaRunner.load(options, video, "cpu")
    assert runner.model.pruning_config == options.requested_pruning() and runner.model.visionzip_video_config is None
    answers = runner.generate(QUESTIONS, [[path] for path in paths], dict(GEN))  # a left-padded batch of 2
    model = VisionZipVideoLlavaForConditionalGeneration.from_pretrained(
        checkpoint, method=options.requested_pruning()
    ).eval()
    processor = VisionZipVideoLlavaProcessor.from_pretrained(checkpoint)
    expected = []
    for path, question in zip(paths, QUESTIONS, strict=True):
        clip = read_frames(path, FRAMES)  # the frames the runner reads from the file
        inputs = processor(text=[f"USER: <video>\n{question} ASSISTANT:"], videos=[clip], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=GEN["max_new_tokens"], do_sample=False, pad_token_id=0)
        expected.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    assert all(expected), "non-empty answers (comparing empty strings proves nothing)"
    assert answers == expected


def test_table3_rows_and_refusals(checkpoint: Path) -> None:
    """Table 3's FastV and SparseVLM rows build the paper's settings; a video budget beside a method, and a selection
    method, are refused."""
    from eval.tables import load_spec, resolve_spec_path

    spec = load_spec(resolve_spec_path("3"))
    built = {}
    for name in ("FastV", "SparseVLM"):
        _, rest = VideoOptions.split_kwargs({**spec.model, **spec.row(name, 135).model_args})
        built[name] = ModelOptions.from_kwargs(**rest).requested_pruning()
    assert built == {
        "FastV": FastVConfig(layer=2, budget=135),
        "SparseVLM": SparseVLMConfig(layers=(1,), scale=1.0, bias=0.0),
    }
    assert FastVConfig(budget=135).kept_after(8 * 257, 32) == {1: 7}  # what "135" leaves FastV on Video-LLaVA
    video, rest = VideoOptions.split_kwargs({"video_dominant": 4, "video_contextual": 2, "method": "fastv"})
    with pytest.raises(ValueError, match="video_\\* set VisionZip's video budget, but method=fastv"):
        VideoLlavaRunner.load(ModelOptions.from_kwargs(pretrained=str(checkpoint), **rest), video, "cpu")
    with pytest.raises(
        ValueError, match="video_llava_visionzip runs VisionZip and the in-LLM methods; expected method=visionzip"
    ):
        ModelOptions.from_kwargs(pretrained="p", method="divprune").refuse_llm_method("video_llava_visionzip")
