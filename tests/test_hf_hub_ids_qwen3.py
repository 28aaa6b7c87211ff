"""Qwen3-VL and Qwen3.5 with VisionZip load by hub id from an offline cache in a fresh process, as users run them.

Tiny random checkpoints (``helpers/qwen3_tiny.py``) are cached under released ids in ``HF_HOME=tmp_path/...``; a
fresh process with ``HF_HUB_OFFLINE=1`` loads model and processor by id with a budget and generates on a left-padded
batch. Its tokens must equal those of the same classes loaded from the source folders here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.hub_cache import cache_repo
from helpers.qwen3_tiny import write_tiny_qwen3
from PIL import Image
from transformers import Qwen3_5ForConditionalGeneration, Qwen3VLForConditionalGeneration

from visionzip.hf.qwen3_vl import (
    QwenVisionZipConfig,
    VisionZipQwen3_5ForConditionalGeneration,
    VisionZipQwen3VLForConditionalGeneration,
    VisionZipQwen3VLProcessor,
)

REPO = Path(__file__).resolve().parents[1]
IDS = {"qwen3_vl": "Qwen/Qwen3-VL-8B-Instruct", "qwen3_5": "Qwen/Qwen3.5-9B"}
CFG = QwenVisionZipConfig(0.45, 0.05)
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPTS = [f"hi {IMAGE} what is it", f"a {IMAGE} b"]
SIZES = [(32, 48), (40, 40)]
CHILD = """
import json, sys
import numpy as np
from PIL import Image
from visionzip.config import QwenVisionZipConfig
from visionzip.hf.qwen3_vl import (VisionZipQwen3_5ForConditionalGeneration, VisionZipQwen3VLForConditionalGeneration,
                                   VisionZipQwen3VLProcessor)

classes = {"qwen3_vl": VisionZipQwen3VLForConditionalGeneration, "qwen3_5": VisionZipQwen3_5ForConditionalGeneration}
request = json.loads(sys.argv[1])
cfg = QwenVisionZipConfig.from_dict(request["cfg"])
images = [Image.fromarray(np.asarray(pixels, dtype=np.uint8)) for pixels in request["images"]]
out = {}
for family, repo_id in request["ids"].items():
    model = classes[family].from_pretrained(repo_id, visionzip=cfg).eval()
    proc = VisionZipQwen3VLProcessor.from_pretrained(repo_id, visionzip=model.visionzip_config)
    batch = proc(text=request["prompts"], images=images, padding=True, return_tensors="pt")
    ids = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    out[family] = ids[:, batch["input_ids"].shape[1]:].tolist()
print(json.dumps(out))
"""
CLASSES = {"qwen3_vl": VisionZipQwen3VLForConditionalGeneration, "qwen3_5": VisionZipQwen3_5ForConditionalGeneration}


def _pixels() -> list[np.ndarray]:
    return [np.random.default_rng([h, w]).integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


def _generate_here(path: Path, family: str) -> list[list[int]]:
    model = CLASSES[family].from_pretrained(path, visionzip=CFG).eval()
    proc = VisionZipQwen3VLProcessor.from_pretrained(path, visionzip=CFG)
    images = [Image.fromarray(p) for p in _pixels()]
    batch = proc(text=PROMPTS, images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    return ids[:, batch["input_ids"].shape[1] :].tolist()


@pytest.mark.slow
def test_qwen3_hub_ids_load_offline_with_visionzip(tmp_path: Path) -> None:
    families = {
        "qwen3_vl": (Qwen3VLForConditionalGeneration, VisionZipQwen3VLProcessor),
        "qwen3_5": (Qwen3_5ForConditionalGeneration, VisionZipQwen3VLProcessor),
    }
    sources = write_tiny_qwen3(tmp_path / "src", families)
    hf_home = tmp_path / "hf_home"
    for family, source in sources.items():
        cache_repo(hf_home, IDS[family], source)
    request = {"cfg": CFG.to_dict(), "ids": IDS, "prompts": PROMPTS, "images": [p.tolist() for p in _pixels()]}
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(request)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    by_id = json.loads(result.stdout.strip().splitlines()[-1])
    for family, source in sources.items():
        assert by_id[family] == _generate_here(source, family), family
