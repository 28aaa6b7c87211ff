"""A LLaVA-NeXT projector checkpoint on a base without image_newline is refused, not run on uninitialised memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.training import write_llm

from llava.model.builder import load_pretrained_model
from llava.tiny import write_projector_only, write_tiny_llava


def test_next_projector_on_a_plain_llm_is_refused_and_on_a_next_base_loads(tmp_path: Path) -> None:
    next_ckpt = write_tiny_llava(tmp_path / "src", next=True)
    projector = write_projector_only(tmp_path / "projector", next_ckpt, seed=1)
    llm = write_llm(next_ckpt, tmp_path / "llm")
    with pytest.raises(ValueError, match=r"uses image_newline .* holds model\.image_newline"):
        load_pretrained_model(str(projector), str(llm), device="cpu")
    _, model, _, _ = load_pretrained_model(str(projector), str(next_ckpt), device="cpu")
    _, full, _, _ = load_pretrained_model(str(next_ckpt), device="cpu")
    assert torch.equal(model.get_model().image_newline, full.get_model().image_newline)  # the base's, loaded
