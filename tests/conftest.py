"""Fixtures shared by several test files: tiny checkpoints written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava.tiny import write_tiny_llava


@pytest.fixture(scope="session")
def sp_llava15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaVA-1.5 checkpoint with the tokenizer files liuhaotian/llava-v1.5-7b ships.

    ``write_tiny_llava(root, tokenizer="sentencepiece")``: a sentencepiece BPE ``tokenizer.model`` trained on
    ``llava.tiny.tokenizer_corpus()`` (Llama's ids <unk>=0, <s>=1, </s>=2, byte fallback, 1000 pieces), the
    released ``tokenizer_config.json`` (LlamaTokenizer, add_bos_token, legacy false, pad null, right padding) and
    ``special_tokens_map.json`` (pad "<unk>"), and no tokenizer.json; config.json has ``model_type: "llava"``, its
    tower is ``root/clip``. Load it with ``llava.model.builder.load_pretrained_model`` (or
    ``llava.model.tokenizer.load_tokenizer`` for the tokenizer alone). Shared by the session: treat it as
    read-only (copy it before changing files). Returns the checkpoint folder.
    """
    return write_tiny_llava(tmp_path_factory.mktemp("sp_llava15"), tokenizer="sentencepiece")


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random LLaVA-1.5 (``"v15"``) and LLaVA-1.6 AnyRes (``"v16"``) checkpoints in the default released layout
    (``write_tiny_llava``, sharing one ``clip/``), written once per session; read-only (copy before changing)."""
    root = tmp_path_factory.mktemp("tiny_pair")
    return {"v15": write_tiny_llava(root), "v16": write_tiny_llava(root, next=True)}
