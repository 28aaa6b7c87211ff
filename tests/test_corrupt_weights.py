"""A damaged checkpoint (a shard cut short, a corrupt safetensors header) ends loading with an error that names the
file and says what is wrong, not a bare ``OSError: [Errno 22]`` or a miniz message without a path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llava.model.builder import load_pretrained_model
from llava.model.weights import CorruptWeightsError, named_weight_errors, read_weights_file, weights_problem
from llava.tiny import write_tiny_llava

REPO = Path(__file__).resolve().parents[1]


def cut_to_a_third(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corrupt")
    return {fmt: write_tiny_llava(root / fmt, fmt=fmt) for fmt in ("bin", "safetensors")}


def damaged_copy(source: Path, dest: Path) -> Path:
    """A copy of a checkpoint folder (the tower stays shared: config.json names it by absolute path)."""
    dest.mkdir()
    for path in source.iterdir():
        (dest / path.name).write_bytes(path.read_bytes())
    return dest


@pytest.mark.parametrize("shard", ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"])
def test_a_bin_shard_cut_to_a_third_is_named(checkpoints: dict[str, Path], tmp_path: Path, shard: str) -> None:
    folder = damaged_copy(checkpoints["bin"], tmp_path / "ckpt")
    assert (folder / shard).is_file()  # the released layout: two .bin shards
    cut_to_a_third(folder / shard)
    with pytest.raises(CorruptWeightsError, match="truncated or corrupt") as caught:
        load_pretrained_model(str(folder), device="cpu")
    assert str(folder / shard) in str(caught.value)
    other = next(p.name for p in folder.glob("*.bin") if p.name != shard)
    assert other not in str(caught.value)  # only the damaged shard is named
    assert caught.value.__cause__ is not None  # the loader's own error is kept as the cause


def test_a_truncated_safetensors_file_is_named(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    folder = damaged_copy(checkpoints["safetensors"], tmp_path / "ckpt")
    cut_to_a_third(folder / "model.safetensors")
    with pytest.raises(CorruptWeightsError, match="is truncated") as caught:
        load_pretrained_model(str(folder), device="cpu")
    assert str(folder / "model.safetensors") in str(caught.value)


def test_a_corrupt_safetensors_header_is_named(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    folder = damaged_copy(checkpoints["safetensors"], tmp_path / "ckpt")
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:40] = b"\xff" * 32  # the JSON header's first bytes
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CorruptWeightsError, match="corrupt header") as caught:
        load_pretrained_model(str(folder), device="cpu")
    assert str(folder / "model.safetensors") in str(caught.value)


def test_intact_files_have_no_problem(checkpoints: dict[str, Path]) -> None:
    """The checks pass every file of an intact checkpoint in both formats (no false alarm)."""
    files = [p for folder in checkpoints.values() for p in folder.iterdir() if p.suffix in (".bin", ".safetensors")]
    assert len(files) == 3 and all(weights_problem(p) is None for p in files)


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_one_file_read_whole_or_named(tmp_path: Path, suffix: str) -> None:
    """``read_weights_file`` (projector and LoRA extras): the tensors of an intact file; a cut one is named."""
    state = {"model.mm_projector.0.weight": torch.arange(600.0).reshape(20, 30)}
    path = tmp_path / f"mm_projector{suffix}"
    if suffix == ".bin":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    assert torch.equal(read_weights_file(path)["model.mm_projector.0.weight"], state["model.mm_projector.0.weight"])
    cut_to_a_third(path)
    with pytest.raises(CorruptWeightsError, match="truncated") as caught:
        read_weights_file(path)
    assert str(path) in str(caught.value)


def test_other_errors_pass_unchanged(checkpoints: dict[str, Path]) -> None:
    """An error while loading intact files is not blamed on them."""
    error = OSError(22, "Invalid argument")
    with pytest.raises(OSError) as caught, named_weight_errors(checkpoints["bin"]):
        raise error
    assert caught.value is error


@pytest.mark.slow
def test_run_llava_names_the_damaged_shard(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """The command a user runs ends with the file's name and what is wrong with it."""
    folder = damaged_copy(checkpoints["bin"], tmp_path / "ckpt")
    cut_to_a_third(folder / "pytorch_model-00001-of-00002.bin")
    image = REPO / "llava" / "serve" / "examples" / "chelsea.jpg"
    command = [sys.executable, "-m", "llava.eval.run_llava", "--model-path", str(folder), "--image-file", str(image),
               "--query", "What is it?", "--device", "cpu", "--max_new_tokens", "2"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("llava.model.weights.CorruptWeightsError")
    assert "pytorch_model-00001-of-00002.bin is truncated or corrupt" in last
