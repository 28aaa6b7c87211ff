"""The released LLaVA tokenizer layout (sentencepiece tokenizer.model, no tokenizer.json) tokenizes as LLaVA did.

The reference is sentencepiece itself, driven as transformers 4's slow ``LlamaTokenizer`` drove it (LLaVA loaded
its tokenizers with ``use_fast=False``): text is cut at the special tokens and each run encoded by sentencepiece;
``legacy=True`` encodes every run alone (a dummy-prefix "▁" on each), ``legacy=False`` (the released configs)
only the run at the start of the input, the runs after a special token without the prefix. ``tokenizer_image_token``
tokenizes each chunk between ``<image>`` placeholders alone, so every chunk gets its own prefix.
"""

from __future__ import annotations

import io
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import transformers
from helpers.sample import MAX_NEW, SAMPLE
from helpers.training import DIALOGUE, EXPECTED_TARGETS, logged_losses, target_runs, train_args, write_data
from PIL import Image
from sentencepiece import sentencepiece_model_pb2
from transformers import AutoTokenizer, LlamaTokenizer

import llava.model.tokenizer as tokenizer_module
from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import get_conv_template
from llava.eval import run_llava
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.builder import checkpoint_kind, load_pretrained_model
from llava.model.tokenizer import PROTOBUF_MODULE, SENTENCEPIECE_PIN, load_tokenizer
from llava.serve import cli
from llava.tiny import (
    SPECIAL_TOKENS,
    TinyConfig,
    build_sentencepiece_tokenizer,
    build_tokenizer,
    tokenizer_corpus,
    train_sentencepiece,
)
from llava.train.data import normalise_turns, render_with_targets, tokenize_with_targets
from llava.train.train import train

SPIECE_UNDERLINE = "▁"
SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
PROMPTS = [
    "USER: <image>\nWhat is in the image? ASSISTANT:",
    'Punctuation: (A) left, (B) right; "quoted" [x] {y} 50% $5 #1 a/b \\ @ & * + = < > ~ | ` ^ !?',
    "Numbers: 0 7 42 2024 3.14 1000000 and 12:30",
    "Unicode: un chat é sur la table, 猫, 🐱, Ünïcödé ß",
    "Compare <image> with <image>.",  # a chunk that starts with a space: sentencepiece gives "▁", "▁with"
    "<image>",
    "  two  leading spaces,\ttabs\nand newlines\n",
    "A chat.</s>USER: more after the end token</s>",
]


@dataclass(frozen=True)
class SlowLlama:
    """transformers 4's slow LlamaTokenizer restated on sentencepiece itself (the independent reference)."""

    sp: spm.SentencePieceProcessor  # tokenizer.model as written: a dummy-prefix "▁" on each encoded text
    sp_no_prefix: spm.SentencePieceProcessor  # the same model without the dummy prefix
    legacy: bool

    @classmethod
    def from_folder(cls, folder: Path, legacy: bool) -> SlowLlama:
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString((folder / "tokenizer.model").read_bytes())
        sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        proto.normalizer_spec.add_dummy_prefix = False
        return cls(sp, spm.SentencePieceProcessor(model_proto=proto.SerializeToString()), legacy)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [self.sp.bos_id()] if add_bos else []
        if not self.legacy:
            text = text.replace(SPIECE_UNDERLINE, " ")  # the slow tokenizer read a literal "▁" as a space
        for i, run in enumerate(SPECIAL_SPLIT.split(text)):
            if i % 2:  # a special token
                ids.append(self.sp.piece_to_id(run))
            elif run:
                at_start = i == 0
                ids.extend((self.sp if self.legacy or at_start else self.sp_no_prefix).encode(run))
        return ids

    def image_prompt(self, prompt: str) -> list[int]:
        """``tokenizer_image_token`` as LLaVA ran it: each chunk alone, the BOS once, a placeholder between."""
        ids: list[int] = []
        for i, chunk in enumerate(prompt.split("<image>")):
            if i:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(self.encode(chunk, add_bos=i == 0))
        return ids

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.sp.id_to_piece(i) for i in ids]


@pytest.fixture(autouse=True)
def _quiet_transformers():
    """The entry points lower transformers' logging for the process; restore it after each test."""
    level = transformers.utils.logging.get_verbosity()
    yield
    transformers.utils.logging.set_verbosity(level)


