"""A checkpoint's own VisionZip budget (a VisionZip‡ checkpoint's) in run_llava, the chat CLI and the lmms-eval runner:
kept when nothing is asked, replaced by flags / model_args, off when asked; options that would do nothing refused."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from eval.llava_visionzip import LlavaVisionZip
from eval.options import BUDGET_OPTIONS, ModelOptions
from eval.runner import LlavaRunner
from llava import inference
from llava.eval import run_llava
from llava.serve import cli
from llava.tiny import write_tiny_llava
from visionzip import VisionZipConfig

SAMPLE = Path(__file__).resolve().parents[1] / "llava/serve/examples/chelsea.jpg"
SAVED = VisionZipConfig(6, 2, layer=-2)  # the budget the checkpoint was "trained" on
ASKED = ("--visionzip-dominant", "4", "--visionzip-contextual", "1")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``plain``: a tiny LLaVA-1.5; ``saved``: the same with ``visionzip`` in config.json, as VisionZip‡ saves it."""
    root = tmp_path_factory.mktemp("budget")
    plain = write_tiny_llava(root)
    saved = shutil.copytree(plain, root / "saved")
    config = json.loads((saved / "config.json").read_text())
    config.update(visionzip=SAVED.to_dict(), visionzip_budget="per_crop")
    (saved / "config.json").write_text(json.dumps(config))
    return {"plain": plain, "saved": saved}


