"""Tests for eval.mini.base: the tiny Llama and its locally trained tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from eval.mini.base import BaseConfig, check_texts, data_texts, render, write_base
from eval.mini.data import DataConfig, write_kind
from eval.mini.shapes import MULTI_ANSWERS, all_questions
from llava.conversation import get_conv_template

TINY = BaseConfig(kinds=("multi",), hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                  intermediate_size=64)  # fmt: skip


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mini-base")
    write_kind(DataConfig("multi", train_images=10, test_images=5), root / "data")
    return write_base(root / "base", TINY, root / "data"), root / "data"


def test_render_matches_the_templates() -> None:
    assert render("plain", None, "a red circle") == "<image>a red circle\n"
    prompt = render("vicuna_v1", "is there a red circle?", "yes")
    assert prompt.startswith(get_conv_template("vicuna_v1").system)
    assert prompt.endswith(" USER: <image>\nis there a red circle?\nAnswer the question using a single word or phrase. "
                           "ASSISTANT: yes</s>")  # fmt: skip


def test_base_loads_and_tokenizes_every_sample_without_unknowns(written: tuple[Path, Path]) -> None:
    base, data = written
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = LlamaForCausalLM.from_pretrained(base)
    assert model.config.vocab_size == len(tokenizer) and model.config.hidden_size == TINY.hidden_size
    special = (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert special == (0, 1, 2, 0)
    texts = list(data_texts(data))
    assert len(texts) > 50 and any(t.endswith("</s>") for t in texts) and any(t.startswith("<image>") for t in texts)
    check_texts(tokenizer, texts)  # raises on <unk> or a failed round trip
    ids = tokenizer(render("vicuna_v1", all_questions()[0], "yes")).input_ids
    assert ids[0] == 1 and ids[-1] == 2 and tokenizer.unk_token_id not in ids
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer))


def test_answers_are_single_tokens(written: tuple[Path, Path]) -> None:
    info = json.loads((written[0] / "mini_info.json").read_text())
    assert set(info["answer_tokens"]) >= set(MULTI_ANSWERS)
    assert all(n == 1 for a, n in info["answer_tokens"].items() if a in MULTI_ANSWERS)


def test_unseen_text_round_trips_and_resume_skips(written: tuple[Path, Path]) -> None:
    base, data = written
    tokenizer = AutoTokenizer.from_pretrained(base)
    assert check_texts(tokenizer, ["Zürich  🐱\tquokka", "USER: what is this? ASSISTANT: a cat</s>"]) > 5  # byte-level
    stamp = (base / "model.safetensors").stat().st_mtime_ns
    write_base(base, TINY, data)
    assert (base / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="remove the folder"):
        write_base(base, BaseConfig(kinds=("multi",), hidden_size=64, num_heads=2, num_kv_heads=2))


def test_same_seed_same_model(written: tuple[Path, Path], tmp_path: Path) -> None:
    again = write_base(tmp_path / "again", TINY)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (written[0] / name).read_bytes()
