"""A Hugging Face hub cache laid out in a folder, holding tiny checkpoints under the released ids, for offline tests."""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub.constants
import pytest

from helpers.training import write_llm
from llava.tiny import CLIP_DIR_NAME, write_projector_only, write_tiny_llava

CLIP_ID = "openai/clip-vit-large-patch14-336"
V15_ID = "liuhaotian/llava-v1.5-7b"
V16_ID = "liuhaotian/llava-v1.6-vicuna-7b"
LLM_ID = "lmsys/vicuna-7b-v1.5"
PROJECTOR_ID = "liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5"


@dataclass(frozen=True)
class TinyHub:
    """``hf_home`` (the cache is ``hf_home/hub``) and the source folders each cached repository was copied from."""

    hf_home: Path
    sources: dict[str, Path]


def cache_repo(hf_home: Path, repo_id: str, source: Path) -> Path:
    """Copy ``source``'s files into ``hub/models--owner--name/snapshots/<rev>/`` and point ``refs/main`` at <rev>."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    revision = hashlib.sha1(repo_id.encode()).hexdigest()  # any 40-hex commit id
    snapshot = repo / "snapshots" / revision
    shutil.copytree(source, snapshot, ignore=shutil.ignore_patterns(CLIP_DIR_NAME))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def _tower_by_id(ckpt: Path, out: Path) -> Path:
    """A copy of a tiny LLaVA checkpoint whose config.json names its tower by hub id, as the released ones do."""
    shutil.copytree(ckpt, out)
    config = json.loads((out / "config.json").read_text())
    config["mm_vision_tower"] = CLIP_ID
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def build_tiny_hub(root: Path) -> TinyHub:
    """Tiny LLaVA-1.5/1.6, their CLIP, a Vicuna-like LLM and a stage-1 projector, cached under the released ids.

    ``sources`` maps each id to the folder it was copied from; the LLaVA sources name the tower by its local path,
    so they load without the cache (a reference for what the cached copies must give).
    """
    v15, v16 = write_tiny_llava(root / "src"), write_tiny_llava(root / "src", next=True)
    sources = {
        CLIP_ID: root / "src" / CLIP_DIR_NAME,
        V15_ID: v15,
        V16_ID: v16,
        LLM_ID: write_llm(v15, root / "vicuna"),
        PROJECTOR_ID: write_projector_only(root / "projector", v15, seed=1),
    }
    hf_home = root / "hf_home"
    for repo_id, source in sources.items():
        by_id = _tower_by_id(source, root / "by_id" / repo_id) if repo_id in (V15_ID, V16_ID) else source
        cache_repo(hf_home, repo_id, by_id)
    return TinyHub(hf_home, sources)


@contextmanager
def offline_hub(hf_home: Path) -> Iterator[None]:
    """``HF_HOME=hf_home`` and ``HF_HUB_OFFLINE=1`` for this process, as a user would export them.

    huggingface_hub copies these variables into ``huggingface_hub.constants`` when it is imported, and its functions
    read those constants when called; the module is reloaded after setting (and after restoring) the environment so
    that its constants follow it. A fresh process needs nothing of this (see the subprocess test).
    """
    patch = pytest.MonkeyPatch()
    try:
        patch.setenv("HF_HOME", str(hf_home))
        patch.setenv("HF_HUB_OFFLINE", "1")
        for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
            patch.delenv(name, raising=False)
        importlib.reload(huggingface_hub.constants)
        yield
    finally:
        patch.undo()
        importlib.reload(huggingface_hub.constants)
