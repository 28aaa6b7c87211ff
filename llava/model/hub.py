"""Checkpoint names to local folders: every loader (builder, training, tower, evaluation) resolves names here."""

from __future__ import annotations

import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# What our loaders read besides weights: config.json, generation/preprocessor/tokenizer/adapter configs, the
# sentencepiece model, CLIP's merges.txt. Other frameworks' weights (tf_model.h5, flax_model.msgpack) never load.
METADATA_PATTERNS = ["*.json", "*.model", "*.txt"]


def local_checkpoint(name: str, weights: bool = True) -> str:
    """A local folder as is; a hub id (``liuhaotian/llava-v1.5-7b``) fetched into the hub cache (or found there).

    The kind of checkpoint is read from its files, so they must be on disk. ``weights=False`` fetches only the
    configuration, tokenizer and preprocessor files (a tower whose weights come from the LLaVA checkpoint).
    Safetensors weights are preferred; ``.bin`` files are fetched only where no safetensors stand for them.
    Offline (``HF_HUB_OFFLINE=1``) the cached snapshot of the ``main`` revision is used.
    """
    if Path(name).exists():
        return name
    if not HUB_ID.fullmatch(name):
        raise FileNotFoundError(f"checkpoint {name!r} is neither a local folder nor a hub id (owner/name)")
    folder = Path(_snapshot(name, [*METADATA_PATTERNS, "*.safetensors"] if weights else METADATA_PATTERNS))
    missing_bins = _bin_patterns(folder) if weights else []
    if missing_bins:
        folder = Path(_snapshot(name, missing_bins))
    return str(folder)


def _bin_patterns(folder: Path) -> list[str]:
    """The ``.bin`` files a checkpoint folder may still need: those without a safetensors counterpart."""
    has_model = any(folder.glob("model*.safetensors"))
    patterns = [] if has_model else ["pytorch_model*.bin"]
    if (folder / "adapter_config.json").is_file():  # LoRA: the adapter and the projector beside it
        patterns += [f"{stem}.bin" for stem in ("adapter_model", "non_lora_trainables")
                     if not (folder / f"{stem}.safetensors").is_file()]  # fmt: skip
    elif not has_model and not (folder / "mm_projector.safetensors").is_file():  # maybe projector-only
        patterns.append("mm_projector.bin")
    return patterns


def _snapshot(name: str, patterns: list[str]) -> str:
    """``snapshot_download`` of the files matching ``patterns``; a hub error becomes a FileNotFoundError."""
    from huggingface_hub import snapshot_download  # a dependency of transformers
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    logger.info("resolving %s through the hub cache (%s)", name, ", ".join(patterns))
    try:
        return snapshot_download(repo_id=name, allow_patterns=patterns)
    except (LocalEntryNotFoundError, HfHubHTTPError) as err:
        raise FileNotFoundError(
            f"{name!r} is not a local folder, and as a hub id it is neither in the hub cache nor downloadable: {err}"
        ) from err
