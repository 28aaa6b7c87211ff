"""llava_hf_visionzip through lmms-eval (``eval.grid --in-process``) on exported tiny checkpoints and a local task.

Our tiny LLaVA-1.6 is exported to transformers' llava-hf layout (``llava.convert``); lmms-eval runs the export as
``llava_hf_visionzip`` with VisionZip off and on, and the answers and multiple-choice losses it records must be
those of our own LLaVA (``eval.runner.LlavaRunner``, the ``llava_visionzip`` path) on the source checkpoint: an
independent implementation of the same model. The token counts are checked against our LLaVA's feature counts.
Skipped where lmms-eval is not installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("lmms_eval")

from eval import grid
from eval.hf_runner import HfLlavaRunner
from eval.llava_hf_visionzip import FAMILIES, LlavaHfVisionZip
from eval.local_task import SHORT_ANSWER_PROMPT, Question, doc_to_text, task_config, write_task
from eval.options import ModelOptions
from eval.runner import LlavaRunner
from eval.tables import folder_results, load_spec
from llava.inference import prepare_images
from llava.model.hf_export import export_to_hf

MAX_NEW = 6
CHOICES = ("red", "blue", "no")
BUDGET = {"dominant": 6, "contextual": 2}  # per view, of 65 tokens in the tiny CLIP (36 in the tiny SigLIP)
SIZES = [(48, 32), (20, 70), (64, 64), (90, 30)]  # (width, height): different AnyRes grids


def _questions(folder: Path) -> list[Question]:
    """One random image per size, one question each."""
    folder.mkdir(parents=True, exist_ok=True)
    questions = []
    for i, (width, height) in enumerate(SIZES):
        pixels = np.random.default_rng(i).integers(0, 256, (height, width, 3), dtype=np.uint8)
        path = folder / f"{i}.png"
        Image.fromarray(pixels).save(path)
        questions.append(Question(f"q{i}", (str(path),), "What colour is the image?", CHOICES[i % 3]))
    return questions


def _ours(source: Path, questions: list[Question], **budget: int) -> tuple[list[str], list[list[float]]]:
    """Our LLaVA on the source checkpoint: the local task's answers and the losses of each choice."""
    runner = LlavaRunner.load(ModelOptions(pretrained=str(source), **budget), "cpu")
    contexts = [doc_to_text(q.to_doc(), {"pre_prompt": "", "post_prompt": SHORT_ANSWER_PROMPT}) for q in questions]
    visuals = [[Image.open(q.images[0]).convert("RGB")] for q in questions]
    kwargs = task_config("localvqa", Path("x.jsonl"), False, MAX_NEW, SHORT_ANSWER_PROMPT)["generation_kwargs"]
    answers = runner.generate(contexts, visuals, dict(kwargs))
    n = len(CHOICES)
    losses = [
        [s.loss for s in runner.loglikelihood([c] * n, [f" {k}" for k in CHOICES], [v] * n)]
        for c, v in zip(contexts, visuals, strict=True)
    ]
    return answers, losses


def _samples(folder: Path, task: str) -> list[dict]:
    path = next(folder.rglob(f"*_samples_{task}.jsonl"))
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])


