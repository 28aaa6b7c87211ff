"""llava_visionzip's method=fastv|pdrop|sparsevlm: model args -> the model's pruning config; answers and scores equal
the model's own (greedy generate; a prefill, then the reply over its cache); the achieved visual tokens tallied."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.eval_items import write_llava_items
from PIL import Image

from eval import calibrate
from eval.local_task import doc_to_text, doc_to_visual, read_llava_items
from eval.options import ModelOptions
from eval.runner import LlavaRunner
from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import get_conv_template
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from llava.model.llava_arch import LlavaMetaForCausalLM
from llava.tiny import write_tiny_llava
from llava.tiny.config import TinyConfig
from visionzip.baselines import FastVConfig, PDropConfig, SparseVLMConfig, layer_average, visual_counts

LAYERS = 4  # decoder layers of the tiny checkpoints: FastV's default K=2 leaves two layers on the kept tokens
GEN = {"max_new_tokens": 6, "temperature": 0, "do_sample": False}
CONTEXTS = ["What colour is it?", "What is the shape of the object in the middle?", "Say hello."]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root, cfg = tmp_path_factory.mktemp("eval-methods"), TinyConfig(num_layers=LAYERS)
    return {"v15": write_tiny_llava(root, cfg=cfg), "v16": write_tiny_llava(root, next=True, cfg=cfg)}


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [Image.new("RGB", (40, 30), (220, 20, 20)), Image.new("RGB", (64, 64), (20, 20, 220))]


def _runner(ckpt: Path, **kwargs: object) -> LlavaRunner:
    return LlavaRunner.load(ModelOptions.from_kwargs(pretrained=str(ckpt), **kwargs), "cpu")


def _prompt_ids(tokenizer, query: str) -> torch.Tensor:
    """(1, L) the vicuna_v1 prompt of ``query`` (its ``<image>`` tokens written out)."""
    conv = get_conv_template("vicuna_v1")
    conv.append_message(conv.roles[0], query)
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]


def test_model_args_set_the_models_pruning_config(ckpts: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    set_pruning = LlavaMetaForCausalLM.set_pruning
    monkeypatch.setattr(LlavaMetaForCausalLM, "set_pruning", lambda m, cfg: calls.append(cfg) or set_pruning(m, cfg))
    alone = _runner(ckpts["v15"], method="fastv")  # the default budget: a layer-average of 64 (all 64 tokens here)
    assert calls == [FastVConfig(layer=2, budget=64)]
    assert alone.model.config.token_pruning == FastVConfig(layer=2, budget=64).to_dict()
    assert alone.model.config.visionzip is None and alone.tally.nominal == 64
    pdrop = _runner(ckpts["v16"], method="pdrop", pdrop_layers="1/2", pdrop_ratio=0.5, multiturn="reprefill")
    assert calls[-1] == PDropConfig(layers=(1, 2), ratio=0.5)
    assert pdrop.model.config.token_pruning == PDropConfig(layers=(1, 2), ratio=0.5).to_dict()
    assert pdrop.tally.summary()["multiturn"] == "reprefill" and pdrop.tally.nominal is None
    calls.clear()
    plain = _runner(ckpts["v15"], budget=16)  # no method: VisionZip as before, set_pruning not called
    assert calls == [] and getattr(plain.model.config, "token_pruning", None) is None and plain.tally is None
    with pytest.raises(ValueError, match=r"method=fastv on .*cannot average 20 visual tokens over 4 layers on 64"):
        _runner(ckpts["v15"], method="fastv", budget=20)  # the model's numbers: K*N/L = 32 > 20


def test_a_saved_method_stays_unless_another_is_named(ckpts: dict[str, Path], tmp_path: Path) -> None:
    tokenizer, model, _, _ = load_pretrained_model(str(ckpts["v15"]), device="cpu")
    model.set_pruning(FastVConfig(keep=8))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert _runner(tmp_path).model.config.token_pruning == FastVConfig(keep=8).to_dict()
    assert _runner(tmp_path).tally.summary()["nominal_budget"] is None
    assert _runner(tmp_path, method="visionzip").model.config.token_pruning is None  # VisionZip 54+10 instead
    assert _runner(tmp_path, method="fastv", budget=40).model.config.token_pruning == FastVConfig(budget=40).to_dict()


def _reference_answers(ckpt: Path, cfg, queries: list[str], visuals: list[list[Image.Image]]) -> list[str]:
    """The model's own greedy ``generate``, one prompt at a time, loaded afresh with ``cfg`` set by hand."""
    tokenizer, model, processor, _ = load_pretrained_model(str(ckpt), device="cpu")
    model.set_pruning(cfg)
    answers = []
    for query, images in zip(queries, visuals, strict=True):
        pixels = process_images(images, processor, model.config) if images else None
        sizes = [image.size for image in images] if images else None
        with torch.inference_mode():
            output = model.generate(_prompt_ids(tokenizer, query), images=pixels, image_sizes=sizes, **GEN)
        answers.append(tokenizer.batch_decode(output, skip_special_tokens=True)[0].split("</s>")[0].strip())
    return answers