@pytest.fixture(scope="module")
def legacy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny tokenizer with ``legacy: true`` (Vicuna before v1.5 / Llama-1 style configs)."""
    out = tmp_path_factory.mktemp("sp_legacy")
    build_sentencepiece_tokenizer(out, legacy=True)
    return out


def _reference(folder: Path) -> SlowLlama:
    legacy = json.loads((folder / "tokenizer_config.json").read_text())["legacy"]
    return SlowLlama.from_folder(folder, legacy)


# ----------------------------------------------------------------------------------------------------------------------
# the files and the tokenizer read from them


def test_the_released_layout(sp_llava15: Path) -> None:
    names = {p.name for p in sp_llava15.iterdir()}
    assert "tokenizer.model" in names and "tokenizer.json" not in names
    config = json.loads((sp_llava15 / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["legacy"] is False
    assert (config["add_bos_token"], config["add_eos_token"], config["pad_token"]) == (True, False, None)
    assert json.loads((sp_llava15 / "special_tokens_map.json").read_text())["pad_token"] == "<unk>"
    sp = spm.SentencePieceProcessor(model_file=str(sp_llava15 / "tokenizer.model"))
    assert [sp.id_to_piece(i) for i in range(3)] == list(SPECIAL_TOKENS)
    assert sp.is_byte(sp.piece_to_id("<0xE7>")) and sp.get_piece_size() == TinyConfig().vocab_size
    assert json.loads((sp_llava15 / "config.json").read_text())["vocab_size"] == sp.get_piece_size()


def test_loaded_as_a_llama_tokenizer(sp_llava15: Path) -> None:
    tokenizer = load_tokenizer(sp_llava15)
    sp = _reference(sp_llava15).sp
    assert isinstance(tokenizer, LlamaTokenizer) and tokenizer.legacy is False
    assert len(tokenizer) == sp.get_piece_size()
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        sp.unk_id(), sp.bos_id(), sp.eos_id()
    )  # fmt: skip
    assert tokenizer.pad_token == "<unk>" and tokenizer.padding_side == "right"
    assert tokenizer.model_max_length == TinyConfig().model_max_length


@pytest.mark.parametrize("prompt", PROMPTS)
def test_image_prompts_match_sentencepiece(sp_llava15: Path, prompt: str) -> None:
    reference = _reference(sp_llava15)
    ids = tokenizer_image_token(prompt, load_tokenizer(sp_llava15))
    assert reference.pieces([i for i in ids if i >= 0]) == reference.pieces(
        [i for i in reference.image_prompt(prompt) if i >= 0]
    )  # pieces first: a readable message
    assert ids == reference.image_prompt(prompt)


def _vicuna(turns: list[tuple[str, str | None]]) -> str:
    """The vicuna_v1 (LLaVA-1.5) prompt of a conversation; None leaves the last answer open."""
    conv = get_conv_template("vicuna_v1")
    for user, answer in turns:
        conv.append_message(conv.roles[0], user)
        conv.append_message(conv.roles[1], answer)
    return conv.get_prompt()


def test_vicuna_multi_turn_for_both_legacy_values(sp_llava15: Path, legacy_dir: Path) -> None:
    """The released value (false) and the older one (true) differ right after each </s>: true adds a "▁"."""
    prompt = _vicuna([("<image>\nWhat is it?", "A cat, 2 ears."), ("Colour?", "Orange é 猫 🐱."), ("Sure?", None)])
    assert prompt.count("</s>") == 2
    got = {}
    for folder in (sp_llava15, legacy_dir):
        reference = _reference(folder)
        got[reference.legacy] = tokenizer_image_token(prompt, load_tokenizer(folder))
        assert got[reference.legacy] == reference.image_prompt(prompt), reference.legacy
    sp = _reference(sp_llava15).sp
    after_eos = {legacy: [ids[i + 1] for i, t in enumerate(ids) if t == sp.eos_id()] for legacy, ids in got.items()}
    assert [sp.id_to_piece(i) for i in after_eos[True]] == ["▁USER"] * 2
    assert not any(sp.id_to_piece(i).startswith(SPIECE_UNDERLINE) for i in after_eos[False])


@pytest.mark.parametrize("legacy", [False, True])
def test_random_texts_match_sentencepiece(sp_llava15: Path, legacy_dir: Path, tmp_path: Path, legacy: bool) -> None:
    reference = _reference(legacy_dir if legacy else sp_llava15)
    tokenizer = load_tokenizer(legacy_dir if legacy else sp_llava15)
    alphabet = [*"abcxyzAST .,!?:;'\"()-\n\t0123456789éü猫🐱▁", *SPECIAL_TOKENS, "USER", "ASSISTANT:", "the ", "  "]
    rng = random.Random(0)
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16))) for _ in range(300)]
    batch = tokenizer(texts).input_ids
    mismatched = [t for t, ids in zip(texts, batch, strict=True) if ids != reference.encode(t)]
    assert not mismatched, mismatched[:5]
    no_bos = tokenizer(texts[:50], add_special_tokens=False).input_ids
    assert no_bos == [reference.encode(t, add_bos=False) for t in texts[:50]]
    tokenizer.save_pretrained(tmp_path)  # as a full fine-tune saves it: tokenizer.json, no tokenizer.model
    assert load_tokenizer(tmp_path)(texts).input_ids == batch


def test_text_round_trips_as_sentencepiece_decodes_it(sp_llava15: Path) -> None:
    tokenizer, sp = load_tokenizer(sp_llava15), _reference(sp_llava15).sp
    for text in ["Unicode: é 猫 🐱 ß", "USER: two  spaces, digits 2024.", "tabs\tand\nnewlines"]:
        ids = tokenizer(text).input_ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == sp.decode(ids) == text


def test_auto_tokenizer_alone_drops_the_prefix_on_llava15(sp_llava15: Path) -> None:
    """Why load_tokenizer picks LlamaTokenizer itself: with config.json's model_type "llava", transformers 5.23's
    AutoTokenizer reads the folder as a generic backend without Llama's dummy prefix. If this starts to pass
    through, the choice in load_tokenizer may be dropped."""
    reference = _reference(sp_llava15)
    ids = AutoTokenizer.from_pretrained(sp_llava15)("USER: hi").input_ids
    assert ids != reference.encode("USER: hi")
    assert load_tokenizer(sp_llava15)("USER: hi").input_ids == reference.encode("USER: hi")


def test_a_broken_protobuf_module_says_what_to_install(
    sp_llava15: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_tokenizer(tmp_path / "bpe")  # tokenizer.json: read without sentencepiece's protobuf module
    monkeypatch.setitem(sys.modules, PROTOBUF_MODULE, None)  # the import fails, as with a mismatched protobuf
    with pytest.raises(ImportError, match=re.escape(f"pip install '{SENTENCEPIECE_PIN}'")):
        load_tokenizer(sp_llava15)
    assert load_tokenizer(tmp_path / "bpe")("a cat").input_ids[0] == SPECIAL_TOKENS.index("<s>")


def test_a_protobuf_version_error_says_what_to_install(sp_llava15: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = pytest.importorskip("google.protobuf.runtime_version")

    def mismatched() -> None:
        raise runtime.VersionError("Detected mismatched Protobuf Gencode/Runtime version suffixes")

    monkeypatch.setattr(tokenizer_module, "_import_protobuf_module", mismatched)
    with pytest.raises(ImportError, match="mismatched Protobuf"):
        load_tokenizer(sp_llava15)


def test_sentencepiece_training_checks_the_vocabulary_and_is_repeatable() -> None:
    corpus = tokenizer_corpus()[:20]
    with pytest.raises(ValueError, match="vocab_size >= "):
        train_sentencepiece(corpus, 300)  # 259 special and byte pieces leave too few for the characters
    assert train_sentencepiece(corpus, 400) == train_sentencepiece(corpus, 400)


# ----------------------------------------------------------------------------------------------------------------------
# every entry point on the released layout; the reference answers come from sentencepiece's ids


def _reference_answer(model, tokenizer, image_processor, prompt: str, image: Image.Image, reference: SlowLlama) -> str:
    """Greedy answer to the prompt tokenized by the reference (decoded with the tokenizer: decoding is not at issue)."""
    ids = torch.tensor([reference.image_prompt(prompt)])
    pixels = process_images([image], image_processor, model.config)
    out = model.generate(ids, images=pixels, image_sizes=[image.size], do_sample=False, max_new_tokens=MAX_NEW)
    return tokenizer.decode(out[0], skip_special_tokens=True).strip()


def test_run_llava_and_the_cli(sp_llava15: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_pretrained_model, run_llava and the chat (two turns from stdin) answer as the reference ids do."""
    tokenizer, model, image_processor, _ = load_pretrained_model(str(sp_llava15), device="cpu")
    assert isinstance(tokenizer, LlamaTokenizer)
    reference, image = _reference(sp_llava15), Image.open(SAMPLE).convert("RGB")
    question, follow_up = "What is in the image?", "And what colour is it? é 猫"
    first = _reference_answer(model, tokenizer, image_processor, _vicuna([(f"<image>\n{question}", None)]),
                              image, reference)  # fmt: skip

    argv = ["--model-path", str(sp_llava15), "--image-file", str(SAMPLE), "--device", "cpu"]
    assert run_llava.main([*argv, "--query", question, "--max_new_tokens", str(MAX_NEW)])["answer"] == first

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{question}\n{follow_up}\n"))
    answers = cli.main([*argv, "--temperature", "0", "--max-new-tokens", str(MAX_NEW)])
    whole = _vicuna([(f"<image>\n{question}", answers[0]), (follow_up, None)])
    assert "</s>" in whole
    assert answers == [first, _reference_answer(model, tokenizer, image_processor, whole, image, reference)]


