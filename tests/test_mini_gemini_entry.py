"""Mini-Gemini through the entry points (run_llava, lmms-eval's runner) and Table 14's spec beside the paper."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import transformers
from helpers.mini_gemini import write_tiny_mgm
from PIL import Image

from eval.options import ModelOptions
from eval.runner import LlavaRunner
from eval.tables.render import build_table, markdown, read_paper
from eval.tables.spec import load_spec, resolve_spec_path
from llava.eval import run_llava
from visionzip import VisionZipConfig

SAMPLE = Path(__file__).resolve().parents[1] / "llava/serve/examples/chelsea.jpg"
DOMINANT, CONTEXTUAL = 8, 2
GEN = {"max_new_tokens": 4, "temperature": 0, "do_sample": False}


@pytest.fixture(autouse=True)
def _quiet_transformers() -> Iterator[None]:
    """The entry points lower transformers' logging for the process; restore it after each test."""
    level = transformers.utils.logging.get_verbosity()
    yield
    transformers.utils.logging.set_verbosity(level)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mgm-entry")
    written = write_tiny_mgm(root)
    renamed = root / "llava-v1.5-7b"  # the entry points decide by model_type, never by the folder's name
    shutil.copytree(written, renamed)
    return renamed


def test_run_llava_counts_the_budget(ckpt: Path) -> None:
    argv = ["--model-path", str(ckpt), "--image-file", str(SAMPLE), "--query", "What is it?", "--device", "cpu"]
    flags = ["--visionzip-dominant", str(DOMINANT), "--visionzip-contextual", str(CONTEXTUAL), "--max_new_tokens", "3"]
    plain = run_llava.main([*argv, "--max_new_tokens", "3"])
    zipped = run_llava.main([*argv, *flags])
    patches = 8 * 8  # the tiny CLIP: 64 px, 8 px patches
    assert plain["tokens_before"] == plain["tokens_after"] == patches
    assert zipped["tokens_before"] == patches and zipped["tokens_after"] == DOMINANT + CONTEXTUAL
    assert isinstance(zipped["answer"], str)


@pytest.mark.parametrize("visionzip", [{}, {"dominant": DOMINANT, "contextual": CONTEXTUAL}])
def test_lmms_eval_runner_batched_equals_one_by_one(ckpt: Path, visionzip: dict) -> None:
    runner = LlavaRunner.load(ModelOptions.from_kwargs(pretrained=str(ckpt), **visionzip), "cpu")
    assert type(runner.model).__name__ == "MiniGeminiLlamaForCausalLM" and runner.conv_template == "vicuna_v1"
    expected = VisionZipConfig(DOMINANT, CONTEXTUAL, layer=-2).to_dict() if visionzip else None
    assert runner.model.config.visionzip == expected
    with Image.open(SAMPLE) as photo:
        images = [photo.convert("RGB"), Image.new("RGB", (40, 70), (10, 200, 40))]
    contexts = ["What is it?", "Describe the colours of the image."]
    visuals = [[image] for image in images]
    batched = runner.generate(contexts, visuals, dict(GEN))
    single = [runner.generate([c], [v], dict(GEN))[0] for c, v in zip(contexts, visuals, strict=True)]
    assert batched == single


def test_table14_spec_and_paper_csv() -> None:
    spec = load_spec(resolve_spec_path("14"))
    assert spec.model["pretrained"] == "YanweiLi/MGM-7B" and spec.baseline == ("vanilla", 576)
    columns = [b.column for b in spec.benchmarks]
    assert columns == ["GQA", "MMB", "MME", "POPE", "SQA", "VQAv2", "TextVQA", "MMMU", "SEED-I"]
    assert {(r.method, r.tokens) for r in spec.rows} >= {("VisionZip", t) for t in (192, 128, 64)}
    paper = read_paper(spec.paper)
    assert set(paper[("vanilla", 576)].values) == set(columns)
    ours = {"vanilla-576": {"GQA": 60.0}, "visionzip-128": {"GQA": 57.0}}
    table = {(r.method, r.tokens): r for r in build_table(spec, ours)}
    full = table[("VisionZip", 64)]
    assert full.avg_paper == pytest.approx(92.187, abs=1e-3) and not full.flagged  # recomputes to the published 92.2
    only_avg = table[("VisionZip", 128)]  # the paper gives its Avg only: shown, and Δ is taken against it
    assert only_avg.avg_paper is None and only_avg.avg_published == 96.0
    assert only_avg.avg_delta == pytest.approx(95.0 - 96.0)
    assert table[("VisionZip-FT", 64)].avg_published == 95.0
    assert "(published 96.7)" in markdown(spec, list(table.values()))
