"""Entry points on tiny checkpoints: run_llava (counts, compare, several images) and the chat's cached turns."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import transformers
from helpers.sample import MAX_NEW, SAMPLE
from PIL import Image
from torch import nn

from llava import inference
from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import get_conv_template
from llava.eval import run_llava
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from llava.model.config import LlavaConfig, LlavaMistralConfig
from llava.serve import chat, cli
from llava.tiny import write_tiny_llava
from visionzip import VisionZipConfig
from visionzip.baselines import FastVConfig

REPO = Path(__file__).resolve().parents[1]
DOMINANT, CONTEXTUAL = 8, 2
VISIONZIP_FLAGS = ["--visionzip-dominant", str(DOMINANT), "--visionzip-contextual", str(CONTEXTUAL)]


@pytest.fixture(autouse=True)
def _quiet_transformers() -> Iterator[None]:
    """The entry points lower transformers' logging for the process; restore it after each test."""
    level = transformers.utils.logging.get_verbosity()
    yield
    transformers.utils.logging.set_verbosity(level)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("entry")
    return {"v15": write_tiny_llava(root, next=False), "v16": write_tiny_llava(root, next=True)}


def _patches(ckpt: Path) -> int:
    """Patches per image of the checkpoint's tower, from the CLIP config on disk."""
    tower = json.loads((ckpt / "config.json").read_text())["mm_vision_tower"]
    vision = json.loads((Path(tower) / "config.json").read_text())["vision_config"]
    return (vision["image_size"] // vision["patch_size"]) ** 2


def _run(ckpt: Path, *extra: str, query: str = "What is in the image?", images: str = str(SAMPLE)) -> dict:
    argv = ["--model-path", str(ckpt), "--image-file", images, "--query", query, "--device", "cpu"]
    return run_llava.main([*argv, "--max_new_tokens", str(MAX_NEW), *extra])


def test_run_llava_counts_without_and_with_visionzip(ckpts: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    plain = _run(ckpts["v15"])
    zipped = _run(ckpts["v15"], *VISIONZIP_FLAGS)
    patches = _patches(ckpts["v15"])
    assert isinstance(plain["answer"], str) and plain["answer"]
    assert plain["tokens_before"] == plain["tokens_after"] == patches
    assert zipped["tokens_before"] == patches
    assert zipped["tokens_after"] == DOMINANT + CONTEXTUAL
    assert plain["ttft_ms"] > 0 and zipped["ttft_ms"] > 0
    out = capsys.readouterr().out
    assert f"visual tokens: {patches} -> {DOMINANT + CONTEXTUAL}" in out
    assert zipped["answer"] in out


def test_run_llava_answer_equals_generate_by_hand(ckpts: dict[str, Path]) -> None:
    """The CLI's greedy answer is the model's answer to the prompt rendered by hand (``_one_shot``)."""
    answer = _run(ckpts["v15"], *VISIONZIP_FLAGS)["answer"]
    tokenizer, model, image_processor, _ = load_pretrained_model(str(ckpts["v15"]), device="cpu")
    model.set_visionzip(VisionZipConfig(DOMINANT, CONTEXTUAL))
    image = Image.open(SAMPLE).convert("RGB")
    expected, _ = _one_shot(model, tokenizer, image_processor, [("<image>\nWhat is in the image?", None)], image)
    assert answer == expected


def test_run_llava_compare(ckpts: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    result = _run(ckpts["v15"], *VISIONZIP_FLAGS, "--compare")
    plain, zipped = _run(ckpts["v15"]), _run(ckpts["v15"], *VISIONZIP_FLAGS)
    assert result["answer_baseline"] == plain["answer"]
    assert result["answer"] == zipped["answer"]
    assert result["tokens_baseline"] == result["tokens_before"] == _patches(ckpts["v15"])
    assert result["tokens_after"] == DOMINANT + CONTEXTUAL
    assert result["ttft_ms_baseline"] > 0 and result["ttft_ms"] > 0
    out = capsys.readouterr().out
    assert "without VisionZip" in out and f"VisionZip {DOMINANT}+{CONTEXTUAL}" in out


def test_run_llava_several_images(ckpts: dict[str, Path]) -> None:
    both = f"{SAMPLE},{SAMPLE}"
    result = _run(ckpts["v15"], *VISIONZIP_FLAGS, "--compare", images=both)
    assert result["tokens_before"] == result["tokens_baseline"] == 2 * _patches(ckpts["v15"])
    assert result["tokens_after"] == 2 * (DOMINANT + CONTEXTUAL)
    semicolon = _run(ckpts["v15"], *VISIONZIP_FLAGS, "--sep", ";", images=f"{SAMPLE};{SAMPLE}")
    assert semicolon["answer"] == result["answer"]
    with pytest.raises(ValueError, match="image tokens"):
        _run(ckpts["v15"], query="<image>\nOnly one placeholder", images=both)


def test_anyres_count_matches_the_model(ckpts: dict[str, Path]) -> None:
    """The layout-only 'before' count equals the tokens the model really gives without VisionZip (LLaVA-1.6)."""
    result = _run(ckpts["v16"], *VISIONZIP_FLAGS, "--compare")
    assert result["tokens_baseline"] == result["tokens_before"] > _patches(ckpts["v16"])
    assert result["tokens_after"] % (DOMINANT + CONTEXTUAL) == 0  # per crop, over 1 + crops views
    assert result["tokens_after"] > DOMINANT + CONTEXTUAL


def test_flags_defaults_and_query() -> None:
    parser = run_llava.build_parser()
    base = ["--model-path", "m", "--image-file", "i", "--query", "q"]
    dashes = parser.parse_args([*base, "--max-new-tokens", "7", "--top-p", "0.5", "--num-beams", "2"])
    underscores = parser.parse_args([*base, "--max_new_tokens", "7", "--top_p", "0.5", "--num_beams", "2"])
    assert vars(dashes) == vars(underscores)
    assert (dashes.max_new_tokens, dashes.top_p, dashes.num_beams) == (7, 0.5, 2)
    with pytest.raises(SystemExit):
        run_llava.main([*base, "--visionzip-dominant", "54"])  # contextual missing
    assert inference.default_conv_mode(LlavaConfig()) == "vicuna_v1"
    assert inference.default_conv_mode(LlavaMistralConfig()) == "mistral_instruct"
    assert inference.build_query("Q", 2, LlavaConfig()) == "<image>\n<image>\nQ"
    wrapped = inference.build_query("Q", 1, LlavaConfig(mm_use_im_start_end=True))
    assert wrapped == "<im_start><image><im_end>\nQ"
    assert inference.build_query("A <image-placeholder> B", 1, LlavaConfig()) == "A <image> B"
    assert inference.build_query("<image>\nQ", 1, LlavaConfig()) == "<image>\nQ"


def test_next_token_sampling() -> None:
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0])
    assert chat.next_token(logits, 0.0, None) == 1
    assert all(chat.next_token(logits, 1.0, 1e-6) == 1 for _ in range(20))  # the nucleus holds the top token only
    seeded = [chat.next_token(logits, 1.0, 0.9, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert seeded[0] == seeded[1] and seeded[0] in (1, 2)


@contextmanager
def _count_calls(module: nn.Module, lengths: list[int] | None = None) -> Iterator[list[int]]:
    """Count forward calls of ``module``; with ``lengths``, record the sequence length of each call."""
    calls: list[int] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append(1)
        if lengths is not None:
            lengths.append(kwargs["inputs_embeds"].shape[1])

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def _one_shot(model, tokenizer, image_processor, turns: list[tuple[str, str | None]], image: Image.Image) -> tuple:
    """Independent reference: the whole conversation rendered, tokenized and answered by ``model.generate``.

    Returns:
        (answer, prompt ids (1, L) with one placeholder).
    """
    conv = get_conv_template("vicuna_v1")
    for user, answer in turns:
        conv.append_message(conv.roles[0], user)
        conv.append_message(conv.roles[1], answer)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    pixels = process_images([image], image_processor, model.config)
    out = model.generate(ids, images=pixels, image_sizes=[image.size], do_sample=False, max_new_tokens=MAX_NEW)
    return tokenizer.decode(out[0], skip_special_tokens=True).strip(), ids


ORIGINAL = VisionZipConfig(DOMINANT, CONTEXTUAL, positions="original")


@pytest.mark.parametrize(
    ("visionzip", "diverge"),
    [(None, 0), (VisionZipConfig(DOMINANT, CONTEXTUAL), 0), (None, 4), (ORIGINAL, 0), (ORIGINAL, 4)],
)
def test_chat_second_turn_equals_whole_conversation(
    ckpts: dict[str, Path], visionzip: VisionZipConfig | None, diverge: int
) -> None:
    """Two cached turns answer as the whole conversation from scratch; the image is encoded once.

    ``diverge``: pretend the last cached ids differ from the re-rendered prompt (as when an answer re-tokenizes
    differently), so the cache must be cut back and those positions run again.
    """
    tokenizer, model, image_processor, context_len = load_pretrained_model(str(ckpts["v15"]), device="cpu")
    model.set_visionzip(visionzip)
    image = Image.open(SAMPLE).convert("RGB")
    session = chat.ChatSession(model, tokenizer, image_processor, get_conv_template("vicuna_v1"), [image], context_len)
    turn_lengths: list[int] = []
    with _count_calls(model.get_vision_tower().vision_tower.embeddings) as tower_calls:
        first = session.ask("What is in the image?", max_new_tokens=MAX_NEW)
        if diverge:
            session.cached_ids[-diverge:] = [-1] * diverge  # an id no prompt holds
        with _count_calls(model.get_model(), turn_lengths):
            second = session.ask("And what colour is it?", max_new_tokens=MAX_NEW)
    assert len(tower_calls) == 1
    assert session.tokens_after == (_patches(ckpts["v15"]) if visionzip is None else visionzip.tokens)
    assert session.cache.get_seq_length() == len(session.cached_ids) - 1 + session.tokens_after

    turns = [("<image>\nWhat is in the image?", first), ("And what colour is it?", None)]
    expected, ids = _one_shot(model, tokenizer, image_processor, turns, image)
    assert second == expected
    # the second turn kept the first prompt (system, image, question) in the cache and ran what follows it only
    conv = get_conv_template("vicuna_v1")
    conv.append_message(conv.roles[0], turns[0][0])
    conv.append_message(conv.roles[1], None)
    first_prompt = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX)
    assert ids[0, : len(first_prompt)].tolist() == first_prompt
    assert turn_lengths[0] <= ids.shape[1] - len(first_prompt)


def test_chat_first_turn_equals_run_llava(ckpts: dict[str, Path]) -> None:
    tokenizer, model, image_processor, _ = load_pretrained_model(str(ckpts["v15"]), device="cpu")
    model.set_visionzip(VisionZipConfig(DOMINANT, CONTEXTUAL))
    image = Image.open(SAMPLE).convert("RGB")
    session = chat.ChatSession(model, tokenizer, image_processor, get_conv_template("vicuna_v1"), [image])
    answer = session.ask("What is in the image?", max_new_tokens=MAX_NEW)
    assert answer == _run(ckpts["v15"], *VISIONZIP_FLAGS)["answer"]
    assert session.tokens_before == _patches(ckpts["v15"]) and session.last_ttft_ms > 0


def test_cli_main_reads_turns_until_eof(
    ckpts: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    argv = ["--model-path", str(ckpts["v15"]), "--image-file", str(SAMPLE), "--device", "cpu"]
    argv += ["--temperature", "0", "--max-new-tokens", str(MAX_NEW), *VISIONZIP_FLAGS]
    monkeypatch.setattr("sys.stdin", io.StringIO("What is in the image?\nAnd what colour is it?\n"))
    answers = cli.main(argv)
    assert len(answers) == 2
    out = capsys.readouterr().out
    assert out.count("ASSISTANT: ") == 2
    assert out.count(f"visual tokens: {_patches(ckpts['v15'])} -> {DOMINANT + CONTEXTUAL}") == 2
    monkeypatch.setattr("sys.stdin", io.StringIO("What is in the image?\n\nnever asked\n"))
    assert cli.main(argv) == answers[:1]  # an empty line ends the chat


def test_chat_refuses_a_prompt_longer_than_the_context(ckpts: dict[str, Path]) -> None:
    tokenizer, model, image_processor, _ = load_pretrained_model(str(ckpts["v15"]), device="cpu")
    image = Image.open(SAMPLE).convert("RGB")
    conv = get_conv_template("vicuna_v1")
    session = chat.ChatSession(model, tokenizer, image_processor, conv, [image], context_len=_patches(ckpts["v15"]))
    with pytest.raises(ValueError, match="context length"):
        session.ask("What is in the image?")
    assert conv.messages == []


DEEPSPEED_PROBE = "Setting accelerator to CPU"  # DeepSpeed's import-time line on a machine without a GPU


def _python(code: str) -> str:
    """stdout and stderr of ``code`` in a fresh interpreter (nothing imported yet)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return done.stdout + done.stderr


@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None or torch.cuda.is_available(),
    reason="DeepSpeed prints its accelerator probe only where it is installed and finds no GPU",
)
def test_quiet_deepspeed_probe_drops_only_the_probe() -> None:
    """DeepSpeed prints the probe when imported (what transformers' save_pretrained does through accelerate); after
    quiet_deepspeed_probe it does not, and DeepSpeed's other warnings still pass."""
    assert DEEPSPEED_PROBE in _python("import deepspeed")
    other = "from deepspeed.utils import logger; logger.warning('another warning')"
    quiet = _python(f"from llava.logs import quiet_deepspeed_probe; quiet_deepspeed_probe(); import deepspeed; {other}")
    assert DEEPSPEED_PROBE not in quiet and "another warning" in quiet


def test_demo_script_prints_answers_and_no_deepspeed_line(tmp_path: Path) -> None:
    """``scripts/demo.sh`` (a tiny checkpoint written, then run_llava --compare on the sample photo) prints the
    checkpoint, both answers and both summary lines, and no DeepSpeed line: nothing in it trains."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "tiny")}
    done = subprocess.run(
        ["bash", "scripts/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=True
    )
    assert DEEPSPEED_PROBE not in done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == str(tmp_path / "tiny" / "llava-v1.5-tiny")
    assert lines[1] == "without VisionZip:" and lines[3] == "VisionZip 18+4 (as asked):"
    # the tiny tower: 8 x 8 patches, [CLS] dropped as LLaVA does; 18 dominant + 4 contextual kept
    assert lines[5].startswith("[without VisionZip] visual tokens: 64 -> 64 | time to first token: ")
    assert lines[6].startswith("[VisionZip 18+4 (as asked)] visual tokens: 64 -> 22 | time to first token: ")


# --- methods that prune inside the language model (--method) ---------------------------------------------------------
FASTV_FLAGS = ["--method", "fastv", "--fastv-layer", "1", "--budget", "40"]  # the tiny Llama has 2 layers
SECOND_QUESTION = "Now look at the top left corner: what colour is there?"


def test_run_llava_with_an_in_llm_method(ckpts: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    """FastV K=1 at a layer-average of 40 on 64 patches and 2 layers keeps 16 after layer 0: (64 + 16) / 2 = 40 over
    the layers' inputs, (16 + 16) / 2 = 16 over their outputs; the answer is the model's own with that config."""
    result = _run(ckpts["v15"], *FASTV_FLAGS)
    patches = _patches(ckpts["v15"])
    assert result["tokens_after"] == patches  # every token enters the language model; it prunes inside
    assert result["layer_average"] == ((patches + 16) / 2, 16.0)
    assert "FastV K=1, layer-average 40" in result["visionzip"]
    assert "average over layers: 40.0 in / 16.0 out" in capsys.readouterr().out
    tokenizer, model, image_processor, _ = load_pretrained_model(str(ckpts["v15"]), device="cpu")
    model.set_pruning(FastVConfig(layer=1, budget=40))
    expected, _ = _one_shot(model, tokenizer, image_processor, [("<image>\nWhat is in the image?", None)], _image())
    assert result["answer"] == expected


def test_a_budget_alone_means_visionzip(ckpts: dict[str, Path]) -> None:
    result = _run(ckpts["v15"], "--budget", "8")
    assert result["tokens_after"] == 8 and "VisionZip 7+1" in result["visionzip"]  # the paper's split of 8


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--method", "fastv"], "FastV layer K=2 must be below the model's 2 decoder layers"),
        (["--fastv-layer", "1"], r"--fastv-\* options given, but --method is not given"),
        (["--method", "pdrop", *VISIONZIP_FLAGS], "runs pdrop alone: the --visionzip-"),
        (["--method", "fastv", "--fastv-layer", "1", "--budget", "10"], "cannot average 10 visual tokens"),
        (["--method", "pdrop", "--pdrop-layers", "1", "--budget", "64"], "a budget and layers both set the count"),
        (["--method", "sparsevlm", "--sparsevlm-recycle", "maybe"], "takes true or false"),
    ],
)
def test_bad_method_flags_are_refused_with_the_reason(
    ckpts: dict[str, Path], capsys: pytest.CaptureFixture, flags: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _run(ckpts["v15"], *flags)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def _image() -> Image.Image:
    return Image.open(SAMPLE).convert("RGB")


def _two_turns(ckpt: Path, method, mode: str) -> tuple[chat.ChatSession, list[str], list[set[int]]]:
    """A two-turn chat with ``method`` set; the answers and, per turn, the columns of the first prompt's image
    tokens the language model's last layers saw after the turn's prefill."""
    tokenizer, model, image_processor, context_len = load_pretrained_model(str(ckpt), device="cpu")
    if isinstance(method, VisionZipConfig):
        model.set_visionzip(method)
    else:
        model.set_pruning(method)
    conv = get_conv_template("vicuna_v1")
    session = chat.ChatSession(model, tokenizer, image_processor, conv, [_image()], context_len, multiturn=mode)
    answers, kept = [], []
    for question in ("What is in the image?", SECOND_QUESTION):
        answers.append(session.ask(question, max_new_tokens=MAX_NEW))
        columns = model.get_model().__dict__.get("kept_columns")
        start = session.cached_ids.index(IMAGE_TOKEN_INDEX)
        span = range(start, start + _patches(ckpt))
        kept.append(set() if columns is None else {int(c) for c in columns[0] if int(c) in span})
    return session, answers, kept


def test_the_two_multiturn_modes_differ_for_a_text_conditioned_method(ckpts: dict[str, Path]) -> None:
    """FastV keeps 4 of 64 image tokens after layer 0. Re-prefill chooses again for turn 2's question (its answer is
    the whole conversation generated from scratch, an independent reference); the cache mode keeps turn 1's choice,
    so turn 2 sees other image tokens and its logits differ."""
    method = FastVConfig(layer=1, keep=4)
    again, answers, kept = _two_turns(ckpts["v15"], method, "reprefill")
    cached, cached_answers, cached_kept = _two_turns(ckpts["v15"], method, "cache")
    assert kept[0] == cached_kept[0] and len(kept[0]) == 4
    assert kept[1] != kept[0], "turn 2's question must move FastV's choice for this test to mean anything"
    assert cached_kept[1] == cached_kept[0]  # no new prefill: the first turn's choice stays
    tokenizer, model, image_processor, _ = load_pretrained_model(str(ckpts["v15"]), device="cpu")
    model.set_pruning(method)
    turns = [
        ("<image>\nWhat is in the image?", answers[0]),
        ("Now look at the top left corner: what colour is there?", None),
    ]
    assert answers[1] == _one_shot(model, tokenizer, image_processor, turns, _image())[0]
    assert cached_answers[0] == answers[0]
    assert not torch.allclose(again.last_first_logits, cached.last_first_logits, atol=1e-4)


def test_the_two_multiturn_modes_agree_for_visionzip(ckpts: dict[str, Path]) -> None:
    method = VisionZipConfig(DOMINANT, CONTEXTUAL)
    again, answers, _ = _two_turns(ckpts["v15"], method, "reprefill")
    cached, cached_answers, _ = _two_turns(ckpts["v15"], method, "cache")
    assert answers == cached_answers
    torch.testing.assert_close(again.last_first_logits, cached.last_first_logits, atol=1e-5, rtol=1e-5)
