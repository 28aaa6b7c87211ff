"""DivPrune, VisPruner and CDPruner through llava/'s entry points: run_llava's flags, the chat's two multi-turn modes,
a checkpoint's saved selection, the kept-patch picture and the web demo's backend, each against the model by hand."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from helpers.sample import MAX_NEW, SAMPLE
from PIL import Image

from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import get_conv_template
from llava.eval import run_llava
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from llava.serve import chat
from llava.serve import show as show_cli
from llava.serve.compare import CompareBackend
from llava.tiny import write_tiny_llava
from visionzip.baselines.cdpruner import CDPrunerConfig
from visionzip.baselines.divprune import DivPruneConfig, divprune_select
from visionzip.baselines.vispruner import VisPrunerConfig
from visionzip.show_kept import KEPT_GID

QUERY = "What is in the image?"
SECOND = "Now look at the top left corner: what colour is there?"
CONFIGS = {
    "divprune": DivPruneConfig(tokens=8),
    "vispruner": VisPrunerConfig(tokens=8, important_ratio=0.75),
    "cdpruner": CDPrunerConfig(tokens=8),
}
FLAGS = {
    "divprune": ["--method", "divprune", "--budget", "8"],
    "vispruner": ["--method", "vispruner", "--budget", "8", "--vispruner-important-ratio", "0.75"],
    "cdpruner": ["--method", "cdpruner", "--budget", "8"],
}


@pytest.fixture(autouse=True)
def _quiet_transformers():
    """The entry points lower transformers' logging for the process; restore it after each test."""
    level = transformers.utils.logging.get_verbosity()
    yield
    transformers.utils.logging.set_verbosity(level)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``v15``/``v16``: tiny LLaVA-1.5 and NeXT; ``saved``: the 1.5 with a VisPruner selection in config.json."""
    root = tmp_path_factory.mktemp("selection_entry")
    v15 = write_tiny_llava(root, next=False)
    saved = shutil.copytree(v15, root / "saved")
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "token_selection": CONFIGS["vispruner"].to_dict()}))
    return {"v15": v15, "v16": write_tiny_llava(root, next=True), "saved": saved}


def _run(ckpt: Path, *extra: str, query: str = QUERY) -> dict:
    argv = ["--model-path", str(ckpt), "--image-file", str(SAMPLE), "--query", query, "--device", "cpu"]
    return run_llava.main([*argv, "--max_new_tokens", str(MAX_NEW), *extra])


def _image() -> Image.Image:
    return Image.open(SAMPLE).convert("RGB")


def _by_hand(ckpt: Path, cfg, turns: list[tuple[str, str | None]], instruction: str) -> str:
    """Independent reference: the model with ``cfg`` set by hand, the whole conversation rendered and answered by
    ``generate`` with ``instruction`` as the row's instruction."""
    tokenizer, model, image_processor, _ = load_pretrained_model(str(ckpt), device="cpu")
    model.set_selection(cfg)  # None: all tokens
    conv = get_conv_template("vicuna_v1")
    for user, answer in turns:
        conv.append_message(conv.roles[0], user)
        conv.append_message(conv.roles[1], answer)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    image = _image()
    pixels = process_images([image], image_processor, model.config)
    out = model.generate(
        ids, images=pixels, image_sizes=[image.size], instructions=[instruction], do_sample=False,
        max_new_tokens=MAX_NEW,
    )  # fmt: skip
    return tokenizer.decode(out[0], skip_special_tokens=True).strip()