def test_training_labels_and_ids(sp_llava15: Path) -> None:
    reference, tokenizer = _reference(sp_llava15), load_tokenizer(sp_llava15)
    record = {"conversations": [{"from": f, "value": v} for f, v in DIALOGUE]}
    prompt, spans = render_with_targets("vicuna_v1", normalise_turns(record, 1))
    ids, labels = tokenize_with_targets(prompt, spans, tokenizer)
    assert ids.tolist() == reference.image_prompt(prompt)
    runs = ["".join(reference.pieces(run)).replace(SPIECE_UNDERLINE, " ") for run in target_runs(labels)]
    assert runs == EXPECTED_TARGETS["vicuna_v1"]


def test_training_steps_in_projector_mode(sp_llava15: Path, tmp_path: Path) -> None:
    data = write_data(tmp_path / "data", n=8)
    out = tmp_path / "out"
    trainer = train(
        train_args(sp_llava15, data, out, "--tune_mm_mlp_adapter", "True", "--save_strategy", "no", steps=2)
    )
    assert isinstance(trainer.processing_class, LlamaTokenizer)
    assert len(logged_losses(trainer)) == 2 and all(torch.isfinite(torch.tensor(logged_losses(trainer))))
    assert checkpoint_kind(out) == "projector"
    reference, item = _reference(sp_llava15), trainer.train_dataset[0]
    record = trainer.train_dataset.records[0]
    prompt, _ = render_with_targets("vicuna_v1", normalise_turns(record, 1))
    assert item["input_ids"].tolist() == reference.image_prompt(prompt)


