"""eval.multiturn: the two-turn task format written from LLaVA items; the scored turn answered as one chat in each
multiturn mode: text-free methods answer the same in both, reprefill equals generate on the whole conversation, and
cache equals a prefill of turn 1's prompt continued by hand on its KV cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers.eval_items import write_llava_items
from PIL import Image

from eval.local_task import SHORT_ANSWER_PROMPT, Question, read_llava_items
from eval.multiturn import (
    answer_conversation,
    answer_requests,
    conversations,
    history_of,
    pair_by_image,
    write_multiturn_task,
)
from eval.options import ModelOptions
from eval.runner import LlavaRunner
from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import get_conv_template
from llava.inference import build_query
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model import selection as selection_module
from llava.tiny import write_tiny_llava
from llava.tiny.config import TinyConfig

LAYERS = 4  # FastV's default K=2 leaves two layers on the kept tokens
GEN = {"max_new_tokens": 6, "temperature": 0, "do_sample": False}
HISTORY = [("What colour is the square?" + SHORT_ANSWER_PROMPT, "red")]
QUESTION = "What shape is in the corner?" + SHORT_ANSWER_PROMPT


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llava(tmp_path_factory.mktemp("eval-multiturn"), cfg=TinyConfig(num_layers=LAYERS))


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.effect_noise((48, 40), 60).convert("RGB")


def _runner(ckpt: Path, **kwargs: object) -> LlavaRunner:
    return LlavaRunner.load(ModelOptions.from_kwargs(pretrained=str(ckpt), **kwargs), "cpu")


def test_the_task_format_from_llava_items(tmp_path: Path) -> None:
    questions = conversations(read_llava_items(write_llava_items(tmp_path / "items")))
    task, single = write_multiturn_task(questions, tmp_path / "task", "pairs")
    docs = [json.loads(line) for line in (tmp_path / "task/pairs.jsonl").read_text().splitlines()]
    assert len(docs) == 3  # one scored second turn per item
    red = docs[0]
    assert red["history"] == [{"question": "What colour is the image?" + SHORT_ANSWER_PROMPT, "answer": "red"}]
    assert (red["question"], red["answer"], red["question_id"]) == ("Is it a photo?", "no", "red_1")
    assert Path(red["images"][0]).is_absolute() and Path(red["images"][0]).name == "red.png"
    assert history_of(red) == [("What colour is the image?" + SHORT_ANSWER_PROMPT, "red")]
    twins = [json.loads(line) for line in (tmp_path / "task/pairs_single.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in d.items() if k != "history"} for d in docs] == twins  # the same questions, alone
    assert history_of(twins[0]) == []
    assert [yaml.safe_load(p.read_text().replace("!function", ""))["task"] for p in (task, single)] == [
        "pairs", "pairs_single"
    ]  # fmt: skip
    lone = Question("x_0", red["images"], "Q?", "A")
    with pytest.raises(ValueError, match=r"at least 2 \(human, gpt\) pairs, got 1"):
        conversations([lone])
    with pytest.raises(ValueError, match="history must be a list of"):
        history_of({"question_id": "x", "history": [{"question": "Q?"}]})


def _whole_conversation(runner: LlavaRunner, image: Image.Image, **extra: object) -> str:
    """Reprefill's reference: the model's own generate on the whole conversation, turn 1 answered by its truth."""
    conv = get_conv_template(runner.conv_template)
    conv.append_message(conv.roles[0], build_query(HISTORY[0][0], 1, runner.model.config))
    conv.append_message(conv.roles[1], HISTORY[0][1])
    conv.append_message(conv.roles[0], QUESTION)
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), runner.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    pixels = process_images([image], runner.image_processor, runner.model.config)
    with torch.inference_mode():
        out = runner.model.generate(ids, images=pixels, image_sizes=[image.size], **extra, **GEN)
    return runner.tokenizer.decode(out[0], skip_special_tokens=True).split("</s>")[0].strip()


@pytest.mark.parametrize(
    "args",
    [{}, {"budget": 32}, {"method": "divprune", "budget": 6}, {"method": "vispruner", "budget": 6}],
    ids=["none", "visionzip", "divprune", "vispruner"],
)
def test_text_free_methods_answer_turn_2_the_same_in_both_modes(ckpt: Path, image: Image.Image, args: dict) -> None:
    runner = _runner(ckpt, **args)
    cached, _ = answer_conversation(runner, [image], HISTORY, QUESTION, dict(GEN), "cache")
    again, session = answer_conversation(runner, [image], HISTORY, QUESTION, dict(GEN), "reprefill")
    assert cached, "a non-empty answer (comparing empty strings proves nothing)"
    assert cached == again == _whole_conversation(runner, image)
    assert session.turns == 2 and session.conv.messages[1][1] == "red"  # turn 1 answered by its ground truth


def _hand_run_cache(runner: LlavaRunner, image: Image.Image) -> str:
    """Cache mode by hand: turn 1's prompt prefilled with the image (a method chooses there), then turn 2's new text
    run over that KV cache at the positions after it, then greedy decoding one token at a time."""
    model, tokenizer = runner.model, runner.tokenizer
    conv = get_conv_template(runner.conv_template)
    conv.append_message(conv.roles[0], build_query(HISTORY[0][0], 1, model.config))
    conv.append_message(conv.roles[1], None)
    first = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
    conv.messages[-1][-1] = HISTORY[0][1]
    conv.append_message(conv.roles[0], QUESTION)
    conv.append_message(conv.roles[1], None)
    whole = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
    assert torch.equal(whole[: first.shape[0]], first)  # turn 2's prompt extends turn 1's
    pixels = process_images([image], runner.image_processor, model.config)
    with torch.inference_mode():
        batch = model.multimodal_batch(first[None], None, None, pixels, [image.size], "left", truncate=False)
        out = model(
            inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
            use_cache=True, **model.pruning_inputs(batch.image_ids),
        )  # fmt: skip
        ids, position = whole[None, first.shape[0] :], int(batch.position_ids.max()) + 1
        generated: list[int] = []
        for _ in range(GEN["max_new_tokens"]):
            positions = position + torch.arange(ids.shape[1])[None]
            out = model(input_ids=ids, position_ids=positions, past_key_values=out.past_key_values, use_cache=True)
            token = int(out.logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            generated.append(token)
            ids, position = torch.tensor([[token]]), position + positions.shape[1]
    return tokenizer.decode(generated, skip_special_tokens=True).split("</s>")[0].strip()


@pytest.mark.parametrize(
    "args", [{"method": "fastv", "budget": 40}, {"budget": 32}, {"method": "divprune", "budget": 6}],
    ids=["fastv", "visionzip", "divprune"],
)  # fmt: skip
def test_cache_mode_equals_a_prefill_continued_by_hand(ckpt: Path, image: Image.Image, args: dict) -> None:
    runner = _runner(ckpt, **args)
    cached, session = answer_conversation(runner, [image], HISTORY, QUESTION, dict(GEN), "cache")
    assert cached and cached == _hand_run_cache(runner, image)
    if args.get("method") == "fastv":  # the only pruning prefill was turn 1's: its layer-average is recorded
        assert session.layer_average is not None
        again, _ = answer_conversation(runner, [image], HISTORY, QUESTION, dict(GEN), "reprefill")
        assert again != cached  # FastV re-chooses for turn 2 in reprefill: this test tells the modes apart


def test_requests_with_and_without_history_in_one_batch(ckpt: Path, image: Image.Image) -> None:
    runner = _runner(ckpt, method="divprune", budget=6)
    single = "Is it bright?" + SHORT_ANSWER_PROMPT
    answers = answer_requests(
        runner, [single, QUESTION], [[image], [image]], [[], HISTORY], dict(GEN), "cache"
    )  # fmt: skip
    alone = _runner(ckpt, method="divprune", budget=6)
    assert answers == [alone.generate([single], [[image]], dict(GEN))[0], _whole_conversation(runner, image)]
    summary = runner.tally.summary()
    assert (summary["requests"], summary["layer_average_inputs"]) == (2, 6.0)  # 6 kept tokens in each


@pytest.mark.parametrize("mode", ["cache", "reprefill"])
def test_cdpruner_keeps_turn_1s_question_in_cache_mode_and_rereads_in_reprefill(
    ckpt: Path, image: Image.Image, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = _runner(ckpt, method="cdpruner", budget=6)
    seen: list = []  # the instructions each encoding of the image was selected with
    select = selection_module.select_images
    monkeypatch.setattr(
        "llava.model.llava_arch.select_images", lambda m, v, c, t=None: seen.append(t) or select(m, v, c, t)
    )
    answer, session = answer_conversation(runner, [image], HISTORY, QUESTION, dict(GEN), mode)
    first, second = ["What colour is the square?"], ["What shape is in the corner?"]  # without the suffix
    assert seen == ([first] if mode == "cache" else [first, second])
    assert answer and session.tokens_after == 6
    if mode == "reprefill":  # the whole conversation selected for turn 2's question, as generate with it
        assert answer == _whole_conversation(runner, image, instructions=second)


def test_lmms_eval_runs_both_tasks_through_the_plugin(ckpt: Path, tmp_path: Path) -> None:
    """The written tasks through lmms-eval (eval.grid in process): the recorded turn-2 answers are the chats', the
    single-turn twin's the batched ones'; the history survives lmms-eval's dataset loading."""
    pytest.importorskip("lmms_eval")
    from eval import grid
    from eval.local_task import doc_to_text, doc_to_visual
    from eval.tables import load_spec

    questions = conversations(read_llava_items(write_llava_items(tmp_path / "items")))
    write_multiturn_task(questions, tmp_path / "tasks", "pairs", max_new_tokens=GEN["max_new_tokens"])
    spec_path = tmp_path / "mt.yaml"
    spec_path.write_text(
        "name: mt\ntitle: two turns\ninclude_paths: [tasks]\n"
        f"model: {{pretrained: {ckpt}, device: cpu}}\nbaseline: {{method: FastV, tokens: 40}}\n"
        "rows:\n  - {method: FastV, tokens: 40, model_args: {method: fastv, budget: 40, multiturn: reprefill}}\n"
        "benchmarks:\n  - {column: T2, task: pairs, metric: exact_match}\n"
        "  - {column: T1, task: pairs_single, metric: exact_match}\n"
    )
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}.items():
            env.setenv(name, value)
        env.chdir(tmp_path)
        outcome = grid.run_grid(load_spec(spec_path), tmp_path / "out", batch_size=2, group=True, in_process=True)
    assert not outcome["failed"]
    runner = _runner(ckpt, method="fastv", budget=40)
    kwargs = {"pre_prompt": "", "post_prompt": SHORT_ANSWER_PROMPT}
    for task, chat in (("pairs", True), ("pairs_single", False)):
        (path,) = (tmp_path / "out").rglob(f"*_samples_{task}.jsonl")
        samples = sorted(map(json.loads, path.read_text().splitlines()), key=lambda s: s["doc_id"])
        docs = [q.to_doc() if chat else q.single().to_doc() for q in questions]
        contexts, visuals = [doc_to_text(d, kwargs) for d in docs], [doc_to_visual(d) for d in docs]
        if chat:
            rows = zip(contexts, visuals, docs, strict=True)
            expected = [answer_conversation(runner, v, history_of(d), c, dict(GEN), "reprefill")[0] for c, v, d in rows]
        else:
            expected = runner.generate(contexts, visuals, dict(GEN))
        assert all(expected) and [s["filtered_resps"] for s in samples] == expected, task


def test_a_vqa_sets_questions_paired_by_image(tmp_path: Path) -> None:
    images = [str(tmp_path / f"{i}.png") for i in range(3)]
    asked = [Question(f"q{i}", (images[i % 2],), f"Q{i}?", f"A{i}") for i in range(5)]  # 0,2,4 on one image; 1,3
    asked.append(Question("q5", (images[2],), "Q5?", "A5"))  # alone on its image
    paired = pair_by_image(asked)
    assert [(q.question_id, q.history, q.question) for q in paired] == [
        ("q2", (("Q0?" + SHORT_ANSWER_PROMPT, "A0"),), "Q2?"), ("q3", (("Q1?" + SHORT_ANSWER_PROMPT, "A1"),), "Q3?")
    ]  # fmt: skip
    with pytest.raises(ValueError, match="no two of the 1 questions share their images"):
        pair_by_image(asked[-1:])
