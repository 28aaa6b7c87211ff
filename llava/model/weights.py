"""Weights files read with errors that name the file: a truncated or corrupt shard says so, not `Errno 22`."""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

WEIGHT_SUFFIXES = (".safetensors", ".bin")
# what torch.load, safetensors and the OS raise on a damaged file (a cut file is mapped past its end: EINVAL)
READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError, RuntimeError, SafetensorError, pickle.UnpicklingError, EOFError, ValueError, zipfile.BadZipFile,
)  # fmt: skip


class CorruptWeightsError(ValueError):
    """A weights file that cannot be read whole: the message names the file and what is wrong with it."""


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's layout (header, tensor extents, size), or None if it is whole.

    The layout: 8 bytes little-endian header length N, N bytes of JSON ``{name: {dtype, shape, data_offsets}}``,
    then the data, which the largest end offset must reach exactly (the file's size).
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"is {size} bytes long, too short for a safetensors header"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return f"is truncated: its header says {length} header bytes, the file has {size - 8} after the first 8"
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return f"has a corrupt header ({err})"
    try:
        ends = [int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"]
    except (AttributeError, KeyError, TypeError, IndexError, ValueError):
        return "has a corrupt header (a tensor without data_offsets)"
    expected = 8 + length + max(ends, default=0)
    if expected > size:
        return f"is truncated: its header describes {expected} bytes, the file has {size}"
    if expected < size:
        return f"is corrupt: {size - expected} bytes after the last tensor that its header does not describe"
    return None


def bin_problem(path: Path) -> str | None:
    """What is wrong with a ``torch.save`` zip archive (its directory, or a member's CRC), or None if it reads whole.

    A file that is not a zip archive (``torch.save``'s legacy format) is left to ``torch.load``: None.
    """
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"PK\x03\x04":
        return None if magic[:1] == b"\x80" else "is not a torch.save archive (neither zip nor pickle)"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every member and checks its CRC
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"is truncated or corrupt: its zip directory cannot be read ({err})"
    return f"is corrupt: member {bad} fails its CRC check" if bad else None


def weights_problem(path: Path) -> str | None:
    """What is wrong with one weights file (``.safetensors`` or ``.bin``), or None if its layout reads whole."""
    if path.stat().st_size == 0:
        return "is empty (0 bytes)"
    return safetensors_problem(path) if path.suffix == ".safetensors" else bin_problem(path)


def check_weights_files(folder: Path) -> None:
    """Raise CorruptWeightsError naming every weights file in ``folder`` that is truncated or corrupt."""
    problems = [
        f"{path} {problem}"
        for path in sorted(folder.iterdir())
        if path.suffix in WEIGHT_SUFFIXES and path.is_file() and (problem := weights_problem(path))
    ]
    if problems:
        raise CorruptWeightsError(
            "checkpoint weights cannot be read: " + "; ".join(problems) + " (copy or download the file again)"
        )


@contextmanager
def named_weight_errors(folder: str | Path) -> Iterator[None]:
    """Around a loader that reads ``folder``'s weights (transformers' ``from_pretrained``): an error raised by a
    truncated or corrupt file becomes a CorruptWeightsError that names it; any other error passes unchanged."""
    try:
        yield
    except READ_ERRORS as err:
        if isinstance(err, CorruptWeightsError) or not Path(folder).is_dir():
            raise
        try:
            check_weights_files(Path(folder))
        except CorruptWeightsError as named:
            raise named from err
        raise


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """One weights file: safetensors, or a ``.bin`` loaded with ``weights_only=True``; CorruptWeightsError naming
    the file if it is truncated or corrupt."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except READ_ERRORS as err:
        problem = weights_problem(path) if path.is_file() else None
        if problem:
            raise CorruptWeightsError(f"{path} {problem} (copy or download the file again)") from err
        raise
