"""Multiple choice: llava_visionzip's loglikelihood equals lmms-eval's own ``llava`` model on the same checkpoint.

lmms-eval's ``llava`` wrapper runs on our ``llava`` package (its builder, templates, ``process_images``,
``tokenizer_image_token``); it loads in float16 as LLaVA's builder does, so the tiny checkpoints here hold weights
that float16 represents exactly and the wrapper's model is turned back to float32 after loading. Its images still go
through float16 (the wrapper casts them), which moves the scores by ~1e-5.

Its greedy flag is not compared: it takes the argmax at each token's own position (one too late) and, with an image,
at positions of the image-expanded sequence, so it says nothing about the continuation. Ours is checked against a
hand-computed reference and on a continuation constructed to be greedy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance

from eval.llava_visionzip import LlavaVisionZip
from eval.options import ModelOptions
from eval.runner import ContinuationScore, LlavaRunner
from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.mm_utils import tokenizer_image_token
from llava.tiny import write_tiny_llava

SAMPLE = Path(__file__).resolve().parents[1] / "llava/serve/examples/chelsea.jpg"
TASK, SPLIT = "mc", "test"
QUESTIONS = ["What colour is the square?", "What is in the picture?\nA. a cat\nB. a dog", "Which word is a colour?"]
CHOICES = [" red", " a small blue circle", " a cat on a blanket"]  # multi-token, with lmms-eval's " " delimiter
ATOL = 1e-4  # float32 scores; the reference's float16 images move them by ~1e-5


def _round_to_float16(path: Path) -> None:
    """Rewrite a safetensors file with float32 weights that float16 holds exactly (still stored as float32)."""
    tensors = {k: v.half().float() if v.is_floating_point() else v for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loglikelihood")
    folders = {"v15": write_tiny_llava(root), "v16": write_tiny_llava(root, next=True)}
    for folder in folders.values():
        _round_to_float16(folder / "model.safetensors")
    _round_to_float16(
        Path(json.loads((folders["v15"] / "config.json").read_text())["mm_vision_tower"]) / "model.safetensors"
    )
    return folders


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    with Image.open(SAMPLE) as photo:
        cat = photo.convert("RGB")
    images = [[Image.new("RGB", (40, 30), (220, 20, 20))], [cat], []]  # the last question has no image
    return [{"question": q, "images": i} for q, i in zip(QUESTIONS, images, strict=True)]


def _instances(docs: list[dict]) -> list[Instance]:
    """One loglikelihood request per (question, choice), as lmms-eval's multiple-choice tasks build them."""
    return [
        Instance(
            request_type="loglikelihood",
            arguments=(doc["question"], choice, lambda d: d["images"], doc_id, TASK, SPLIT),
            idx=i,
            metadata={"task": TASK, "doc_id": doc_id, "repeats": 1},
        )
        for doc_id, doc in enumerate(docs)
        for i, choice in enumerate(CHOICES)
    ]


def _lmms_eval_llava(ckpt: Path, conv_template: str, docs: list[dict]) -> list[tuple[float, bool]]:
    """lmms-eval's own ``llava`` model, in float32 on the CPU, on the requests."""
    from lmms_eval.models.simple.llava import Llava

    reference = Llava(pretrained=str(ckpt), device="cpu", device_map="auto", conv_template=conv_template)
    reference.model.float()  # loaded in float16; the weights are float16-exact, so nothing is lost
    reference.task_dict = {TASK: {SPLIT: docs}}
    return reference.loglikelihood(_instances(docs))


@pytest.mark.parametrize(("kind", "conv_template"), [("v15", "vicuna_v1"), ("v16", "mistral_instruct")])
def test_plugin_matches_lmms_eval_llava(
    ckpts: dict[str, Path], docs: list[dict], kind: str, conv_template: str
) -> None:
    expected = _lmms_eval_llava(ckpts[kind], conv_template, docs)
    plugin = LlavaVisionZip(pretrained=str(ckpts[kind]), device="cpu", conv_template=conv_template, batch_size=4)
    plugin.task_dict = {TASK: {SPLIT: docs}}
    got = [result.text for result in plugin.loglikelihood(_instances(docs))]
    assert [loss for loss, _ in got] == pytest.approx([loss for loss, _ in expected], abs=ATOL)
    for row in range(len(docs)):  # the choice each question picks (argmin), where the scores are apart
        ours, theirs = (torch.tensor([s[i][0] for i in range(row * 3, row * 3 + 3)]) for s in (got, expected))
        if (theirs.sort().values.diff() > 10 * ATOL).all():
            assert ours.argmin() == theirs.argmin()