@pytest.mark.parametrize("name", ["v15", "v16"])
def test_answers_with_fastv_equal_the_models_own_generate(ckpts: dict[str, Path], images: list, name: str) -> None:
    # 1.5: 64 tokens, K=2 keeps 16. NeXT: all of an image's views (118 and 136 tokens here, up to 5 x 64): K=1, since
    # at K=2 the largest image's first two layers alone would average 160 (refused when the method is set)
    layer, budget = {"v15": (2, 40), "v16": (1, 100)}[name]
    runner = _runner(ckpts[name], method="fastv", budget=budget, fastv_layer=layer)
    visuals = [[images[0]], [images[1]], []]
    queries = ["<image>\n" + c for c in CONTEXTS[:2]] + [CONTEXTS[2]]
    expected = _reference_answers(ckpts[name], FastVConfig(layer=layer, budget=budget), queries, visuals)
    assert all(expected), "every reference answer has text (comparing empty strings proves nothing)"
    assert runner.generate(CONTEXTS, visuals, dict(GEN)) == expected  # one left-padded batch
    summary = runner.tally.summary()
    assert (summary["requests"], summary["requests_without_image"]) == (2, 1)
    if name == "v15":  # layers take in 64, 64, 16, 16 tokens and put out 64, 16, 16, 16
        assert summary["layer_average_inputs"] == 40.0 and summary["layer_average_outputs"] == 28.0
        assert layer_average(visual_counts(64, {1: 16}, LAYERS)) == (40.0, 28.0)
    else:  # each image's own count: the kept count is rounded, so the average is within 1/L x (L-K)/2 of the budget
        assert summary["layer_average_inputs"] == pytest.approx(budget, abs=0.5)


def _reference_score(runner: LlavaRunner, context: str, continuation: str, image: Image.Image) -> float:
    """log p(reply) by the model's own calls: the open prompt prefilled with the image (the method selects there),
    then the answered conversation's remaining tokens read over that cache."""
    open_prompt, answered = runner.scoring_prompts(context, continuation, 1)
    prompt = tokenizer_image_token(open_prompt, runner.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    whole = tokenizer_image_token(answered, runner.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    reply = whole[:, prompt.shape[1] :]
    pixels = process_images([image], runner.image_processor, runner.model.config)
    with torch.inference_mode():
        first = runner.model(input_ids=prompt, images=pixels, image_sizes=[image.size], use_cache=True)
        rest = runner.model(input_ids=reply, past_key_values=first.past_key_values, use_cache=True)
    logits = torch.cat([first.logits[:, -1:], rest.logits[:, :-1]], dim=1)[0].log_softmax(-1)  # (R, V)
    return float(logits.gather(-1, reply[0, :, None]).sum())


def test_loglikelihood_scores_the_reply_after_the_prompts_selection(ckpts: dict[str, Path], images: list) -> None:
    runner = _runner(ckpts["v15"], method="fastv", budget=40)
    continuations, visuals = [" red", " a small blue square"], [[images[0]], [images[1]]]
    batched = runner.loglikelihood(CONTEXTS[:2], continuations, visuals)
    for score, context, continuation, image in zip(batched, CONTEXTS[:2], continuations, images, strict=True):
        assert score.log_prob == pytest.approx(_reference_score(runner, context, continuation, image), rel=1e-5)
    assert runner.tally.requests == 2  # the runner's one prefill of two prompts (the reference calls are not its)
    # keeping every token, the prefill-then-reply path is the vanilla one-pass score
    kept = _runner(ckpts["v15"], method="fastv", fastv_keep=64).loglikelihood(CONTEXTS[:2], continuations, visuals)
    vanilla = _runner(ckpts["v15"]).loglikelihood(CONTEXTS[:2], continuations, visuals)
    assert [s.log_prob for s in kept] == pytest.approx([s.log_prob for s in vanilla], rel=1e-5)
    assert [s.num_tokens for s in kept] == [s.num_tokens for s in vanilla]


def test_calibrate_finds_sparsevlms_scale_for_a_target(
    ckpts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:  # fmt: skip
    """``python -m eval.calibrate``: the scale it prints reaches the average it reports, measured here again from
    the model's own per-prefill reports, and nearer the target than the 64-token preset's scale."""
    items = write_llava_items(tmp_path / "data")
    flags = ["--pretrained", str(ckpts["v15"]), "--items", str(items), "--target", "40", "--device", "cpu"]
    scale = calibrate.main([*flags, "--steps", "6", "--limit", "4", "--model-arg", "sparsevlm_layers=1"])
    printed = capsys.readouterr().out

    def average(scale: float) -> float:
        runner = _runner(ckpts["v15"], method="sparsevlm", sparsevlm_layers="1", sparsevlm_scale=scale)
        values = []
        for question in read_llava_items(items)[:4]:
            doc = question.to_doc()
            runner.generate([doc_to_text(doc)], [doc_to_visual(doc)], {"max_new_tokens": 1})
            (report,) = runner.model.get_model().pruning_report()
            values.append(report[0])
        return sum(values) / len(values)

    reached = average(scale)
    assert f"layer-average {reached:.1f} over layer inputs, target 40" in printed
    assert abs(reached - 40) < abs(average(SparseVLMConfig().scale) - 40)


def test_models_without_an_owned_loop_refuse_in_llm_methods() -> None:
    """LLaVA-OneVision's model has no owned decoder loop: refused before anything loads, in lmms-eval;
    llava_hf_visionzip runs the in-LLM methods (``visionzip.hf.inllm``), so the grid passes them on."""
    pytest.importorskip("lmms_eval")
    from eval import grid
    from eval.llava_onevision_visionzip import LlavaOnevisionVisionZip
    from eval.tables import load_spec, resolve_spec_path

    with pytest.raises(ValueError, match="method=fastv prunes inside the language model, which llava_onevision_visi"):
        LlavaOnevisionVisionZip(pretrained="never-loaded", method="fastv")
    spec = load_spec(resolve_spec_path("table2_hf.yaml"))
    assert spec.lmms_model == "llava_hf_visionzip"
    assert "method=pdrop" in grid.model_args_string(spec, spec.rows[0], {"method": "pdrop"})