@pytest.fixture(scope="module")
def exported(tiny_pair: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_export")
    return {name: export_to_hf(tiny_pair[name], root / name) for name in ("v15", "v16")}


@pytest.fixture(scope="module")
def run(tiny_pair: dict[str, Path], exported: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Vanilla and VisionZip rows of the LLaVA-1.6 export on both local tasks, in one process."""
    root = tmp_path_factory.mktemp("hf_lmms")
    questions = _questions(root / "images")
    write_task(questions, root / "tasks", "localvqa", max_new_tokens=MAX_NEW)
    write_task([q.with_choices(CHOICES) for q in questions], root / "tasks", "localvqa_mc", multiple_choice=True)
    spec_path = root / "hf.yaml"
    spec_path.write_text(
        "name: hf\ntitle: tiny llava-hf\ninclude_paths: [tasks]\nlmms_model: llava_hf_visionzip\n"
        f"model: {{pretrained: {exported['v16']}, device: cpu}}\nbaseline: {{method: vanilla, tokens: 65}}\n"
        "rows:\n  - {method: VisionZip, tokens: 8, model_args: {dominant: 6, contextual: 2}}\n"
        "benchmarks:\n  - {column: VQA, task: localvqa, metric: exact_match, scale: 100}\n"
        "  - {column: MC, task: localvqa_mc, metric: acc, scale: 100}\n"
    )
    out = root / "results"
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf")}.items():
            env.setenv(name, value)
        env.chdir(root)
        outcome = grid.run_grid(load_spec(spec_path), out, batch_size=3, group=True, in_process=True)
    ours = {
        "vanilla-65": _ours(tiny_pair["v16"], questions),
        "visionzip-8": _ours(tiny_pair["v16"], questions, **BUDGET),
    }
    return {"out": out, "outcome": outcome, "ours": ours}


def test_model_is_registered_through_the_entry_point() -> None:
    from lmms_eval.models import get_model

    assert get_model("llava_hf_visionzip") is LlavaHfVisionZip


def test_lmms_eval_answers_equal_our_llava(run: dict) -> None:
    """Generation (left-padded batches of 3) and multiple choice, VisionZip off and on: our LLaVA's answers."""
    assert [c.row.id for c in run["outcome"]["ran"]] == ["vanilla-65", "visionzip-8"] and not run["outcome"]["failed"]
    for row, (answers, losses) in run["ours"].items():
        folder = run["out"] / row
        assert [s["filtered_resps"] for s in _samples(folder, "localvqa")] == answers, row
        nll = [[float(value) for value, _ in s["filtered_resps"]] for s in _samples(folder, "localvqa_mc")]
        assert nll == [[pytest.approx(loss, rel=1e-4) for loss in row_losses] for row_losses in losses], row
        assert {"localvqa", "localvqa_mc"} <= set(folder_results(folder))
        results = json.loads(next(folder.rglob("*_results.json")).read_text())
        assert results["config"]["model"] == "llava_hf_visionzip"
    assert run["ours"]["vanilla-65"][0] != run["ours"]["visionzip-8"][0]  # VisionZip changed what the model saw


@pytest.mark.parametrize("name", ["v15", "v16"])
def test_image_tokens_follow_the_budget(name: str, tiny_pair: dict[str, Path], exported: dict[str, Path]) -> None:
    """The processor's placeholders per image equal our LLaVA's feature count for that image, off and on."""
    images = [Image.fromarray(np.full((h, w, 3), 100, dtype=np.uint8)) for w, h in SIZES]
    for budget in ({}, BUDGET):
        ours = LlavaRunner.load(ModelOptions(pretrained=str(tiny_pair[name]), **budget), "cpu")
        pixels, sizes = prepare_images(images, ours.image_processor, ours.model)
        with torch.no_grad():
            expected = [f.shape[0] for f in ours.model.image_features(pixels, sizes)]
        runner = HfLlavaRunner.load(ModelOptions(pretrained=str(exported[name]), **budget), "cpu", FAMILIES, "test")
        batch = runner._inputs([runner.prompt("Q?", 1) for _ in images], [[image] for image in images], "left")
        counts = (batch["input_ids"] == runner.model.config.image_token_id).sum(dim=1).tolist()
        assert counts == expected, budget
        if budget:
            views = [1] * len(images) if name == "v15" else [p.shape[0] for p in pixels]
            assert counts == [v * 8 for v in views]


def test_options_our_llava_alone_has_are_refused(exported: dict[str, Path]) -> None:
    for args, match in [
        ({"conv_template": "vicuna_v1"}, "conv_template"),
        ({"budget": 64, "positions": "original"}, "packed"),
        ({"budget": 64, "visionzip_budget": "total"}, "per view"),
    ]:
        with pytest.raises(ValueError, match=match):
            HfLlavaRunner.load(ModelOptions(pretrained=str(exported["v15"]), **args), "cpu", FAMILIES, "test")
    with pytest.raises(ValueError, match="model_type"):  # a OneVision or other checkpoint is not this model's
        HfLlavaRunner.load(ModelOptions(pretrained=str(exported["v16"])), "cpu", {"llava": FAMILIES["llava"]}, "test")


# --- llava_onevision_visionzip -------------------------------------------------------------------------------------
# A tiny SigLIP + Qwen2 OneVision (tests/helpers/onevision.py). Its processor is built here, not loaded:
# transformers' OneVision processor needs its torchvision video processor to load, which this environment lacks.
OV_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>"
    "{% endif %}"
)
OV_REQUESTS = [  # (context, image sizes (height, width)): mixed AnyRes grids and a two-image prompt
    ("Colour?", [(40, 130)]),
    ("Shape of the object in the picture?", [(90, 90)]),
    ("Same shape?", [(100, 40), (60, 60)]),
]


@pytest.fixture(scope="module")
def onevision(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers.onevision import tiny_config
    from transformers import LlavaOnevisionForConditionalGeneration

    path = tmp_path_factory.mktemp("hf_onevision_eval")
    torch.manual_seed(0)
    LlavaOnevisionForConditionalGeneration(tiny_config()).save_pretrained(path)
    return path


def _ov_runner(checkpoint: Path, **args) -> HfLlavaRunner:
    """``llava_onevision_visionzip``'s model loading and runner, with the processor built in place of loaded."""
    from helpers.onevision import VisionZipProcessor, tiny_processor

    from eval.hf_runner import load_hf_model
    from eval.llava_onevision_visionzip import FAMILIES as OV_FAMILIES

    model = load_hf_model(ModelOptions(pretrained=str(checkpoint), **args), "cpu", OV_FAMILIES, "ov")
    processor = tiny_processor(VisionZipProcessor, visionzip=model.visionzip_config, chat_template=OV_TEMPLATE)
    return HfLlavaRunner(model, processor, max_new_tokens=MAX_NEW)


def _ov_visuals() -> list[list[Image.Image]]:
    rng = np.random.default_rng(0)
    return [
        [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes] for _, sizes in OV_REQUESTS
    ]


@pytest.mark.parametrize("args", [{"visionzip": "off"}, BUDGET], ids=["off", "visionzip"])
def test_onevision_batches_answer_and_score_as_the_plain_class_one_by_one(onevision: Path, args: dict) -> None:
    """Left-padded generation and right-padded scoring of mixed sizes and a multi-image prompt, batched, equal
    the model one request at a time (off: transformers' plain class and processor, an independent path)."""
    from helpers.onevision import PlainProcessor, tiny_processor
    from transformers import LlavaOnevisionForConditionalGeneration

    from eval.llava_onevision_visionzip import LlavaOnevisionVisionZip

    runner = _ov_runner(onevision, **args)
    if args.get("visionzip") == "off":
        assert runner.model.visionzip_config is None
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(onevision).eval()
        processor = tiny_processor(PlainProcessor, chat_template=OV_TEMPLATE)
    else:  # a budget on SigLIP scores by attention received, at the checkpoint's layer -1
        cfg = runner.model.visionzip_config
        assert (cfg.dominant, cfg.contextual, cfg.cls_token, cfg.layer) == (6, 2, False, -1)
        model, processor = runner.model, runner.processor
    contexts, visuals = [c for c, _ in OV_REQUESTS], _ov_visuals()
    kwargs = {"max_new_tokens": MAX_NEW, "temperature": 0, "do_sample": False}
    batched = runner.generate(contexts, visuals, kwargs)
    scores = runner.loglikelihood(contexts, [" red"] * len(contexts), visuals)
    for context, images, answer, score in zip(contexts, visuals, batched, scores, strict=True):
        prompt = runner.prompt(context, len(images))
        inputs = processor(text=[prompt], images=images, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
            answered = processor(text=[runner.prompt(context, len(images), " red")], images=images, return_tensors="pt")
            log_probs = torch.log_softmax(model(**answered).logits[0, :-1].float(), dim=-1)  # (L - 1, V)
        assert (
            answer
            == processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        )
        targets = answered["input_ids"][0, 1:]
        start = inputs["input_ids"].shape[1] - 1  # the first reply token is predicted at the open prompt's end
        expected = log_probs[start:].gather(-1, targets[start:, None]).sum().item()
        assert score.log_prob == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert LlavaOnevisionVisionZip.model_name == "llava_onevision_visionzip"
    from lmms_eval.models import get_model

    assert get_model("llava_onevision_visionzip") is LlavaOnevisionVisionZip


def test_onevision_checkpoint_is_not_llava_hf_visionzips(onevision: Path) -> None:
    with pytest.raises(ValueError, match="model_type"):
        HfLlavaRunner.load(ModelOptions(pretrained=str(onevision)), "cpu", FAMILIES, "llava_hf_visionzip")