def _hand_score(runner: LlavaRunner, question: str, choice: str, images: list) -> ContinuationScore:
    """The full model forward on the token sequence lmms-eval builds, summing the reply tokens' log-probs.

    The answered conversation ``... ASSISTANT: <choice></s>`` is tokenized; the tokens past the open prompt's
    length are scored. The image is in the prompt, so they are the last tokens of the image-expanded sequence too.
    """
    query = "<image>\n" * len(images) + question
    prompts = []
    for reply in (None, choice):
        conv = conv_templates[runner.conv_template].copy()  # as lmms-eval's llava takes it
        conv.append_message(conv.roles[0], query)
        conv.append_message(conv.roles[1], reply)
        prompts.append(conv.get_prompt())
    start = len(tokenizer_image_token(prompts[0], runner.tokenizer, IMAGE_TOKEN_INDEX))
    ids = tokenizer_image_token(prompts[1], runner.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    pixels, sizes = runner._images([images]) if images else (None, None)
    with torch.inference_mode():
        logits = runner.model(input_ids=ids, images=pixels, image_sizes=sizes).logits[0].float()  # (N, V)
    targets = ids[0, start:]  # (T,)
    log_probs = torch.log_softmax(logits[-targets.shape[0] - 1 : -1], dim=-1)  # (T, V)
    total = sum(log_probs[t, token].item() for t, token in enumerate(targets.tolist()))
    return ContinuationScore(total, targets.shape[0], bool((log_probs.argmax(-1) == targets).all()))


@pytest.fixture(scope="module")
def runner(ckpts: dict[str, Path]) -> LlavaRunner:
    return LlavaRunner.load(ModelOptions(pretrained=str(ckpts["v15"]), conv_template="vicuna_v1"), "cpu")


def test_batched_equals_one_by_one_and_the_hand_reference(runner: LlavaRunner, docs: list[dict]) -> None:
    questions = [doc["question"] for doc in docs for _ in CHOICES]
    choices = [choice for _ in docs for choice in CHOICES]
    images = [doc["images"] for doc in docs for _ in CHOICES]
    batched = runner.loglikelihood(questions, choices, images)
    for score, question, choice, image in zip(batched, questions, choices, images, strict=True):
        single = runner.loglikelihood([question], [choice], [image])[0]
        hand = _hand_score(runner, question, choice, image)
        assert score.num_tokens == single.num_tokens == hand.num_tokens
        assert score.log_prob == pytest.approx(single.log_prob, abs=ATOL)
        assert score.log_prob == pytest.approx(hand.log_prob, abs=ATOL)
        assert score.greedy == single.greedy == hand.greedy
        assert score.loss == pytest.approx(-hand.log_prob / hand.num_tokens, abs=ATOL)


def test_greedy_flag_counts_the_end_of_turn(ckpts: dict[str, Path], docs: list[dict]) -> None:
    """A reply the model decodes greedily is greedy only once ``</s>`` is its argmax too.

    The reply is the model's first greedy token; swapping the output rows of ``</s>`` and of the token greedy
    decoding picks next makes ``</s>`` that argmax without touching any other prediction.
    """
    runner = LlavaRunner.load(ModelOptions(pretrained=str(ckpts["v15"]), conv_template="vicuna_v1"), "cpu")
    question, images = docs[0]["question"], docs[0]["images"]
    open_ids = tokenizer_image_token(
        runner.prompt(question, 1), runner.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt"
    )
    pixels, sizes = runner._images([images])
    decoded = open_ids[None]
    with torch.inference_mode():
        for _ in range(2):
            token = runner.model(input_ids=decoded, images=pixels, image_sizes=sizes).logits[0, -1].argmax()
            decoded = torch.cat([decoded, token.view(1, 1)], dim=1)
    first, second = decoded[0, -2:].tolist()
    eos = runner.tokenizer.eos_token_id
    reply = runner.tokenizer.decode([first]).strip()
    answered = runner.scoring_prompts(question, reply, 1)[1]
    ids = tokenizer_image_token(answered, runner.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
    assert ids[open_ids.shape[0] :].tolist() == [first, eos] and eos not in (first, second)  # the construction holds
    before = runner.loglikelihood([question], [reply], [images])[0]
    assert before.num_tokens == 2  # the reply's token and the template's </s>
    assert not before.greedy and not _hand_score(runner, question, reply, images).greedy  # </s> is not the argmax
    head = runner.model.get_output_embeddings().weight
    with torch.no_grad():
        head[[eos, second]] = head[[second, eos]]
    after = runner.loglikelihood([question], [reply], [images])[0]
    assert after.greedy and _hand_score(runner, question, reply, images).greedy
    assert not runner.loglikelihood([question], [CHOICES[2]], [images])[0].greedy
