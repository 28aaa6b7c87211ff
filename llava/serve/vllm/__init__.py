"""VisionZip inside vLLM: an out-of-tree plugin registering VisionZip variants of vLLM's LLaVA-1.5 and LLaVA-NeXT.

Installed in its own virtual environment (``bash scripts/setup_serve.sh``: vLLM pins another transformers than ours).
vLLM runs :func:`register` in every process through the ``vllm.general_plugins`` entry point; nothing else changes
in vLLM. A checkpoint selects a VisionZip class by its architecture name: ``python -m llava.convert --to-hf`` keeps
the standard names (transformers loads them) and writes the budget under ``visionzip`` in config.json, so the server
passes ``hf_overrides={"architectures": ["VisionZip..."]}`` (:func:`hf_overrides`, ``python -m
llava.serve.vllm.overrides``); the stock names stay vLLM's own classes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ARCHITECTURES: dict[str, str] = {
    # the architecture vLLM reads from config.json -> our subclass, as "module:Class" (imported lazily by vLLM)
    "LlavaForConditionalGeneration": "llava.serve.vllm.llava:VisionZipLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "llava.serve.vllm.llava_next:VisionZipLlavaNextForConditionalGeneration",
}


def visionzip_name(architecture: str) -> str:
    """The registered name of the VisionZip variant of a stock architecture (``VisionZip`` + its name)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"VisionZip serves {sorted(ARCHITECTURES)} in vLLM, got architecture {architecture!r}")
    return "VisionZip" + architecture


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the VisionZip classes under their own names."""
    from vllm import ModelRegistry

    for architecture, target in ARCHITECTURES.items():
        ModelRegistry.register_model(visionzip_name(architecture), target)


def saved_dtype(model_path: str | Path) -> str:
    """The dtype an export's weights were saved in (config.json's ``dtype``, ``torch_dtype`` before transformers 5),
    for vLLM's ``--dtype``; ``"auto"`` when config.json names none.

    vLLM's ``auto`` is not "as saved": on a CPU it casts float32 weights to bfloat16 (with a warning per layer).
    """
    config = json.loads((Path(model_path) / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "auto")


def hf_overrides(model_path: str | Path) -> dict[str, Any]:
    """``hf_overrides`` that serve an exported checkpoint through the plugin's class: ``{"architectures":
    ["VisionZip<its architecture>"]}``.

    With a ``visionzip`` key in config.json that class compresses; without one it is vLLM's stock class (tested:
    same ids), and it also loads the tower layout transformers 5 saves (``vision_tower.encoder.*``), which the stock
    class does not.
    """
    config = json.loads((Path(model_path) / "config.json").read_text())
    architectures = config.get("architectures") or []
    if len(architectures) != 1:
        raise ValueError(f"expected one architecture in {model_path}/config.json, got {architectures}")
    if architectures[0].startswith("VisionZip"):
        return {}  # the checkpoint names the plugin's class itself
    return {"architectures": [visionzip_name(architectures[0])]}
