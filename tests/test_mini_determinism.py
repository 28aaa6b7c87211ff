"""A training seed gives the same model twice: every stage up to stage 2 run twice at smoke size from nothing, the
second time on another torch thread count, gives bit-identical data, CLIP, LLM, projector and stage-2 weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eval.mini.config import SMOKE, Paths
from eval.mini.jobs import Timer
from eval.mini.reproduce import stage_inputs, stage_training

pytestmark = pytest.mark.slow


def _run(root: Path, threads: int, port: int) -> Paths:
    """Data, CLIP, LLM, stage 1 and stage 2 of training seed 0 under ``root``."""
    cfg = dataclasses.replace(SMOKE, train_threads=threads, master_port=port)
    paths = Paths(root)
    paths.run.mkdir(parents=True)
    timer = Timer(paths.run / "timings.json")
    stage_inputs(cfg, paths, timer)
    stage_training(cfg, paths, timer)
    return paths


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)


def test_a_seed_gives_the_same_model_twice(tmp_path: Path) -> None:
    first = _run(tmp_path / "a", threads=2, port=SMOKE.master_port + 60)
    second = _run(tmp_path / "b", threads=1, port=SMOKE.master_port + 70)
    files = sorted(p.relative_to(first.data) for p in first.data.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(second.data) for p in second.data.rglob("*") if p.is_file())
    for name in files:  # images and LLaVA JSON, byte for byte
        assert (first.data / name).read_bytes() == (second.data / name).read_bytes(), name
    weights = ["clip/model.safetensors", "base/model.safetensors", "seed-0/stage1/mm_projector.bin",
               "seed-0/stage2/model.safetensors"]  # fmt: skip
    for name in weights:
        a, b = _tensors(first.root / name), _tensors(second.root / name)
        assert a.keys() == b.keys() and a, name
        differ = [key for key in a if not torch.equal(a[key], b[key])]
        assert not differ, f"{name}: {len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"
    assert (first.base / "tokenizer.json").read_bytes() == (second.base / "tokenizer.json").read_bytes()