def test_eval_runner(sp_llava15: Path) -> None:
    """lmms-eval's plugin answers through ``eval.runner.LlavaRunner`` (called directly: the CLI path took 75 s): its
    prompts tokenize as the reference does, and a greedy answer is the model's on the reference ids."""
    from eval.options import ModelOptions
    from eval.runner import LlavaRunner

    runner, reference = LlavaRunner.load(ModelOptions(pretrained=str(sp_llava15)), "cpu"), _reference(sp_llava15)
    image = Image.open(SAMPLE).convert("RGB")
    contexts = ["What colour is it?\nAnswer the question using a single word or phrase.", "Compare <image> with it."]
    prompts = [runner.prompt(context, 1) for context in contexts]
    assert [ids.tolist() for ids in runner._encode(prompts)] == [reference.image_prompt(p) for p in prompts]
    answer = runner.generate(contexts[:1], [[image]], {"max_new_tokens": MAX_NEW, "temperature": 0})
    model, tokenizer, processor = runner.model, runner.tokenizer, runner.image_processor
    assert answer == [_reference_answer(model, tokenizer, processor, prompts[0], image, reference)]


def test_tiny_cli_writes_either_layout(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``python -m llava.tiny --tokenizer sentencepiece``; a rewrite in the other layout leaves none of the first."""
    from llava.tiny import main

    for kind, present, absent in [("sentencepiece", "tokenizer.model", "tokenizer.json"),
                                  ("bpe", "tokenizer.json", "tokenizer.model")]:  # fmt: skip
        main(["--out", str(tmp_path), "--tokenizer", kind])
        ckpt = Path(capsys.readouterr().out.strip().splitlines()[-1])
        for folder in (ckpt, tmp_path / "tokenizer"):
            assert (folder / present).is_file() and not (folder / absent).exists(), (kind, folder)
        tokenizer = load_tokenizer(ckpt)
        assert isinstance(tokenizer, LlamaTokenizer) == (kind == "sentencepiece")
        assert json.loads((ckpt / "config.json").read_text())["vocab_size"] == len(tokenizer)