@pytest.mark.parametrize("family", ["v15", "v16"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_run_llava_runs_each_selection(ckpts: dict[str, Path], family: str, method: str) -> None:
    result = _run(ckpts[family], *FLAGS[method])
    views = 1 if family == "v15" else result["tokens_after"] // 8
    assert result["tokens_after"] == 8 * views and (family == "v15" or views > 1)
    assert result["visionzip"] == f"{CONFIGS[method].describe()} (as asked)"
    assert result["layer_average"] is None
    assert result["answer"] == _by_hand(ckpts[family], CONFIGS[method], [(f"<image>\n{QUERY}", None)], QUERY)


def test_run_llava_compare_answers_without_and_with_the_selection(
    ckpts: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    result = _run(ckpts["v15"], *FLAGS["cdpruner"], "--compare")
    assert result["tokens_baseline"] == 64 and result["tokens_after"] == 8
    out = capsys.readouterr().out
    assert "[without cdpruner] visual tokens: 64 -> 64" in out and "[CDPruner, 8 tokens" in out


def test_a_checkpoints_saved_selection_runs_unless_told(ckpts: dict[str, Path]) -> None:
    saved = _run(ckpts["saved"])
    assert saved["visionzip"] == f"{CONFIGS['vispruner'].describe()} (saved in the checkpoint)"
    assert saved["tokens_after"] == 8
    assert _run(ckpts["saved"], "--budget", "6")["tokens_after"] == 6  # VisionZip at 6 asked: the selection goes off
    other = _run(ckpts["saved"], *FLAGS["divprune"])
    assert other["visionzip"].startswith("DivPrune, 8 tokens")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--method", "divprune", "--budget", "65"], "DivPrune, 65 tokens .* a view here has 64 patches"),
        (["--vispruner-important-ratio", "0.5"], r"--vispruner-\* options given, but --method is not given"),
        (["--method", "divprune", "--vispruner-important-ratio", "0.5"], "expected --method vispruner"),
        (["--method", "vispruner", "--vispruner-important-ratio", "1.5"], r"important_ratio must be in \[0, 1\]"),
        (["--method", "cdpruner", "--visionzip-dominant", "6", "--visionzip-contextual", "2"], "runs cdpruner alone"),
        (["--method", "divprune", "--budget", "7.5"], "keeps a whole number of tokens per image"),
    ],
)
def test_bad_selection_flags_are_refused_with_the_reason(
    ckpts: dict[str, Path], capsys: pytest.CaptureFixture, flags: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _run(ckpts["v15"], *flags)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def _two_turns(ckpt: Path, cfg, mode: str) -> tuple[chat.ChatSession, list[str], list[torch.Tensor], int]:
    """A two-turn chat with ``cfg``: the answers, each turn's image tokens, and how often the encoder ran."""
    tokenizer, model, image_processor, context_len = load_pretrained_model(str(ckpt), device="cpu")
    model.set_selection(cfg)
    runs: list[int] = []
    embeddings = model.get_vision_tower().vision_tower.get_input_embeddings()
    embeddings.register_forward_pre_hook(lambda *_: runs.append(1))
    conv = get_conv_template("vicuna_v1")
    session = chat.ChatSession(model, tokenizer, image_processor, conv, [_image()], context_len, multiturn=mode)
    answers, tokens = [], []
    for question in (QUERY, SECOND):
        answers.append(session.ask(question, max_new_tokens=MAX_NEW))
        tokens.append(session.features[0].tokens.clone())
    return session, answers, tokens, len(runs)


def test_cdpruner_chat_cache_keeps_turn_one_and_reprefill_selects_again(ckpts: dict[str, Path]) -> None:
    """Turn 2's answer equals the whole conversation generated from scratch with turn 1's question as the
    instruction ("cache") or with turn 2's ("reprefill"); the two questions select different patches."""
    cfg = CONFIGS["cdpruner"]
    _, cached, cached_tokens, cached_runs = _two_turns(ckpts["v15"], cfg, "cache")
    _, again, again_tokens, again_runs = _two_turns(ckpts["v15"], cfg, "reprefill")
    assert torch.equal(cached_tokens[0], cached_tokens[1]) and cached_runs == 1
    assert not torch.equal(again_tokens[0], again_tokens[1]), "turn 2's question must move CDPruner's choice"
    assert again_runs == 2 and cached[0] == again[0]
    turns = [(f"<image>\n{QUERY}", cached[0]), (SECOND, None)]
    assert cached[1] == _by_hand(ckpts["v15"], cfg, turns, QUERY)
    assert again[1] == _by_hand(ckpts["v15"], cfg, turns, SECOND)


@pytest.mark.parametrize("method", ["divprune", "vispruner"])
def test_text_free_selections_choose_once_in_both_modes(ckpts: dict[str, Path], method: str) -> None:
    _, cached, cached_tokens, cached_runs = _two_turns(ckpts["v15"], CONFIGS[method], "cache")
    _, again, again_tokens, again_runs = _two_turns(ckpts["v15"], CONFIGS[method], "reprefill")
    assert cached == again and cached_runs == again_runs == 1
    assert all(torch.equal(a, b) for a, b in zip(cached_tokens + again_tokens, cached_tokens[:1] * 4, strict=True))


# --- the kept-patch picture (python -m llava.serve.show --method/--methods) ------------------------------------------
def test_show_draws_the_patches_divprune_keeps(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """The picture's kept patches are DivPrune's own choice on the projected patches, restated with the plain
    function on the tower + projector run by hand."""
    out = tmp_path / "kept.png"
    argv = ["--model-path", str(ckpts["v15"]), "--image-file", str(SAMPLE), "--out", str(out)]
    picture = show_cli.main([*argv, "--method", "divprune", "--tokens", "9"])
    assert out.stat().st_size > 0 and len(picture.rows) == 1
    _, model, image_processor, _ = load_pretrained_model(str(ckpts["v15"]), device="cpu")
    pixels = process_images([_image()], image_processor, model.config)  # (1, 3, S, S)
    with torch.no_grad():
        keep = divprune_select(model.encode_images(pixels), 9)  # (1, 9)
    side = model.get_vision_tower().num_patches_per_side
    expected = torch.zeros(side * side, dtype=torch.bool)
    expected[keep[0]] = True
    assert picture.rows[0].mask.shape == (1, side, side)
    assert (picture.rows[0].mask[0].reshape(-1) == expected.numpy()).all()
    assert picture.rows[0].label == DivPruneConfig(tokens=9).describe()


def test_show_several_methods_side_by_side_on_anyres(ckpts: dict[str, Path], tmp_path: Path) -> None:
    argv = ["--model-path", str(ckpts["v16"]), "--image-file", str(SAMPLE), "--out", str(tmp_path / "kept.svg")]
    methods = ["visionzip", "divprune", "vispruner", "cdpruner"]
    flags = ["--methods", *methods, "--tokens", "5", "--vispruner-important-ratio", "0.4", "--query", QUERY]
    picture = show_cli.main([*argv, *flags, "--dominant", "6", "--contextual", "2"])
    labels = [row.label for row in picture.rows]
    assert labels[0] == "VisionZip 6+2" and labels[2] == VisPrunerConfig(tokens=5, important_ratio=0.4).describe()
    views = picture.rows[0].mask.shape[0]
    assert views > 1 and all(row.mask.shape[0] == views for row in picture.rows)
    assert [int(row.mask[v].sum()) for row in picture.rows[1:] for v in range(views)] == [5] * (3 * views)
    assert all(int(picture.rows[0].mask[v].sum()) == 5 for v in range(views))  # 6 dominant: [CLS] + 5 patches
    svg = (tmp_path / "kept.svg").read_text()
    assert svg.count(f'id="{KEPT_GID}') == sum(int(row.mask.sum()) for row in picture.rows)


def test_show_refuses_cdpruner_without_a_query(ckpts: dict[str, Path], tmp_path: Path, capsys) -> None:
    argv = ["--model-path", str(ckpts["v15"]), "--image-file", str(SAMPLE), "--out", str(tmp_path / "k.png")]
    with pytest.raises(SystemExit):
        show_cli.main([*argv, "--method", "cdpruner"])
    assert "CDPruner needs each row's instruction" in capsys.readouterr().err


# --- the web demo's backend and page logic ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(CONFIGS))
def test_demo_backend_runs_each_selection_as_the_model_does(ckpts: dict[str, Path], method: str) -> None:
    """The right-hand chat with ``method`` answers as the model with that selection set by hand; the all-tokens
    chat beside it is untouched (64 tokens, the vanilla answer); the picture is drawn."""
    tokenizer, model, image_processor, context_len = load_pretrained_model(str(ckpts["v15"]), device="cpu")
    backend = CompareBackend(tokenizer, model, image_processor, context_len, "vicuna_v1", max_new_tokens=MAX_NEW)
    options = "budget=8" + (", important_ratio=0.75" if method == "vispruner" else "")
    cfg = backend.method(method, 6, 2, options)
    assert cfg == CONFIGS[method] and model.config.token_selection is None  # checked, then off again
    image = _image()
    chats = {"full": backend.new_chat(image, "k", None), "vz": backend.new_chat(image, "k", cfg)}
    turns = {side: backend.ask(session, QUERY, cfg if side == "vz" else None) for side, session in chats.items()}
    assert turns["vz"].visual_tokens == 8 and turns["full"].visual_tokens == 64
    assert turns["vz"].answer == _by_hand(ckpts["v15"], cfg, [(f"<image>\n{QUERY}", None)], QUERY)
    assert turns["full"].answer == _by_hand(ckpts["v15"], None, [(f"<image>\n{QUERY}", None)], QUERY)
    assert backend.picture(image, "k", cfg, QUERY).shape[-1] == 4
    assert model.config.token_selection is None


def test_demo_page_status_names_the_selection(ckpts: dict[str, Path]) -> None:
    gradio_web = pytest.importorskip("llava.serve.gradio_web")
    tokenizer, model, image_processor, context_len = load_pretrained_model(str(ckpts["v15"]), device="cpu")
    backend = CompareBackend(tokenizer, model, image_processor, context_len, "vicuna_v1", max_new_tokens=4)
    request = gradio_web.Request(str(SAMPLE), QUERY, 6, 2, "cdpruner", "budget=8")
    outputs = gradio_web.answer(backend, request, None)
    status, state = outputs[-2], outputs[-1]
    assert f"received 8 visual tokens with CDPruner, 8 tokens (conditional DPP), chosen for {QUERY!r}" in status
    assert "64 without it" in status and outputs[-4] is not None  # the picture
    refused = gradio_web.answer(backend, gradio_web.Request(str(SAMPLE), QUERY, 6, 2, "divprune", "budget=65"), state)
    assert "Error, not asked" in refused[-2] and "a view here has 64 patches" in refused[-2]
