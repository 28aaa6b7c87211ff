"""transformers' classes with VisionZip load by hub id from an offline cache, as users run them.

Tiny random llava-hf LLaVA-1.5 and NeXT checkpoints (built by ``helpers.hf_llava``, as in ``test_visionzip_hf_llava``)
are cached under the released ids in ``HF_HOME=tmp_path/...``; a fresh process with ``HF_HUB_OFFLINE=1`` loads model
and processor by id with a budget and generates. Its tokens must equal those of the same classes loaded from the
source folders here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import helpers.hf_llava as hf
import pytest
import torch
from helpers.hub_cache import cache_repo

REPO = Path(__file__).resolve().parents[1]
IDS = {"llava": "llava-hf/llava-1.5-7b-hf", "next": "llava-hf/llava-v1.6-vicuna-7b-hf"}
CHILD = """
import json, sys
import torch
from PIL import Image
from visionzip import VisionZipConfig
from visionzip.hf.llava import VisionZipLlavaForConditionalGeneration, VisionZipLlavaProcessor
from visionzip.hf.llava_next import VisionZipLlavaNextForConditionalGeneration, VisionZipLlavaNextProcessor

classes = {"llava": (VisionZipLlavaForConditionalGeneration, VisionZipLlavaProcessor),
           "next": (VisionZipLlavaNextForConditionalGeneration, VisionZipLlavaNextProcessor)}
request = json.loads(sys.argv[1])
cfg = VisionZipConfig.from_dict(request["cfg"])
out = {}
for family, repo_id in request["ids"].items():
    model_cls, proc_cls = classes[family]
    model = model_cls.from_pretrained(repo_id, visionzip=cfg).eval()
    proc = proc_cls.from_pretrained(repo_id, visionzip=model.visionzip_config)
    with Image.open(request["image"]) as photo:
        images = [photo.convert("RGB").resize((w, h)) for h, w in request["sizes"]]
    batch = proc(text=request["prompts"], images=images, padding=True, return_tensors="pt")
    ids = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    out[family] = ids[:, batch["input_ids"].shape[1]:].tolist()
print(json.dumps(out))
"""


def _generate_here(path: Path, family: str, sizes: list[tuple[int, int]]) -> list[list[int]]:
    _, model_cls, proc_cls = hf.FAMILIES[family]
    model = model_cls.from_pretrained(path, visionzip=hf.CFG).eval()
    proc = proc_cls.from_pretrained(path, visionzip=hf.CFG)
    batch = proc(text=hf.PROMPTS, images=hf.sample_images(sizes), padding=True, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    return ids[:, batch["input_ids"].shape[1] :].tolist()


@pytest.mark.slow
def test_hub_ids_load_offline_with_visionzip(tmp_path: Path) -> None:
    tokenizer = hf.tiny_tokenizer()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    hf_home, sources = tmp_path / "hf_home", {}
    for seed, (family, (plain_cls, _, _)) in enumerate(hf.FAMILIES.items()):
        torch.manual_seed(seed)
        source = tmp_path / "src" / family
        plain_cls(hf.tiny_config(family, len(tokenizer), image_id)).save_pretrained(source)
        hf.tiny_processor(family, tokenizer).save_pretrained(source)
        cache_repo(hf_home, IDS[family], source)
        sources[family] = source
    sizes = [hf.SIZES[0], hf.SIZES[2]]
    request = {"cfg": hf.CFG.to_dict(), "ids": IDS, "image": str(hf.SAMPLE), "sizes": sizes, "prompts": hf.PROMPTS}
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(request)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    by_id = json.loads(result.stdout.strip().splitlines()[-1])
    for family, source in sources.items():
        assert by_id[family] == _generate_here(source, family, sizes), family