def _patches(ckpt: Path) -> int:
    tower = json.loads((ckpt / "config.json").read_text())["mm_vision_tower"]
    vision = json.loads((Path(tower) / "config.json").read_text())["vision_config"]
    return (vision["image_size"] // vision["patch_size"]) ** 2


def _run(ckpt: Path, *extra: str) -> dict:
    argv = ["--model-path", str(ckpt), "--image-file", str(SAMPLE), "--query", "What is it?", "--device", "cpu"]
    return run_llava.main([*argv, "--max-new-tokens", "6", *extra])


def test_run_llava_keeps_the_saved_budget_unless_told(ckpts: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    patches = _patches(ckpts["plain"])
    kept = _run(ckpts["saved"])
    assert kept["tokens_after"] == SAVED.tokens
    assert kept["answer"] == _run(ckpts["plain"], "--visionzip-dominant", "6", "--visionzip-contextual", "2")["answer"]
    assert (
        f"[VisionZip 6+2 (saved in the checkpoint)] visual tokens: {patches} -> {SAVED.tokens}"
        in capsys.readouterr().out
    )
    assert _run(ckpts["saved"], *ASKED)["tokens_after"] == 4 + 1
    assert _run(ckpts["saved"], "--no-visionzip")["tokens_after"] == patches
    compared = _run(ckpts["saved"], "--compare")
    assert (compared["tokens_baseline"], compared["tokens_after"]) == (patches, SAVED.tokens)
    assert _run(ckpts["plain"])["tokens_after"] == patches  # a checkpoint without a budget: off, as before


def _chat(ckpt: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *extra: str) -> tuple[int, int]:
    """(before, after) visual tokens of one chat turn, as the summary line prints them."""
    monkeypatch.setattr("sys.stdin", io.StringIO("What is in the image?\n"))
    capsys.readouterr()
    cli.main(["--model-path", str(ckpt), "--image-file", str(SAMPLE), "--device", "cpu", "--temperature", "0",
              "--max-new-tokens", "4", *extra])  # fmt: skip
    before, after = re.search(r"visual tokens: (\d+) -> (\d+)", capsys.readouterr().out).groups()
    return int(before), int(after)


def test_cli_keeps_the_saved_budget_unless_told(
    ckpts: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    patches = _patches(ckpts["plain"])
    assert _chat(ckpts["saved"], monkeypatch, capsys) == (patches, SAVED.tokens)
    assert _chat(ckpts["saved"], monkeypatch, capsys, *ASKED) == (patches, 4 + 1)
    assert _chat(ckpts["saved"], monkeypatch, capsys, "--no-visionzip") == (patches, patches)


def _tokens(runner: LlavaRunner) -> int:
    """Visual tokens the loaded model gives one image (its configured path, run)."""
    pixels, sizes = inference.prepare_images([Image.open(SAMPLE).convert("RGB")], runner.image_processor, runner.model)
    with torch.no_grad():
        return runner.model.image_features(pixels, sizes)[0].shape[0]


def test_runner_keeps_the_saved_budget_unless_told(ckpts: dict[str, Path]) -> None:
    def load(**model_args: object) -> LlavaRunner:
        return LlavaRunner.load(ModelOptions.from_kwargs(pretrained=str(ckpts["saved"]), **model_args), "cpu")

    kept = load()
    assert kept.model.config.visionzip_config() == SAVED and _tokens(kept) == SAVED.tokens
    assert _tokens(load(dominant=4, contextual=1)) == 4 + 1
    assert _tokens(load(budget=32)) == 32
    off = load(visionzip="off")
    assert off.model.config.visionzip is None and _tokens(off) == _patches(ckpts["plain"])
    random = load(selection="random")  # an option without a budget changes the saved one
    assert random.model.config.visionzip_config() == VisionZipConfig(6, 2, layer=-2, selection="random")


OPTION_VALUES = [("merge", "mean"), ("cls_token", False), ("selection", "random"), ("layer", -2), ("score_layer", -3),
                 ("visionzip_budget", "total")]  # fmt: skip


@pytest.mark.parametrize(("name", "value"), OPTION_VALUES)
def test_options_without_a_budget_are_refused_or_change_the_saved_one(name: str, value: object) -> None:
    assert name in BUDGET_OPTIONS
    options = ModelOptions(pretrained="ckpt", **{name: value})
    with pytest.raises(ValueError, match=f"'{name}'.*none is given and the checkpoint saves none"):
        options.requested_visionzip(select_layer=-2)
    changed = options.requested_visionzip(select_layer=-2, saved=SAVED)
    if name == "visionzip_budget":  # the budget mode goes to use_visionzip, beside the saved stage
        assert changed is None
    else:
        assert changed == VisionZipConfig(**{**SAVED.to_dict(), name: value})
    with pytest.raises(ValueError, match="visionzip=off"):
        ModelOptions(pretrained="ckpt", visionzip="off", **{name: value})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"visionzip": "off", "budget": 64}, "visionzip=off"),
        ({"visionzip": "no"}, "visionzip must be one of"),
        ({"batch_size": "auto"}, "batch_size=auto .* not supported"),
        ({"batch_size": "auto:4"}, "batch_size=auto:4 .* not supported"),
    ],
)
def test_model_args_that_cannot_work_say_so(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelOptions.from_kwargs(pretrained="ckpt", **kwargs)
    with pytest.raises(ValueError, match=message):
        LlavaVisionZip(pretrained="ckpt", **kwargs)  # refused before anything loads


def test_max_batch_size_is_refused() -> None:
    with pytest.raises(ValueError, match=r"max_batch_size 8 .* batch_size=auto"):
        LlavaVisionZip(pretrained="ckpt", max_batch_size=8)


def test_flags_that_would_do_nothing_exit_with_a_message(
    ckpts: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    cases = [
        (["--no-visionzip", *ASKED], "--no-visionzip turns VisionZip off"),
        (["--no-visionzip", "--visionzip-budget", "total"], "--no-visionzip turns VisionZip off"),
        (["--no-visionzip", "--compare"], "--compare answers without and with"),
        (["--visionzip-budget", "total"], "budget mode .*'total'.* VisionZip is off"),  # the plain checkpoint
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit):
            _run(ckpts["plain"], *extra)
        assert re.search(message, capsys.readouterr().err)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
    with pytest.raises(SystemExit):
        cli.main(["--model-path", str(ckpts["plain"]), "--image-file", str(SAMPLE), "--device", "cpu",
                  "--visionzip-budget", "total"])  # fmt: skip
    assert re.search("budget mode .*'total'.* VisionZip is off", capsys.readouterr().err)


def test_an_in_llm_method_on_a_saved_budget_needs_no_visionzip(
    ckpts: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    """As the lmms-eval args: the saved VisionZip stage is never dropped silently for --method fastv."""
    fastv = ("--method", "fastv", "--fastv-layer", "1", "--budget", "40")
    with pytest.raises(SystemExit):
        _run(ckpts["saved"], *fastv)
    err = capsys.readouterr().err
    assert "saves VisionZip 6+2" in err and "add --no-visionzip" in err
    result = _run(ckpts["saved"], *fastv, "--no-visionzip")
    assert result["tokens_after"] == _patches(ckpts["plain"]) and result["layer_average"][0] == 40.0
